"""The host side of the guest console: where output goes, where input comes from.

Output: `ConsoleOutput` is the writer a console device transmits to. It
forwards to a host stream (stdout) and/or keeps a transcript that scripts
can wait on (`wait_for`), which is how the Python API and the tests "expect"
a shell prompt.

Input: `StdinPump` reads the host's stdin in a thread and hands bytes to the
console device. When stdin is a terminal it is put in raw mode (so Ctrl-C and
arrow keys reach the guest) and restored on exit, whatever the exit path.
Ctrl-A then x quits, as in QEMU.
"""

from __future__ import annotations

import os
import re
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from typing import BinaryIO

ESCAPE = 0x01  # Ctrl-A


class ConsoleOutput:
    """A binary writer that tees to `forward` and keeps a searchable transcript."""

    def __init__(self, forward: BinaryIO | None = None, keep: bool = True) -> None:
        self.forward = forward
        self.keep = keep
        self._buf = bytearray()
        self._cond = threading.Condition()

    def write(self, data: bytes) -> int:
        if self.forward is not None:
            self.forward.write(data)
        if self.keep:
            with self._cond:
                self._buf += data
                self._cond.notify_all()
        return len(data)

    def flush(self) -> None:
        if self.forward is not None:
            self.forward.flush()

    @property
    def text(self) -> str:
        with self._cond:
            return self._buf.decode("utf-8", "replace")

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float, start: int = 0,
                 alive: Callable[[], bool] = lambda: True) -> re.Match[str] | None:
        """Block until `pattern` appears in the transcript after offset `start`."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = regex.search(self._buf.decode("utf-8", "replace"), start)
                if found or not alive():
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.2))


class StdinPump:
    """Feeds host stdin to `sink(bytes)`; `on_quit()` when the user types Ctrl-A x."""

    def __init__(self, sink: Callable[[bytes], None], on_quit: Callable[[], None],
                 stdin: BinaryIO | None = None) -> None:
        self.sink = sink
        self.on_quit = on_quit
        self._stdin = stdin or sys.stdin.buffer  # keep the file object (and its fd) alive
        self.fd = self._stdin.fileno()
        self._saved: list | None = None  # type: ignore[type-arg]
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="stdin", daemon=True)

    def start(self) -> None:
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        self._thread.start()

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self.restore_terminal()

    def restore_terminal(self) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def _run(self) -> None:
        escape = False
        while True:
            try:
                ready, _, _ = select.select([self.fd, self._stop_r], [], [])
            except OSError:  # stdin closed under us: no more input
                return
            if self._stop_r in ready:
                return
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                return
            if not data:  # EOF: the guest keeps running, it just gets no more input
                return
            if self._saved is not None:  # only a terminal has the Ctrl-A escape
                out = bytearray()
                for b in data:
                    if escape:
                        escape = False
                        if b in (ord("x"), ord("X")):
                            self.on_quit()
                            return
                        if b != ESCAPE:
                            out.append(ESCAPE)
                        out.append(b)
                    elif b == ESCAPE:
                        escape = True
                    else:
                        out.append(b)
                data = bytes(out)
            if data:
                self.sink(data)
