"""Guest linear memory: what the vCPU sees at an address, through its page tables.

What it is: a snapshot of what the MMU needs (`AddressSpace`: paging on or
off, which paging mode, CR3) taken from a vCPU's special registers, and
reads and writes of guest *linear* addresses that walk the guest's own page
tables in guest memory. Debuggers and diagnostics use it: a gdb user types
kernel virtual addresses, a crashed guest's RIP and RSP are virtual.

The walks follow Intel SDM Vol. 3A §4.3 (32-bit paging), §4.4 (PAE paging)
and §4.5 (4-level paging, via `kvmpy.cpu.pagetables.translate`). 5-level
paging (CR4.LA57) is not walked: such addresses read as unmapped.

What it is not: a TLB or a permission checker. It answers "which physical
byte", as KVM_TRANSLATE does, and needs no vCPU ioctl once the snapshot is
taken, so any thread can use it while the vCPU is stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvmpy.cpu.pagetables import translate as translate_4level
from kvmpy.cpu.registers import CR0_PG, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA
from kvmpy.errors import GuestMemoryError
from kvmpy.memory import GuestMemory

PRESENT = 1
PAGE_SIZE_BIT = 1 << 7
PAE_ADDR = 0x000F_FFFF_FFFF_F000


@dataclass(frozen=True)
class AddressSpace:
    """How linear addresses become physical ones, for one vCPU at one moment."""

    paging: str  # "none", "32-bit", "pae", "4-level", "5-level"
    cr3: int = 0
    pse: bool = False  # 32-bit paging: 4 MiB pages allowed (CR4.PSE)

    @classmethod
    def from_sregs(cls, sregs: Any) -> AddressSpace:
        if not sregs.cr0 & CR0_PG:
            return cls("none")
        if sregs.efer & EFER_LMA:
            return cls("5-level" if sregs.cr4 & CR4_LA57 else "4-level", sregs.cr3)
        if sregs.cr4 & CR4_PAE:
            return cls("pae", sregs.cr3)
        return cls("32-bit", sregs.cr3, pse=bool(sregs.cr4 & CR4_PSE))

    def describe(self) -> str:
        return {"none": "paging off", "32-bit": "32-bit paging", "pae": "PAE paging",
                "4-level": "4-level paging", "5-level": "5-level paging"}[self.paging]


def to_physical(memory: GuestMemory, space: AddressSpace, linear: int) -> int | None:
    """The guest-physical address of `linear`, or None if it is not mapped.

    An entry that points outside guest RAM makes the address unmapped too.
    """
    try:
        if space.paging == "none":
            return linear & 0xFFFF_FFFF  # physical = linear, 32 bits wide
        if space.paging == "4-level":
            t = translate_4level(memory.read_u64, space.cr3, linear)
            return None if t is None else t.gpa
        if space.paging == "pae":
            return _walk_pae(memory, space.cr3, linear)
        if space.paging == "32-bit":
            return _walk_32(memory, space.cr3, linear, space.pse)
    except GuestMemoryError:
        return None
    return None  # 5-level: not walked


def _walk_32(memory: GuestMemory, cr3: int, linear: int, pse: bool) -> int | None:
    """SDM §4.3: PDE (bits 31:22), then PTE (21:12); PS=1 maps 4 MiB when CR4.PSE."""
    linear &= 0xFFFF_FFFF
    pde = memory.read_u32((cr3 & 0xFFFF_F000) + 4 * (linear >> 22))
    if not pde & PRESENT:
        return None
    if pse and pde & PAGE_SIZE_BIT:
        high = ((pde >> 13) & 0xFF) << 32  # PSE-36: physical bits 39:32
        return high | (pde & 0xFFC0_0000) | (linear & 0x3F_FFFF)
    pte = memory.read_u32((pde & 0xFFFF_F000) + 4 * ((linear >> 12) & 0x3FF))
    if not pte & PRESENT:
        return None
    return (pte & 0xFFFF_F000) | (linear & 0xFFF)


def _walk_pae(memory: GuestMemory, cr3: int, linear: int) -> int | None:
    """SDM §4.4: PDPTE (bits 31:30) from CR3 bits 31:5, PDE (29:21), PTE (20:12)."""
    linear &= 0xFFFF_FFFF
    pdpte = memory.read_u64((cr3 & 0xFFFF_FFE0) + 8 * (linear >> 30))
    if not pdpte & PRESENT:
        return None
    pde = memory.read_u64((pdpte & PAE_ADDR) + 8 * ((linear >> 21) & 0x1FF))
    if not pde & PRESENT:
        return None
    if pde & PAGE_SIZE_BIT:
        return (pde & PAE_ADDR & ~0x1F_FFFF) | (linear & 0x1F_FFFF)
    pte = memory.read_u64((pde & PAE_ADDR) + 8 * ((linear >> 12) & 0x1FF))
    if not pte & PRESENT:
        return None
    return (pte & PAE_ADDR) | (linear & 0xFFF)


def _pieces(linear: int, length: int) -> list[tuple[int, int]]:
    """Split [linear, linear+length) at 4 KiB boundaries: each piece maps contiguously."""
    out = []
    while length > 0:
        n = min(length, 0x1000 - (linear & 0xFFF))
        out.append((linear, n))
        linear += n
        length -= n
    return out


def read(memory: GuestMemory, space: AddressSpace, linear: int, length: int) -> bytes:
    """Up to `length` bytes at `linear`; shorter if the range runs into unmapped memory."""
    out = bytearray()
    for piece, n in _pieces(linear, length):
        gpa = to_physical(memory, space, piece)
        if gpa is None or not memory.contains(gpa, n):
            # a piece may be partly inside RAM: take what is there
            while gpa is not None and n > 1 and not memory.contains(gpa, n):
                n -= 1
            if gpa is None or not memory.contains(gpa, n):
                break
            out += memory.read(gpa, n)
            break
        out += memory.read(gpa, n)
    return bytes(out)


def write(memory: GuestMemory, space: AddressSpace, linear: int, data: bytes) -> int:
    """Write `data` at `linear`; returns how many bytes were written before a hole."""
    done = 0
    for piece, n in _pieces(linear, len(data)):
        gpa = to_physical(memory, space, piece)
        if gpa is None or not memory.contains(gpa, n):
            break
        memory.write(gpa, data[done : done + n])
        done += n
    return done
