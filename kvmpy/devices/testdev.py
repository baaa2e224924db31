"""An MMIO echo device for test guests: what the guest writes, it reads back.

The first 8 bytes hold a fixed identity value so a guest can check it found
the device; the rest of the window is scratch storage. It exists to exercise
the MMIO exit path end to end (guest store -> KVM_EXIT_MMIO -> bus -> device
and back), not to model hardware.
"""

from __future__ import annotations

from kvmpy import layout

IDENT = b"KVMPYTST"


class TestDevice:
    def __init__(self, size: int = layout.TEST_DEVICE_SIZE) -> None:
        self.store = bytearray(size)
        self.store[: len(IDENT)] = IDENT
        self.writes = 0

    def read(self, offset: int, size: int) -> bytes:
        chunk = bytes(self.store[offset : offset + size])
        return chunk + b"\xff" * (size - len(chunk))

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        if offset >= len(IDENT):  # the identity is read-only
            end = min(offset + len(data), len(self.store))
            self.store[offset:end] = data[: end - offset]
