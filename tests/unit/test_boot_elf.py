"""ELF vmlinux loader: segments at p_paddr, bss zeroed, entry made physical, PVH note found."""

import glob
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy import layout
from kvmpy.boot.elf import (
    EHDR,
    PHDR,
    XEN_ELFNOTE_PHYS32_ENTRY,
    XEN_NOTE_NAME,
    load_elf,
    parse_elf,
)
from kvmpy.boot.synthetic import Segment, make_elf, note, pvh_note
from kvmpy.errors import LoaderError
from kvmpy.memory import GuestMemory

MiB = layout.MiB
KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # __START_KERNEL_map
SHARED = GuestMemory.anonymous(64 * MiB)


def memory(size: int = 64 * MiB, fill: int = 0) -> GuestMemory:
    mem = GuestMemory.anonymous(size)
    if fill:
        mem.fill(layout.HIMEM, 32 * MiB, fill)
    return mem


def linux_like(pvh: int | None = 0x100_0850, extra_notes: bytes = b"") -> bytes:
    """Shaped like a vmlinux: text at 16 MiB linked at 0xffffffff81000000, e_entry physical."""
    text = b"\x48\x31\xc0" * 100
    data = b"D" * 64
    notes = extra_notes + (pvh_note(pvh) if pvh is not None else b"")
    return make_elf(
        [
            Segment(0x100_0000, text, vaddr=KERNEL_MAP + 0x100_0000),
            Segment(0x120_0000, data, memsz=0x1000, vaddr=KERNEL_MAP + 0x120_0000),
            Segment(0x130_0000, b"P" * 16, vaddr=0),  # .data..percpu is linked at 0
        ],
        entry=0x100_0000,
        notes=notes,
    )


def message(image: bytes, mem: GuestMemory | None = None) -> str:
    with pytest.raises(LoaderError) as info:
        load_elf(mem or memory(), image)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_segments_load_at_paddr_and_bss_is_zeroed():
    mem = memory(fill=0xAA)
    loaded = load_elf(mem, linux_like())
    assert mem.read(0x100_0000, 300) == b"\x48\x31\xc0" * 100
    assert mem.read(0x120_0000, 64) == b"D" * 64
    assert mem.read(0x120_0040, 0x1000 - 64) == bytes(0x1000 - 64)  # bss zeroed
    assert mem.read_u8(0x120_1000) == 0xAA  # and not one byte more
    assert mem.read(0x130_0000, 16) == b"P" * 16
    assert loaded.load_gpa == 0x100_0000
    assert loaded.end_gpa == 0x130_0010
    assert loaded.segments == (
        (0x100_0000, 300, 300), (0x120_0000, 64, 0x1000), (0x130_0000, 16, 16)
    )


def test_physical_e_entry_is_kept():
    loaded = load_elf(memory(), linux_like())
    assert loaded.entry_gpa == 0x100_0000


def test_virtual_e_entry_is_converted_through_its_segment():
    image = make_elf([Segment(0x100_0000, b"\x90" * 0x200, vaddr=KERNEL_MAP + 0x100_0000)],
                     entry=KERNEL_MAP + 0x100_0123)
    assert load_elf(memory(), image).entry_gpa == 0x100_0123


def test_pvh_note_is_found_among_other_xen_and_gnu_notes():
    others = (
        note(b"GNU\0", 3, b"\x01" * 20)
        + note(XEN_NOTE_NAME, 6, b"linux\0")
        + note(b"Xem\0", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<Q", 0x1234_5678))
        + note(b"Xen\0", 17, b"\x01\x88\0\0")
    )
    loaded = load_elf(memory(), linux_like(pvh=0x100_0850, extra_notes=others))
    assert loaded.pvh_entry_gpa == 0x100_0850


def test_pvh_note_with_a_4_byte_descriptor():
    notes = note(XEN_NOTE_NAME, XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", 0x100_0040))
    image = make_elf([Segment(0x100_0000, b"\x90" * 0x100)], entry=0x100_0000, notes=notes)
    assert load_elf(memory(), image).pvh_entry_gpa == 0x100_0040


def test_no_note_means_no_pvh_entry():
    assert load_elf(memory(), linux_like(pvh=None)).pvh_entry_gpa is None


def _patch(image: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(image)
    struct.pack_into("<" + fmt, out, offset, value)
    return bytes(out)


GOOD = linux_like()
PH0 = EHDR.size  # first program header
NOTE_PH = EHDR.size + 3 * PHDR.size


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (GOOD[:40], "truncated ELF: 40 bytes, the ELF header needs 64"),
        (b"\x7fELG" + GOOD[4:], "wrong magic: b'\\x7fELG', expected b'\\x7fELF'"),
        (_patch(GOOD, 4, "B", 1), "not a 64-bit ELF: EI_CLASS is 1 (need 2, ELFCLASS64)"),
        (_patch(GOOD, 5, "B", 2), "not a little-endian ELF: EI_DATA is 2 (need 1)"),
        (_patch(GOOD, 6, "B", 0), "unknown ELF version 0 in e_ident"),
        (_patch(GOOD, 18, "H", 3), "not an x86-64 ELF: e_machine is 3 (need 62, EM_X86_64)"),
        (_patch(GOOD, 16, "H", 3), "not an executable ELF: e_type is 3 (need 2, ET_EXEC)"),
        (_patch(GOOD, 54, "H", 32), "malformed ELF: e_phentsize is 32, expected 56"),
        (_patch(GOOD, 56, "H", 0), "malformed ELF: no program headers"),
        (_patch(GOOD, 56, "H", 0xFFFF), "malformed ELF: 65535 program headers (at most 256)"),
        (GOOD[:PH0 + 60], f"truncated ELF: {PH0 + 60} bytes, program headers end at "
                          f"{PH0 + 4 * PHDR.size:#x}"),
        (_patch(GOOD, PH0 + 32, "Q", 0x10_0000),  # filesz of segment 0
         "truncated ELF: " + str(len(GOOD)) + " bytes, segment 0 ends at "
         + hex(struct.unpack_from("<Q", GOOD, PH0 + 8)[0] + 0x10_0000)),
        (_patch(GOOD, PH0 + 40, "Q", 1),  # memsz < filesz
         "malformed ELF: segment 0 has p_filesz 0x12c > p_memsz 0x1"),
        (_patch(GOOD, 24, "Q", 0x200_0000), "bad ELF entry point 0x2000000: outside every "
                                            "PT_LOAD segment"),
        (_patch(GOOD, NOTE_PH + 32, "Q", 20),  # note segment cut inside the PVH note
         "malformed ELF: note in segment 3 runs past the segment"),
    ],
)
def test_malformed_elves_name_what_is_wrong(image, expected):
    assert message(image) == expected


def test_no_loadable_segment():
    image = make_elf([Segment(0x100_0000, b"")], entry=0x100_0000)
    assert message(image) == "malformed ELF: no PT_LOAD segment with contents"


def test_segment_below_1mib_is_refused():
    image = make_elf([Segment(0x7000, b"x" * 16)], entry=0x7000)
    assert message(image) == (
        "bad ELF entry point 0x7000: outside [1 MiB, 0xc0000000) where kvmpy enters kernels"
    )
    image = make_elf([Segment(0x7000, b"x" * 16), Segment(0x100_0000, b"y")], entry=0x100_0000)
    assert message(image) == (
        "ELF segment 0 loads at 0x7000, below 1 MiB where kvmpy keeps its boot structures"
    )


def test_segment_outside_ram_is_refused_and_nothing_is_written():
    mem = memory(32 * MiB)
    image = make_elf(
        [Segment(0x100_0000, b"z" * 16), Segment(0x1F0_0000, b"w" * 16, memsz=0x20_0000)],
        entry=0x100_0000,
    )
    assert message(image, mem) == (
        "kernel larger than memory: ELF segment 1 [0x1f00000, 0x2100000) is outside guest RAM"
    )
    assert mem.read(0x100_0000, 16) == bytes(16)


def test_bad_pvh_notes():
    short = note(XEN_NOTE_NAME, XEN_ELFNOTE_PHYS32_ENTRY, b"\x00\x10")
    image = make_elf([Segment(0x100_0000, b"\x90")], entry=0x100_0000, notes=short)
    assert message(image) == "malformed PVH note: 2-byte entry, expected 4 or 8"
    high = note(XEN_NOTE_NAME, XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<Q", 1 << 32))
    image = make_elf([Segment(0x100_0000, b"\x90")], entry=0x100_0000, notes=high)
    assert message(image) == "malformed PVH note: entry 0x100000000 is not a 32-bit address"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1024))
def test_arbitrary_bytes_raise_only_loader_error(data):
    for image in (data, b"\x7fELF\x02\x01\x01" + data):
        try:
            parse_elf(image)
            load_elf(SHARED, image)
        except LoaderError:
            pass


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, NOTE_PH + PHDR.size + 200), st.integers(0, 255)),
                min_size=1, max_size=6))
def test_mutated_elves_raise_only_loader_error(mutations):
    image = bytearray(GOOD)
    for offset, value in mutations:
        image[offset % len(image)] = value
    try:
        loaded = load_elf(SHARED, bytes(image))
    except LoaderError:
        return
    for gpa, filesz, memsz in loaded.segments:
        assert gpa >= layout.HIMEM and filesz <= memsz and SHARED.contains(gpa, memsz)
    assert layout.HIMEM <= loaded.entry_gpa < layout.MMIO_HOLE


REAL = sorted(glob.glob(os.path.expanduser("~/.cache/kvmpy/kernel/*/vmlinux"))) + [
    p for p in os.environ.get("KVMPY_TEST_VMLINUX", "").split(":") if p
]


@pytest.mark.skipif(not REAL, reason="no vmlinux in ~/.cache/kvmpy/kernel")
@pytest.mark.parametrize("path", REAL)
def test_real_vmlinux(path):
    image = Path(path).read_bytes()
    elf = parse_elf(image)
    mem = GuestMemory.anonymous(512 * MiB)
    loaded = load_elf(mem, image)
    # ENTRY(phys_startup_64): the entry is physical, inside the first (text) segment
    assert loaded.entry_gpa == elf.e_entry == loaded.segments[0][0]
    if loaded.pvh_entry_gpa is not None:
        assert loaded.load_gpa <= loaded.pvh_entry_gpa < loaded.end_gpa
    first = elf.loads[0]
    assert mem.read(first.paddr, 64) == image[first.offset : first.offset + 64]
