"""Bus: ranges dispatch to their device with relative offsets; gaps float high."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy.bus import Bus
from kvmpy.errors import ConfigError


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple] = []

    def read(self, offset: int, size: int) -> bytes:
        self.log.append(("r", offset, size))
        return bytes([offset & 0xFF]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.log.append(("w", offset, data))


def test_dispatch_uses_offsets_relative_to_the_base():
    bus, a, b = Bus("pio"), Recorder(), Recorder()
    bus.insert(0x3F8, 8, a, "serial")
    bus.insert(0x60, 5, b, "i8042")
    bus.write(0x3F9, b"\x01")
    assert bus.read(0x64, 1) == b"\x04"
    assert a.log == [("w", 1, b"\x01")]
    assert b.log == [("r", 4, 1)]
    assert bus.lookup(0x3FF)[1:] == (7, "serial")
    assert bus.lookup(0x400) is None


def test_unclaimed_reads_are_all_ones_and_writes_are_counted():
    bus = Bus("mmio")
    assert bus.read(0x1234, 4) == b"\xff" * 4
    bus.write(0x1234, b"\0")
    assert bus.unhandled[0x1234] == 2


@pytest.mark.parametrize("base,length", [(0x3FC, 8), (0x3F8, 1), (0x3F0, 9), (0x3FF, 4)])
def test_overlaps_are_refused(base, length):
    bus = Bus("pio")
    bus.insert(0x3F8, 8, Recorder())
    with pytest.raises(ConfigError):
        bus.insert(base, length, Recorder())


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 50)), max_size=20),
       st.integers(0, 1100))
def test_lookup_agrees_with_a_linear_scan(ranges, addr):
    bus = Bus("pio")
    placed = []
    for base, length in ranges:
        try:
            bus.insert(base, length, Recorder())
        except ConfigError:
            continue
        placed.append((base, length))
    expected = [(b, n) for b, n in placed if b <= addr < b + n]
    hit = bus.lookup(addr)
    assert (hit is not None) == bool(expected)
    if hit:
        assert hit[1] == addr - expected[0][0]
