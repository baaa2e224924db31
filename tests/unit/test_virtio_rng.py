"""virtio-rng: writable buffers come back full of getrandom() bytes."""

from __future__ import annotations

from kvmpy.bus import NullIrq
from kvmpy.memory import GuestMemory
from kvmpy.virtio.driver import GuestDriver
from kvmpy.virtio.mmio import VirtioMmioTransport
from kvmpy.virtio.rng import MAX_REQUEST, Rng


def attach(mem_size: int = 1 << 20) -> GuestDriver:
    mem = GuestMemory.from_buffer(bytearray(mem_size))
    d = GuestDriver(VirtioMmioTransport(Rng(), mem, NullIrq()), mem)
    assert d.init()
    return d


def test_buffers_are_filled_with_random_bytes() -> None:
    d = attach()
    d.add_chain(0, [], [64, 64])
    [(_, length, bufs)] = d.used(0)
    assert length == 128
    assert bufs[0] != bufs[1] and bufs[0] != bytes(64)  # 2^-512 chance of a false failure


def test_requests_are_capped() -> None:
    d = attach(mem_size=1 << 21)
    d.add_chain(0, [], [MAX_REQUEST + 4096])
    [(_, length, [buf])] = d.used(0)
    assert length == MAX_REQUEST and buf[MAX_REQUEST:] == bytes(4096)


def test_readable_buffers_are_ignored() -> None:
    d = attach()
    d.add_chain(0, [b"driver data"], [16])
    [(_, length, _)] = d.used(0)
    assert length == 16
