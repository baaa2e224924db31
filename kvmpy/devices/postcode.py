"""Port 0x80, the POST-code port: remembers the last byte written.

Firmware writes boot progress codes here and Linux writes it as a short I/O
delay (`outb_p`). Claiming it keeps those writes out of the unhandled-port
counts, and lets a test guest use it as a cheap, side-effect-free exit.
"""

from __future__ import annotations


class PostCode:
    def __init__(self) -> None:
        self.last = 0

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self.last]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.last = data[0]
