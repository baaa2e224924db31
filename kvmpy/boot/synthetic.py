"""Minimal, valid kernel images built in memory: a bzImage shell and an ELF64 vmlinux.

What it is: builders that produce exactly what the loaders accept, field by
field as boot.rst and the ELF gABI lay them out, around any payload. Unit
tests derive malformed images from them, fuzzers seed from them, and KVM tests
can wrap a tiny test guest so it is entered through the real bzImage or PVH
path without a Linux kernel.

What it is not: a kernel. The payload is whatever the caller passes; nothing
here compresses or links.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from kvmpy.boot import bootparam as bp
from kvmpy.boot.elf import (
    EHDR,
    ELF_MAGIC,
    EM_X86_64,
    ET_EXEC,
    NHDR,
    PHDR,
    PT_LOAD,
    PT_NOTE,
    XEN_ELFNOTE_PHYS32_ENTRY,
    XEN_NOTE_NAME,
)

HEADER_END = 0x26C  # a protocol 2.15 header: through kernel_info_offset


def make_bzimage(
    kernel: bytes = b"\xf4" * 0x400,
    *,
    version: int = 0x020F,
    setup_sects: int = 4,
    loadflags: int = bp.LOADED_HIGH,
    xloadflags: int = bp.XLF_KERNEL_64 | bp.XLF_CAN_BE_LOADED_ABOVE_4G,
    relocatable_kernel: int = 1,
    kernel_alignment: int = 0x20_0000,
    pref_address: int = 0x100_0000,
    init_size: int | None = None,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFF_FFFF,
    header_end: int = HEADER_END,
    payload: bytes = b"",
) -> bytes:
    """A bzImage whose protected-mode part is `kernel`, padded to whole paragraphs.

    Shaped like a real one (arch/x86/boot/header.S and tools/build.c): the boot
    sector and setup sectors, then the kernel, `syssize` covering it. A `payload`
    (a compressed vmlinux, as `kvmpy.boot.unpack` reads it) follows `kernel`, and
    payload_offset / payload_length locate it.
    """
    if payload:
        kernel, payload_offset = kernel + payload, len(kernel)
    setup_size = ((setup_sects or 4) + 1) * 512
    syssize = (len(kernel) + 15) // 16
    image = bytearray(setup_size)
    put = {
        "setup_sects": setup_sects,
        "syssize": syssize,
        "boot_flag": bp.BOOT_FLAG,
        "jump": 0xEB | (header_end - 0x202) << 8,
        "version": version,
        "loadflags": loadflags,
        "code32_start": 0x10_0000,
        "initrd_addr_max": initrd_addr_max,
        "kernel_alignment": kernel_alignment,
        "relocatable_kernel": relocatable_kernel,
        "xloadflags": xloadflags,
        "cmdline_size": cmdline_size,
        "pref_address": pref_address,
        "init_size": init_size if init_size is not None else 2 * syssize * 16 + 0x10_0000,
    }
    if payload:
        put |= {"payload_offset": payload_offset, "payload_length": len(payload)}
    for name, value in put.items():
        bp.put(image, name, value)
    image[0x202:0x206] = bp.SETUP_HEADER_MAGIC
    # A real boot sector has 0xff at 0x1ef, boot_params' sentinel: it must not be copied.
    image[bp.BOOT_PARAMS_FIELDS["sentinel"][0]] = 0xFF
    return bytes(image) + kernel.ljust(syssize * 16, b"\0")


@dataclass(frozen=True)
class Segment:
    """A PT_LOAD segment for `make_elf`: `data` at `paddr`, zero-filled up to `memsz`."""

    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int | None = None  # defaults to paddr (identity-mapped)


def note(name: bytes, ntype: int, desc: bytes, align: int = 4) -> bytes:
    """One ELF note: header, padded name, padded descriptor (gABI "Note Section")."""

    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % align)

    return NHDR.pack(len(name), len(desc), ntype) + pad(name) + pad(desc)


def pvh_note(entry: int) -> bytes:
    """XEN_ELFNOTE_PHYS32_ENTRY as Linux writes it: an 8-byte _ASM_PTR."""
    return note(XEN_NOTE_NAME, XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<Q", entry))


def make_elf(
    segments: Sequence[Segment],
    entry: int,
    *,
    notes: bytes = b"",
    e_type: int = ET_EXEC,
    machine: int = EM_X86_64,
) -> bytes:
    """An ELF64 little-endian executable with `segments` and, if `notes`, one PT_NOTE."""
    phnum = len(segments) + (1 if notes else 0)
    offset = EHDR.size + phnum * PHDR.size
    phdrs = []
    body = bytearray()

    def place(data: bytes) -> int:
        nonlocal body
        pad = -(offset + len(body)) % 16
        body += b"\0" * pad
        at = offset + len(body)
        body += data
        return at

    for seg in segments:
        at = place(seg.data)
        memsz = seg.memsz if seg.memsz is not None else len(seg.data)
        vaddr = seg.vaddr if seg.vaddr is not None else seg.paddr
        phdrs.append(PHDR.pack(PT_LOAD, 7, at, vaddr, seg.paddr, len(seg.data), memsz, 16))
    if notes:
        at = place(notes)
        phdrs.append(PHDR.pack(PT_NOTE, 4, at, 0, 0, len(notes), len(notes), 4))
    ident = ELF_MAGIC + bytes([2, 1, 1]) + b"\0" * 9
    ehdr = EHDR.pack(
        ident, e_type, machine, 1, entry, EHDR.size, 0, 0, EHDR.size, PHDR.size, phnum, 64, 0, 0
    )
    return ehdr + b"".join(phdrs) + bytes(body)
