"""The MMIO test device: an echo area, a debug console and a debug exit.

Test guests use it to exercise the MMIO exit path end to end (guest store ->
KVM_EXIT_MMIO -> bus -> device and back). It also gives user-mode (CPL3)
guests a way to print and to end the run: on PVM, IOPL cannot be granted to
CPL3 code, so port I/O is closed to it, but an MMIO store always exits.

Register map (offsets from layout.TEST_DEVICE_BASE):
    0x00  8 bytes  identity "KVMPYTST" (read-only)
    0x08  1 byte   console: each byte written goes to the console writer
    0x0c  4 bytes  exit: writing N ends the run with status N
    0x10-         scratch: reads return what was written
    0xf00 4 bytes  escape, in test runs only (kvmpy.isolation.escape): writing makes
                   the system calls KVMPY_TEST_ESCAPE names and puts one line per call,
                   NUL-terminated, at 0xf10; without that variable, scratch like the rest
It models no real hardware.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvmpy import layout
from kvmpy.state.values import StateReader, b64

IDENT = b"KVMPYTST"
CONSOLE = 0x08
EXIT = 0x0C
SCRATCH = 0x10
ESCAPE = 0xF00
ESCAPE_REPORT = 0xF10


class TestDevice:
    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, console: Callable[[bytes], object] = lambda _: None,
                 on_exit: Callable[[int], None] = lambda _: None,
                 size: int = layout.TEST_DEVICE_SIZE,
                 escape: Callable[[], bytes] | None = None) -> None:
        self.store = bytearray(size)
        self.store[: len(IDENT)] = IDENT
        self.console = console
        self.on_exit = on_exit
        self.escape = escape  # tests of kvmpy's confinement only (see ESCAPE above)
        self.writes = 0

    def read(self, offset: int, size: int) -> bytes:
        chunk = bytes(self.store[offset : offset + size])
        return chunk + b"\xff" * (size - len(chunk))

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        if offset == CONSOLE:
            self.console(data[:1])
        elif offset == EXIT:
            self.on_exit(int.from_bytes(data, "little"))
        elif offset == ESCAPE and self.escape is not None:
            report = self.escape()[: len(self.store) - ESCAPE_REPORT - 1] + b"\0"
            self.store[ESCAPE_REPORT : ESCAPE_REPORT + len(report)] = report
        elif offset >= SCRATCH:
            end = min(offset + len(data), len(self.store))
            self.store[offset:end] = data[: end - offset]

    def state(self) -> dict[str, Any]:
        """The scratch area (the identity before it never changes)."""
        return {"scratch": b64(self.store[SCRATCH:])}

    def restore(self, state: object, where: str = "testdev") -> None:
        self.restorer(state, where)()

    def restorer(self, state: object, where: str = "testdev") -> Callable[[], None]:
        """`restore`, checked now: returns what puts the state back, as often as asked."""
        r = StateReader(state, where)
        size = len(self.store) - SCRATCH
        scratch = r.bytes("scratch", size, exact=size)
        r.done()

        def put() -> None:
            self.store[SCRATCH:] = scratch

        return put
