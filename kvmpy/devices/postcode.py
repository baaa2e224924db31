"""Port 0x80, the POST-code port: remembers the last byte written.

Firmware writes boot progress codes here and Linux writes it as a short I/O
delay (`outb_p`). Claiming it keeps those writes out of the unhandled-port
counts, and lets a test guest use it as a cheap, side-effect-free exit.
"""

from __future__ import annotations

from typing import Any

from kvmpy.state.values import U8, StateReader


class PostCode:
    def __init__(self) -> None:
        self.last = 0

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self.last]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.last = data[0]

    def state(self) -> dict[str, Any]:
        return {"last": self.last}

    def restore(self, state: object, where: str = "post-code") -> None:
        r = StateReader(state, where)
        last = r.int("last", 0, U8)
        r.done()
        self.last = last
