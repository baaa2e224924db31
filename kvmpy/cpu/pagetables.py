"""Four-level x86-64 page tables: build an identity map, and walk any table.

kvmpy enters long mode with paging already on, so it must hand the vCPU page
tables. It builds the simplest correct ones: the first 4 GiB identity-mapped
with 2 MiB pages (PML4 -> one PDPT -> four PDs), at the addresses named in
`kvmpy.layout`. `translate` walks tables the way the MMU does, for tests that
check every translation and for debuggers that turn guest-virtual addresses
into guest-physical ones.

Intel SDM Vol. 3A §4.5 (4-level paging), Table 4-14..4-20 (entry formats).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import NamedTuple

from kvmpy import layout
from kvmpy.memory import GuestMemory

PRESENT = 1 << 0
WRITABLE = 1 << 1
USER = 1 << 2
PAGE_SIZE = 1 << 7  # PS: this PDPTE/PDE maps a 1 GiB / 2 MiB page
NX = 1 << 63
ADDR_MASK = 0x000F_FFFF_FFFF_F000

PAGE_2M = 2 * layout.MiB
ENTRIES = 512


def build_identity_map(memory: GuestMemory, *, user: bool = False) -> int:
    """Identity-map [0, 4 GiB) with 2 MiB pages; returns the CR3 value (the PML4's gpa).

    `user` sets U/S at every level so code at CPL3 may touch every page.
    """
    flags = PRESENT | WRITABLE | (USER if user else 0)
    memory.fill(layout.PML4, layout.PAGE_TABLES_END - layout.PML4)
    memory.write_u64(layout.PML4, layout.PDPT | flags)
    for i in range(layout.PD_COUNT):
        pd = layout.PD + i * 0x1000
        memory.write_u64(layout.PDPT + 8 * i, pd | flags)
        # entry j maps the 2 MiB page at first + j*2 MiB; the flags sit below bit 21, so
        # the entries are one arithmetic sequence (an array of little-endian u64 on x86)
        first = i * ENTRIES * PAGE_2M
        entries = array("Q", range(first | flags | PAGE_SIZE, first + ENTRIES * PAGE_2M, PAGE_2M))
        memory.write(pd, entries.tobytes())
    return layout.PML4


class Translation(NamedTuple):
    gpa: int
    writable: bool
    user: bool
    page_size: int


def translate(read_u64: Callable[[int], int], cr3: int, gva: int) -> Translation | None:
    """Walk 4-level tables rooted at `cr3` for `gva`; None if not present.

    `read_u64` reads guest-physical memory (e.g. GuestMemory.read_u64); an
    entry pointing outside guest memory makes it raise, as the walk is then
    meaningless.
    """
    if gva >> 47 not in (0, 0x1FFFF):  # non-canonical: bits 63:47 must all match
        return None
    table = cr3 & ADDR_MASK
    writable = user = True
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = read_u64(table + 8 * ((gva >> shift) & 0x1FF))
        if not entry & PRESENT:
            return None
        writable &= bool(entry & WRITABLE)
        user &= bool(entry & USER)
        if shift == 12 or (level in (1, 2) and entry & PAGE_SIZE):
            size = 1 << shift
            base = entry & ADDR_MASK & ~(size - 1)
            return Translation(base | (gva & (size - 1)), writable, user, size)
        table = entry & ADDR_MASK
    return None  # unreachable: the 4 KiB level always returns
