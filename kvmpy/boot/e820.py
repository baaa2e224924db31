"""The e820 memory map: what kvmpy tells the guest is RAM and what is not.

What it is: a sorted, non-overlapping list of (addr, size, type) built from
`GuestMemory` and `layout`, the way a PC BIOS answers INT 15h AX=E820h:

- [0, EBDA)            usable RAM (the real-mode IVT/BDA and kvmpy's boot data live here)
- [EBDA, 1 MiB)        reserved (EBDA with the MP table, VGA hole, BIOS area with ACPI)
- [1 MiB, MMIO hole)   usable RAM, as far as guest RAM goes
- above 4 GiB          usable RAM that the hole displaced

The 32-bit MMIO hole itself is left out of the map by default, as Firecracker
does: a gap is neither RAM nor claimed, and Linux can still place devices
there. `reserve_mmio_hole=True` marks it reserved instead. `mark` re-types a
range (for example ACPI tables as `E820Type.ACPI`) by splitting what it covers.
The same list serves the zero page (`params.py`) and the PVH memory map
(`pvh.py`): PVH memmap types are e820 types.

What it is not: it allocates nothing and checks no kernel; it describes.

Types: arch/x86/include/asm/e820/types.h; ACPI 6.5 §15 (System Address Map).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import IntEnum
from typing import NamedTuple

from kvmpy import layout
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory


class E820Type(IntEnum):
    RAM = 1
    RESERVED = 2
    ACPI = 3  # ACPI tables, reclaimable once parsed
    NVS = 4  # ACPI non-volatile storage
    UNUSABLE = 5
    PMEM = 7  # persistent memory


E820_RAM = E820Type.RAM
E820_RESERVED = E820Type.RESERVED
E820_ACPI = E820Type.ACPI
E820_NVS = E820Type.NVS
E820_UNUSABLE = E820Type.UNUSABLE
E820_PMEM = E820Type.PMEM


class E820Entry(NamedTuple):
    addr: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.addr + self.size


def _subtract(spans: Iterable[tuple[int, int]], cut: tuple[int, int]) -> list[tuple[int, int]]:
    """[start, end) spans with [cut) removed."""
    out = []
    for start, end in spans:
        if end <= cut[0] or start >= cut[1]:
            out.append((start, end))
            continue
        if start < cut[0]:
            out.append((start, cut[0]))
        if end > cut[1]:
            out.append((cut[1], end))
    return out


def normalize(entries: Iterable[E820Entry]) -> list[E820Entry]:
    """Sort by address, drop empty entries, merge touching entries of the same type.

    Raises ConfigError if two entries overlap: a map that says one byte is two
    things is a kvmpy bug, not something to hand a kernel.
    """
    out: list[E820Entry] = []
    for e in sorted((e for e in entries if e.size > 0), key=lambda e: e.addr):
        if out and e.addr < out[-1].end:
            raise ConfigError(
                f"e820 entries overlap: [{out[-1].addr:#x}, {out[-1].end:#x}) "
                f"and [{e.addr:#x}, {e.end:#x})"
            )
        if out and e.addr == out[-1].end and e.type == out[-1].type:
            out[-1] = E820Entry(out[-1].addr, out[-1].size + e.size, e.type)
        else:
            out.append(e)
    return out


def build_e820(memory: GuestMemory, *, reserve_mmio_hole: bool = False) -> list[E820Entry]:
    """The e820 map for `memory` (see the module docstring for the layout)."""
    ram = [(r.gpa, r.end) for r in memory]
    # RAM that a guest could map in the legacy area or the hole is not offered as RAM.
    ram = _subtract(ram, (layout.EBDA, layout.HIMEM))
    ram = _subtract(ram, (layout.MMIO_HOLE, layout.MMIO_HOLE_END))
    entries = [E820Entry(s, e - s, E820Type.RAM) for s, e in ram]
    entries.append(E820Entry(layout.EBDA, layout.HIMEM - layout.EBDA, E820Type.RESERVED))
    if reserve_mmio_hole:
        entries.append(
            E820Entry(
                layout.MMIO_HOLE, layout.MMIO_HOLE_END - layout.MMIO_HOLE, E820Type.RESERVED
            )
        )
    return normalize(entries)


def mark(entries: Sequence[E820Entry], gpa: int, size: int, type_: E820Type) -> list[E820Entry]:
    """A copy of `entries` with [gpa, gpa+size) re-typed as `type_`, splitting what it covers.

    Use it for ACPI tables (`E820Type.ACPI`) or any range the guest must not
    treat as ordinary RAM. The range need not be covered by an entry already.
    """
    if size <= 0 or gpa < 0:
        raise ConfigError(f"bad e820 range [{gpa:#x}, +{size:#x})")
    out = []
    for e in entries:
        for start, end in _subtract([(e.addr, e.end)], (gpa, gpa + size)):
            out.append(E820Entry(start, end - start, e.type))
    out.append(E820Entry(gpa, size, type_))
    return normalize(out)


def mark_acpi(entries: Sequence[E820Entry], gpa: int, size: int) -> list[E820Entry]:
    """`mark` for ACPI tables (reclaimable once the kernel has parsed them)."""
    return mark(entries, gpa, size, E820Type.ACPI)
