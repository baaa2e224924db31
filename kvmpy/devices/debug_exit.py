"""A debug-exit port: the guest writes a number and the VM ends with that status.

What it is: one port (`layout.DEBUG_EXIT_PORT`, registered 4 bytes wide) in the
spirit of QEMU's isa-debug-exit, for test guests that have no other way to say
"done, and here is my result". A write of 1 to 4 bytes is read as a
little-endian number N and `on_exit(N)` is called (unlike QEMU, N is not
turned into `N << 1 | 1`). Reads float high, as an empty ISA port.

What it is not: a power-off device Linux knows about; Linux never touches it.
"""

from __future__ import annotations

from collections.abc import Callable


class DebugExit:
    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self._on_exit(int.from_bytes(data[:4], "little"))
