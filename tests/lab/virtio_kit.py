"""What the virtio lab tests share: guest initramfs with a script, host programs in the guest,
a kvmpy process whose console a test can wait on, and a network namespace to run it in.

- `guest_initrd`: kvmpy's default guest (busybox, the default /init) plus test scripts
  and, optionally, dynamically linked host programs with their shared libraries (found with
  `ldd`), written uncompressed so that building it costs next to nothing inside the lab's
  emulated CPU. A script runs with `append="-- sh /NAME"`: the kernel splits its command
  line at spaces and knows only double quotes, so scripts travel as files, not as `sh -c`.
- `KvmpyProcess`: `python -m kvmpy run ...` with its stdout kept in a searchable transcript
  (`kvmpy.console.ConsoleOutput`), for tests of the command line.
- `netns`: a named network namespace that the calling thread enters and leaves; processes
  and sockets created inside belong to it.

Not a general test framework: just what tests/lab/test_virtio*.py need.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from kvmpy.console import ConsoleOutput
from kvmpy.initramfs import DEFAULT_INIT, busybox_initramfs

CLONE_NEWNET = 0x40000000  # <linux/sched.h>
_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")


def shared_libraries(program: Path) -> list[Path]:
    """The absolute paths `ldd` resolves for `program`, the dynamic loader included."""
    out = subprocess.run(["ldd", str(program)], capture_output=True, text=True,
                         check=True).stdout
    return [Path(m.group(1)) for m in map(_LDD_LINE.search, out.splitlines()) if m]


def guest_initrd(path: Path, scripts: Mapping[str, str] | None = None,
                 programs: Mapping[str, Path] | None = None,
                 files: Mapping[str, bytes] | None = None) -> Path:
    """Write the default guest plus `scripts` (name -> sh text, at /name) to `path`.

    `programs` maps a guest path (e.g. "sbin/mkfs.ext4") to a host executable; its
    shared libraries go to the same paths as on the host, so its loader finds them.
    """
    executables: dict[str, bytes] = {}
    for guest_path, host_path in (programs or {}).items():
        executables[guest_path] = host_path.read_bytes()
        for lib in shared_libraries(host_path):
            # 0755: the kernel execs the loader (PT_INTERP) and needs it executable
            executables.setdefault(str(lib).lstrip("/"), lib.read_bytes())
    extra = {name: text.encode() for name, text in (scripts or {}).items()}
    extra.update(files or {})
    archive = busybox_initramfs(DEFAULT_INIT, files=extra, executables=executables)
    path.write_bytes(archive.to_cpio())  # the kernel takes an uncompressed newc archive too
    return path


class KvmpyProcess:
    """`python -m kvmpy run ARGS` with stdin closed (or a pipe `send` writes to, with
    `typing=True`); its stdout is waited on like a console."""

    def __init__(self, args: list[str], typing: bool = False) -> None:
        self.console = ConsoleOutput()
        self.proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", *args],
                                     stdin=subprocess.PIPE if typing else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._mark = 0
        self._pump = threading.Thread(target=self._copy, daemon=True)
        self._pump.start()

    def _copy(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):  # type: ignore[attr-defined]
            self.console.write(chunk)

    def expect(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        """Wait for `pattern` after the previous match; fails with the transcript's tail."""
        found = self.console.wait_for(pattern, timeout, self._mark,
                                      alive=lambda: self.proc.poll() is None)
        if found is None:
            state = (f"no match in {timeout} s" if self.proc.poll() is None
                     else f"kvmpy exited {self.proc.returncode}")
            raise self.give_up(f"waiting for {pattern!r}: {state}")
        self._mark = found.end()
        return found

    def give_up(self, why: str) -> AssertionError:
        """Kill kvmpy (asking it first for its threads' and vCPUs' state, which it prints
        on SIGUSR2) and say `why`, with its stderr and the console's tail."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR2)
            time.sleep(5)
            self.proc.kill()
        assert self.proc.stderr is not None
        err = self.proc.stderr.read().decode(errors="replace")
        if len(err) > 8000:  # the first error and the SIGUSR2 dump at the end both matter
            err = f"{err[:2000]}\n[... {len(err) - 8000} characters ...]\n{err[-6000:]}"
        return AssertionError(f"{why}, stderr {err!r}; output ends with "
                              f"{self.output[-1500:]!r}")

    def send(self, text: str) -> None:
        """Type `text` at the guest's console (needs `typing=True`)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    @property
    def output(self) -> str:
        return self.console.text

    def wait(self, timeout: float = 120) -> tuple[int, str]:
        """The exit status and stderr, once kvmpy has exited. (Not `communicate`, which
        would take the stdout the pump has not read yet away from the transcript.)"""
        assert self.proc.stderr is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.give_up(f"kvmpy had not exited {timeout} s later") from None
        self._pump.join(10)
        return self.proc.returncode, self.proc.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def netns(name: str) -> Iterator[str]:
    """Create network namespace `name`, move this thread into it, and back out at the end.

    Namespaces belong to threads: only the calling thread moves, and what it starts
    meanwhile (processes, sockets, a tap opened by a child) lives in `name`.
    """
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{name}") as target:
            _setns(target.fileno())
            try:
                subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
                yield name
            finally:
                _setns(home.fileno())
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
