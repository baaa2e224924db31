"""ELF64 `vmlinux` loader: PT_LOAD segments at their physical addresses, and the PVH note.

What it is: the loader for an uncompressed x86-64 Linux kernel. It validates
the ELF header (ident, class, data, type, machine), copies each PT_LOAD
segment to its `p_paddr` with the tail zeroed up to `p_memsz` (the bss), and
returns a `LoadedElf` with two possible entry points:

- `entry_gpa`: the 64-bit entry `startup_64`, entered in long mode with the
  zero page in RSI. Linux links vmlinux with `ENTRY(phys_startup_64)`
  (arch/x86/kernel/vmlinux.lds.S), so `e_entry` is already physical; an
  `e_entry` that is a virtual address (inside some segment's `p_vaddr` range)
  is converted through that segment's `p_paddr`.
- `pvh_entry_gpa`: the 32-bit PVH entry from the ELF note
  XEN_ELFNOTE_PHYS32_ENTRY (type 18, name "Xen") in a PT_NOTE segment, if the
  kernel was built with CONFIG_PVH (arch/x86/platform/pvh/head.S). It is
  entered in 32-bit protected mode with paging off and EBX = hvm_start_info.

What it is not: section headers, relocations and symbols are ignored; nothing
here writes boot parameters or touches a vCPU.

Sources: System V gABI (ELF header, program header, note section), the
x86-64 psABI, xen/include/public/elfnote.h. Learned from rust-vmm
linux-loader (src/loader/x86_64/elf/mod.rs).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from kvmpy import layout
from kvmpy.boot.bootparam import Image
from kvmpy.errors import LoaderError
from kvmpy.memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF  # e_phnum escape: the real count lives in section 0 (not supported)

XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_NOTE_NAME = b"Xen\0"

# Elf64_Ehdr after e_ident: type, machine, version, entry, phoff, shoff, flags,
# ehsize, phentsize, phnum, shentsize, shnum, shstrndx (gABI "ELF Header").
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")  # type, flags, offset, vaddr, paddr, filesz, memsz, align
NHDR = struct.Struct("<III")  # namesz, descsz, type
MAX_PHNUM = 256  # far more than any kernel has; bounds the work a hostile file can ask for


class ProgramHeader(NamedTuple):
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


class ElfImage(NamedTuple):
    """A validated ELF64 x86-64 executable: its entry, program headers and PVH entry."""

    e_entry: int
    phdrs: tuple[ProgramHeader, ...]
    pvh_entry: int | None

    @property
    def loads(self) -> tuple[ProgramHeader, ...]:
        return tuple(p for p in self.phdrs if p.type == PT_LOAD)


class LoadedElf(NamedTuple):
    """What `load_elf` put in guest RAM, and the kernel's entry points."""

    entry_gpa: int  # 64-bit entry (physical)
    pvh_entry_gpa: int | None  # 32-bit PVH entry, if the kernel has the note
    load_gpa: int  # lowest byte loaded
    end_gpa: int  # one past the highest byte (bss included)
    segments: tuple[tuple[int, int, int], ...]  # (gpa, filesz, memsz) per PT_LOAD


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _notes(
    image: Image, ph: ProgramHeader, index: int
) -> list[tuple[bytes, int, bytes]]:
    """(name, type, desc) of each note in a PT_NOTE segment (gABI "Note Section")."""
    # Linux emits 4-byte aligned notes (ELFNOTE in include/linux/elfnote.h); a segment
    # declaring 8-byte alignment (GNU property notes) pads to 8.
    align = 8 if ph.align == 8 else 4
    notes = []
    pos, end = ph.offset, ph.offset + ph.filesz
    while pos < end:
        if pos + NHDR.size > end:
            raise LoaderError(f"malformed ELF: note in segment {index} is truncated")
        namesz, descsz, ntype = NHDR.unpack_from(image, pos)
        name_at = pos + NHDR.size
        desc_at = name_at + _align_up(namesz, align)
        if desc_at + descsz > end:
            raise LoaderError(f"malformed ELF: note in segment {index} runs past the segment")
        name = bytes(image[name_at : name_at + namesz])
        notes.append((name, ntype, bytes(image[desc_at : desc_at + descsz])))
        pos = desc_at + _align_up(descsz, align)
    return notes


def _pvh_entry(image: Image, ph: ProgramHeader, index: int) -> int | None:
    for name, ntype, desc in _notes(image, ph, index):
        if name == XEN_NOTE_NAME and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
            # Linux writes it with _ASM_PTR (8 bytes on x86-64); the value is 32-bit.
            if len(desc) not in (4, 8):
                raise LoaderError(f"malformed PVH note: {len(desc)}-byte entry, expected 4 or 8")
            entry = int.from_bytes(desc, "little")
            if entry >= 1 << 32:
                raise LoaderError(f"malformed PVH note: entry {entry:#x} is not a 32-bit address")
            return entry
    return None


def parse_elf(image: Image) -> ElfImage:
    """Validate an ELF64 x86-64 executable and read its program headers and PVH note."""
    n = len(image)
    if n < EHDR.size:
        raise LoaderError(f"truncated ELF: {n} bytes, the ELF header needs {EHDR.size}")
    (ident, e_type, machine, _version, e_entry, phoff, _shoff, _flags, _ehsize,
     phentsize, phnum, _shentsize, _shnum, _shstrndx) = EHDR.unpack_from(image, 0)
    if ident[:4] != ELF_MAGIC:
        raise LoaderError(f"wrong magic: {ident[:4]!r}, expected b'\\x7fELF'")
    if ident[4] != ELFCLASS64:
        raise LoaderError(f"not a 64-bit ELF: EI_CLASS is {ident[4]} (need 2, ELFCLASS64)")
    if ident[5] != ELFDATA2LSB:
        raise LoaderError(f"not a little-endian ELF: EI_DATA is {ident[5]} (need 1)")
    if ident[6] != EV_CURRENT:
        raise LoaderError(f"unknown ELF version {ident[6]} in e_ident")
    if machine != EM_X86_64:
        raise LoaderError(f"not an x86-64 ELF: e_machine is {machine} (need 62, EM_X86_64)")
    if e_type != ET_EXEC:
        raise LoaderError(f"not an executable ELF: e_type is {e_type} (need 2, ET_EXEC)")
    if phentsize != PHDR.size:
        raise LoaderError(f"malformed ELF: e_phentsize is {phentsize}, expected {PHDR.size}")
    if phnum == 0:
        raise LoaderError("malformed ELF: no program headers")
    if phnum > MAX_PHNUM:
        raise LoaderError(f"malformed ELF: {phnum} program headers (at most {MAX_PHNUM})")
    if phoff + phnum * PHDR.size > n:
        raise LoaderError(
            f"truncated ELF: {n} bytes, program headers end at {phoff + phnum * PHDR.size:#x}"
        )
    phdrs = tuple(
        ProgramHeader(*PHDR.unpack_from(image, phoff + i * PHDR.size)) for i in range(phnum)
    )
    pvh_entry = None
    for i, ph in enumerate(phdrs):
        if ph.type not in (PT_LOAD, PT_NOTE):
            continue
        if ph.offset + ph.filesz > n:
            raise LoaderError(
                f"truncated ELF: {n} bytes, segment {i} ends at {ph.offset + ph.filesz:#x}"
            )
        if ph.type == PT_LOAD and ph.filesz > ph.memsz:
            raise LoaderError(
                f"malformed ELF: segment {i} has p_filesz {ph.filesz:#x} > p_memsz {ph.memsz:#x}"
            )
        if ph.type == PT_NOTE and pvh_entry is None:
            pvh_entry = _pvh_entry(image, ph, i)
    if not any(ph.type == PT_LOAD and ph.memsz for ph in phdrs):
        raise LoaderError("malformed ELF: no PT_LOAD segment with contents")
    return ElfImage(e_entry=e_entry, phdrs=phdrs, pvh_entry=pvh_entry)


def _physical_entry(elf: ElfImage) -> int:
    """e_entry as a guest-physical address (see the module docstring)."""
    for ph in elf.loads:
        if ph.paddr <= elf.e_entry < ph.paddr + ph.memsz:
            return elf.e_entry
    for ph in elf.loads:
        if ph.vaddr <= elf.e_entry < ph.vaddr + ph.memsz:
            return elf.e_entry - ph.vaddr + ph.paddr
    raise LoaderError(f"bad ELF entry point {elf.e_entry:#x}: outside every PT_LOAD segment")


def load_elf(memory: GuestMemory, image: bytes | bytearray | memoryview) -> LoadedElf:
    """Validate `image`, copy its PT_LOAD segments into `memory`, return what was loaded."""
    elf = parse_elf(image)
    entry = _physical_entry(elf)
    for name, gpa in (("entry point", entry), ("PVH entry point", elf.pvh_entry)):
        if gpa is not None and not layout.HIMEM <= gpa < layout.MMIO_HOLE:
            raise LoaderError(
                f"bad ELF {name} {gpa:#x}: outside [1 MiB, {layout.MMIO_HOLE:#x}) "
                "where kvmpy enters kernels"
            )
    loads = [(i, ph) for i, ph in enumerate(elf.phdrs) if ph.type == PT_LOAD and ph.memsz]
    for i, ph in loads:
        if ph.paddr < layout.HIMEM:
            raise LoaderError(
                f"ELF segment {i} loads at {ph.paddr:#x}, below 1 MiB where kvmpy keeps "
                "its boot structures"
            )
        if not memory.contains(ph.paddr, ph.memsz):
            raise LoaderError(
                f"kernel larger than memory: ELF segment {i} "
                f"[{ph.paddr:#x}, {ph.paddr + ph.memsz:#x}) is outside guest RAM"
            )
    # Everything is checked before the first byte is written.
    mv = memoryview(image)
    for _, ph in loads:
        memory.write(ph.paddr, mv[ph.offset : ph.offset + ph.filesz])
        if ph.memsz > ph.filesz:
            memory.fill(ph.paddr + ph.filesz, ph.memsz - ph.filesz)  # the bss
    segments = tuple((ph.paddr, ph.filesz, ph.memsz) for _, ph in loads)
    return LoadedElf(
        entry_gpa=entry,
        pvh_entry_gpa=elf.pvh_entry,
        load_gpa=min(s[0] for s in segments),
        end_gpa=max(s[0] + s[2] for s in segments),
        segments=segments,
    )
