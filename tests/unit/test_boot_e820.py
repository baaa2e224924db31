"""e820 map: the PC layout from GuestMemory, sorted, never overlapping, re-typable."""

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy import layout
from kvmpy.boot.e820 import E820Entry, E820Type, build_e820, mark, mark_acpi, normalize
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory

MiB, GiB = layout.MiB, layout.GiB
HOLE = (layout.MMIO_HOLE, layout.MMIO_HOLE_END)
RAM, RES = E820Type.RAM, E820Type.RESERVED


class FakeMemory:
    """Only what build_e820 reads: regions with gpa and end (no host memory behind them)."""

    def __init__(self, spans):
        self.regions = [SimpleNamespace(gpa=s, end=e) for s, e in spans]

    def __iter__(self):
        return iter(self.regions)


def assert_well_formed(entries):
    for a, b in zip(entries, entries[1:], strict=False):
        assert a.end <= b.addr, f"{a} overlaps or is out of order with {b}"
    assert all(e.size > 0 for e in entries)


def test_small_guest():
    mem = GuestMemory.anonymous(128 * MiB, hole=HOLE)
    assert build_e820(mem) == [
        E820Entry(0, layout.EBDA, RAM),
        E820Entry(layout.EBDA, layout.HIMEM - layout.EBDA, RES),
        E820Entry(layout.HIMEM, 127 * MiB, RAM),
    ]
    assert E820Type.RAM == 1 and E820Type.RESERVED == 2 and E820Type.ACPI == 3


def test_guest_larger_than_the_hole_continues_above_4gib():
    mem = GuestMemory.anonymous(5 * GiB, hole=HOLE)
    try:
        e820 = build_e820(mem)
    finally:
        mem.close()
    assert e820 == [
        E820Entry(0, layout.EBDA, RAM),
        E820Entry(layout.EBDA, layout.HIMEM - layout.EBDA, RES),
        E820Entry(layout.HIMEM, layout.MMIO_HOLE - layout.HIMEM, RAM),
        E820Entry(layout.MMIO_HOLE_END, 5 * GiB - layout.MMIO_HOLE, RAM),
    ]
    # The RAM the map offers adds up to the guest's size less the legacy area.
    assert sum(e.size for e in e820 if e.type == RAM) == 5 * GiB - (layout.HIMEM - layout.EBDA)


def test_hole_reserved_on_request():
    e820 = build_e820(FakeMemory([(0, 3 * GiB), (4 * GiB, 5 * GiB)]), reserve_mmio_hole=True)
    assert E820Entry(layout.MMIO_HOLE, layout.MMIO_HOLE_END - layout.MMIO_HOLE, RES) in e820
    assert_well_formed(e820)


def test_ram_inside_the_hole_is_not_offered():
    e820 = build_e820(FakeMemory([(0, 5 * GiB)]))
    assert all(e.end <= layout.MMIO_HOLE or e.addr >= layout.MMIO_HOLE_END for e in e820)


def test_mark_acpi_splits_what_it_covers():
    e820 = build_e820(FakeMemory([(0, 64 * MiB)]))
    marked = mark_acpi(e820, layout.BIOS_START, 0x1000)
    assert marked == [
        E820Entry(0, layout.EBDA, RAM),
        E820Entry(layout.EBDA, layout.BIOS_START - layout.EBDA, RES),
        E820Entry(layout.BIOS_START, 0x1000, E820Type.ACPI),
        E820Entry(layout.BIOS_START + 0x1000, layout.HIMEM - layout.BIOS_START - 0x1000, RES),
        E820Entry(layout.HIMEM, 63 * MiB, RAM),
    ]


def test_mark_across_a_boundary_and_into_a_gap():
    e820 = [E820Entry(0, 0x1000, RAM), E820Entry(0x2000, 0x1000, RAM)]
    assert mark(e820, 0x800, 0x2000, E820Type.NVS) == [
        E820Entry(0, 0x800, RAM),
        E820Entry(0x800, 0x2000, E820Type.NVS),
        E820Entry(0x2800, 0x800, RAM),
    ]
    with pytest.raises(ConfigError):
        mark(e820, 0x800, 0, E820Type.NVS)


def test_normalize_merges_touching_entries_and_refuses_overlaps():
    assert normalize([E820Entry(0x1000, 0x1000, RAM), E820Entry(0, 0x1000, RAM)]) == [
        E820Entry(0, 0x2000, RAM)
    ]
    with pytest.raises(ConfigError, match="e820 entries overlap"):
        normalize([E820Entry(0, 0x2000, RAM), E820Entry(0x1000, 0x1000, RES)])


spans = st.lists(
    st.tuples(st.integers(0, 6 * GiB // 0x1000), st.integers(1, GiB // 0x1000)), max_size=5
)


@given(spans, st.booleans(), st.integers(0, 6 * GiB), st.integers(1, GiB),
       st.sampled_from(list(E820Type)))
def test_any_layout_gives_a_sorted_map_without_overlaps(raw, hole, gpa, size, type_):
    # Non-overlapping regions, as GuestMemory guarantees.
    regions, end = [], 0
    for start_pages, len_pages in sorted(raw):
        start = max(start_pages * 0x1000, end)
        regions.append((start, start + len_pages * 0x1000))
        end = start + len_pages * 0x1000
    e820 = build_e820(FakeMemory(regions), reserve_mmio_hole=hole)
    assert_well_formed(e820)
    merged: list[tuple[int, int]] = []  # touching regions are one span of RAM
    for s, t in regions:
        if merged and merged[-1][1] == s:
            merged[-1] = (merged[-1][0], t)
        else:
            merged.append((s, t))
    for e in e820:
        if e.type == RAM:
            assert any(s <= e.addr and e.end <= t for s, t in merged)
            assert e.end <= layout.EBDA or e.addr >= layout.HIMEM
            assert e.end <= layout.MMIO_HOLE or e.addr >= layout.MMIO_HOLE_END
    marked = mark(e820, gpa, size, type_)
    assert_well_formed(marked)
    covered = [e for e in marked if e.addr < gpa + size and gpa < e.end]
    assert all(e.type == type_ for e in covered)
    # every byte of the range is covered (entries may extend past it by merging)
    assert sum(min(e.end, gpa + size) - max(e.addr, gpa) for e in covered) == size
