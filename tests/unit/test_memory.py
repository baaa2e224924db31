"""GuestMemory: every access inside one region works, every other one raises."""

import ctypes
import mmap
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy import layout
from kvmpy.errors import ConfigError, GuestMemoryError
from kvmpy.memory import GuestMemory

REGIONS = [(0x0, 0x4000), (0x10000, 0x2000)]


def make() -> GuestMemory:
    return GuestMemory([(gpa, bytearray(size)) for gpa, size in REGIONS])


def inside_one_region(gpa: int, length: int) -> bool:
    return any(base <= gpa and gpa + length <= base + size for base, size in REGIONS)


@given(st.integers(-0x100, 0x14000), st.integers(-4, 0x5000))
def test_access_allowed_iff_inside_one_region(gpa, length):
    mem = make()
    if gpa >= 0 and length >= 0 and inside_one_region(gpa, length):
        mem.write(gpa, b"\xab" * length)
        assert mem.read(gpa, length) == b"\xab" * length
        assert mem.contains(gpa, length)
    else:
        assert not mem.contains(gpa, length)
        with pytest.raises(GuestMemoryError):
            mem.read(gpa, length)
        if length >= 0:
            with pytest.raises(GuestMemoryError):
                mem.write(gpa, b"\0" * length)


@given(st.integers(0, 0x3ff8), st.integers(0, 2**64 - 1))
def test_integer_accessors_round_trip(gpa, value):
    mem = make()
    mem.write_u64(gpa, value)
    assert mem.read_u64(gpa) == value
    assert mem.read_u32(gpa) == value & 0xFFFFFFFF
    assert mem.read_u16(gpa) == value & 0xFFFF
    assert mem.read_u8(gpa) == value & 0xFF


def test_crossing_a_gap_between_regions_is_refused():
    mem = make()
    with pytest.raises(GuestMemoryError):
        mem.read(0x3FFF, 2)
    with pytest.raises(GuestMemoryError):
        mem.read_u64(0x11FFC)


def test_view_is_zero_copy():
    buf = bytearray(0x1000)
    mem = GuestMemory.from_buffer(buf)
    mem.view(0x10, 4)[:] = b"abcd"
    assert buf[0x10:0x14] == b"abcd"


def test_anonymous_memory_skips_the_mmio_hole():
    hole = (0x20000, 0x40000)
    mem = GuestMemory.anonymous(0x30000, hole=hole)
    assert [(r.gpa, r.size) for r in mem] == [(0, 0x20000), (0x40000, 0x10000)]
    assert mem.size == 0x30000
    assert not mem.contains(0x20000)
    mem.write_u32(0x40000, 7)
    assert mem.read_u32(0x40000) == 7
    assert mem.regions[0].host_address != 0
    mem.close()


def test_small_memory_is_one_region_below_the_hole():
    mem = GuestMemory.anonymous(16 * layout.MiB, hole=(layout.MMIO_HOLE, layout.MMIO_HOLE_END))
    assert len(mem.regions) == 1
    assert isinstance(mem.regions[0].buffer, mmap.mmap)
    mem.close()


@pytest.mark.parametrize("size", [0, -4096, 4095, 123])
def test_bad_sizes_are_config_errors(size):
    with pytest.raises(ConfigError):
        GuestMemory.anonymous(size)


def test_overlapping_regions_are_refused():
    with pytest.raises(ConfigError):
        GuestMemory([(0, bytearray(0x2000)), (0x1000, bytearray(0x1000))])


def test_anonymous_regions_start_on_2mib_host_boundaries():
    """So transparent huge pages can back guest RAM (fewer faults for a nested hypervisor)."""
    mem = GuestMemory.anonymous(64 * layout.MiB, hole=(32 * layout.MiB, 48 * layout.MiB))
    for region in mem:
        assert region.host_address % (2 * layout.MiB) == 0
        assert len(region.view) == region.size
    mem.write_u64(48 * layout.MiB + 8, 0x1234)
    assert mem.read_u64(48 * layout.MiB + 8) == 0x1234
    mem.close()


@given(st.lists(st.tuples(st.integers(-2, 0x5000), st.integers(-2, 0x1000)), max_size=8),
       st.integers(0, 0x2000))
def test_host_addresses_hold_the_bytes_the_views_show(spans: list[tuple[int, int]],
                                                      base: int) -> None:
    """`host_address` is checked as `view` is, and names the same bytes."""
    mem = GuestMemory([(base, bytearray(os.urandom(0x3000))), (0x8000, bytearray(0x1000))])
    for gpa, length in spans:
        try:
            view = mem.view(gpa, length)
        except GuestMemoryError:
            with pytest.raises(GuestMemoryError):
                mem.host_address(gpa, length)
            continue
        assert ctypes.string_at(mem.host_address(gpa, length), length) == bytes(view)
    mem.close()


def test_written_pages_are_tracked_only_when_asked() -> None:
    """A fast reset copies back what devices wrote (KVM's dirty log does not see it):
    every writable window or address counts, reads do not."""
    mem = GuestMemory.from_buffer(bytearray(1 << 20))
    mem.write(0x1000, b"x")
    assert mem.written is None
    mem.track_writes()
    mem.write(0x2FFF, b"ab")  # across a page boundary: pages 2 and 3
    mem.write_u32(0x8000, 1)
    mem.view(0x10000, 0x2001)  # a window a device may write through
    mem.host_address(0x20000, 1)  # an address for preadv
    mem.view(0x30000, 0)  # an empty window touches nothing
    assert mem.read(0x40000, 0x1000) == bytes(0x1000) and mem.read_u64(0x50000) == 0
    assert mem.written == {2, 3, 8, 0x10, 0x11, 0x12, 0x20}
    mem.track_writes(False)
    assert mem.written is None
