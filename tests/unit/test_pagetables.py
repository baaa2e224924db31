"""kvmpy's identity map: walk the tables it built and check every translation."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy import layout
from kvmpy.cpu.pagetables import PAGE_2M, build_identity_map, translate
from kvmpy.memory import GuestMemory


@pytest.fixture(scope="module")
def tables():
    mem = GuestMemory.from_buffer(bytearray(0x20000))
    cr3 = build_identity_map(mem)
    return mem, cr3


def test_every_2mib_page_of_the_first_4gib_maps_to_itself(tables):
    mem, cr3 = tables
    for page in range(0, 4 * layout.GiB, PAGE_2M):
        for probe in (page, page + PAGE_2M - 1):
            t = translate(mem.read_u64, cr3, probe)
            assert t is not None and t.gpa == probe and t.writable
            assert t.page_size == PAGE_2M and not t.user


@given(st.integers(4 * layout.GiB, 2**47 - 1))
def test_nothing_above_4gib_is_mapped(tables, gva):
    mem, cr3 = tables
    assert translate(mem.read_u64, cr3, gva) is None


@given(st.integers(2**47, 2**64 - 2**47 - 1))
def test_non_canonical_addresses_never_translate(tables, gva):
    mem, cr3 = tables
    assert translate(mem.read_u64, cr3, gva) is None


def test_user_tables_are_user_accessible():
    mem = GuestMemory.from_buffer(bytearray(0x20000))
    cr3 = build_identity_map(mem, user=True)
    t = translate(mem.read_u64, cr3, 0x12345678)
    assert t is not None and t.user and t.gpa == 0x12345678


def test_walker_handles_4k_and_1g_pages():
    mem = GuestMemory.from_buffer(bytearray(0x10000))
    # PML4 at 0x1000 -> PDPT 0x2000; PDPT[1] = 1 GiB page at 0x40000000;
    # PDPT[0] -> PD 0x3000 -> PD[0] -> PT 0x4000 -> PT[5] = 4 KiB page at 0x7000 (read-only)
    mem.write_u64(0x1000, 0x2000 | 3)
    mem.write_u64(0x2008, 0x40000000 | 0x83)
    mem.write_u64(0x2000, 0x3000 | 3)
    mem.write_u64(0x3000, 0x4000 | 3)
    mem.write_u64(0x4000 + 8 * 5, 0x7000 | 1)
    big = translate(mem.read_u64, 0x1000, 0x40000000 + 0x1234567)
    assert big.gpa == 0x41234567 and big.page_size == 1 << 30
    small = translate(mem.read_u64, 0x1000, 0x5ABC)
    assert small.gpa == 0x7ABC and small.page_size == 4096 and not small.writable
    assert translate(mem.read_u64, 0x1000, 0x6000) is None
