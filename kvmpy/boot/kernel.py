"""Load a Linux kernel of whichever kind the file is: bzImage or ELF vmlinux.

What it is: the one entry point the machine calls. `load_kernel` reads the
file, sniffs it ("\\x7fELF" at 0: an ELF vmlinux; "HdrS" at 0x202: a bzImage),
hands it to the matching loader and returns a `LoadedKernel` that says how to
enter it:

- "bzimage": long mode at `entry_gpa`, RSI = zero page (`params.py`).
- "elf64":   long mode at `entry_gpa` (startup_64), RSI = zero page built
             without a setup header; or, for a bzImage given with its kernel
             as unpacked on the host (`unpacked=`, kvmpy.boot.unpack), that ELF
             with the bzImage's setup header.
- "pvh":     32-bit protected mode, paging off, at `entry_gpa`, EBX =
             hvm_start_info (`pvh.py`). Chosen for a vmlinux with the PVH note
             unless `prefer_pvh=False`.

Anything else, and any file that cannot be read, raises a one-line `LoaderError`
that names what was seen.

What it is not: it writes no boot parameters and touches no vCPU.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Literal, NamedTuple

from kvmpy.boot import bootparam as bp
from kvmpy.boot.bzimage import SetupHeader, check_64bit_capable, load_bzimage, parse_setup_header
from kvmpy.boot.cmdline import DEFAULT_MAX_LEN
from kvmpy.boot.elf import ELF_MAGIC, load_elf, parse_elf
from kvmpy.errors import LoaderError
from kvmpy.memory import GuestMemory

Protocol = Literal["bzimage", "elf64", "pvh"]

# What a file that is not a kernel usually is, so the error can say so.
_NOT_KERNELS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x1f\x8b", "gzip data (a compressed vmlinux? decompress it first)"),
    (0, b"\x28\xb5\x2f\xfd", "zstd data (decompress it first)"),
    (0, b"\xfd7zXZ\x00", "xz data (decompress it first)"),
    (0, b"070701", "a cpio archive (an initramfs, not a kernel)"),
    (0, b"070702", "a cpio archive (an initramfs, not a kernel)"),
    (0, b"MZ", "a PE/EFI binary without a Linux setup header"),
    (0, b"#!", "a script"),
    (0x438, b"\x53\xef", "an ext2/3/4 file system image"),
)


class LoadedKernel(NamedTuple):
    """A kernel in guest RAM and how to enter it (see the module docstring)."""

    protocol: Protocol
    entry_gpa: int
    load_gpa: int
    end_gpa: int  # one past the last byte the kernel needs; the initrd goes above it
    setup_header: SetupHeader | None = None  # bzImage only
    entry64_gpa: int | None = None  # an ELF's 64-bit entry, also when booting it by PVH
    unpacked: bool = False  # a bzImage booted from its unpacked kernel (no decompressor)

    @property
    def cmdline_max(self) -> int:
        """Longest command line the kernel accepts, NUL excluded."""
        if self.setup_header is not None and self.setup_header.cmdline_size:
            return self.setup_header.cmdline_size
        return DEFAULT_MAX_LEN

    @property
    def initrd_addr_max(self) -> int | None:
        """Highest address the initrd may occupy, if the kernel states one."""
        if self.setup_header is None:
            return None
        return self.setup_header.initrd_addr_max or None


def describe(data: bytes) -> str:
    """A short phrase for what a non-kernel file looks like."""
    if not data:
        return "an empty file"
    for offset, magic, what in _NOT_KERNELS:
        if data[offset : offset + len(magic)] == magic:
            return what
    head = data[:16]
    if all(0x20 <= b < 0x7F or b in b"\t\n\r" for b in head):
        return f"text starting {head.decode('ascii')!r}"
    return f"unknown data starting {head[:8].hex(' ')}"


def not_a_kernel(head: bytes) -> LoaderError:
    """The error for a file that is neither kind, saying what it looks like instead."""
    return LoaderError(f"not a kernel: {describe(head)}; "
                       "expected an ELF vmlinux or a bzImage ('HdrS' at 0x202)")


def load_kernel(memory: GuestMemory, path: str | Path, *, prefer_pvh: bool = True,
                unpacked: Path | None = None) -> LoadedKernel:
    """Load the kernel at `path` into `memory`; LoaderError if it is not one kvmpy can boot.

    `unpacked`: for a bzImage, the ELF its kernel was unpacked to on the host
    (kvmpy.boot.unpack), loaded instead of the decompressor.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise LoaderError(f"cannot read kernel {path}: {e.strerror or e}") from None
    try:
        return load_kernel_bytes(memory, data, prefer_pvh=prefer_pvh, unpacked=unpacked)
    except LoaderError as e:
        raise LoaderError(f"kernel {path}: {e}") from None


def check_kernel_file(path: str | Path) -> tuple[Protocol, int]:
    """(how it boots, its command-line limit) for the kernel at `path`, reading only headers.

    The checks `load_kernel` makes before it copies anything, on a read-only mapping
    of the file (only the header pages are read): `kvmpy.checks` calls it to refuse a
    file that is not a kernel before any VM exists. PVH is assumed wherever the note
    is; the loader decides for real.
    """
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise not_a_kernel(b"")
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as image:
                if image[:4] == ELF_MAGIC:
                    elf = parse_elf(image)
                    return ("pvh" if elf.pvh_entry is not None else "elf64"), DEFAULT_MAX_LEN
                if image[0x202:0x206] == bp.SETUP_HEADER_MAGIC:
                    header = parse_setup_header(image)
                    check_64bit_capable(header)
                    return "bzimage", header.cmdline_size or DEFAULT_MAX_LEN
                raise not_a_kernel(image[:0x440])
    except OSError as e:
        raise LoaderError(f"cannot read kernel {path}: {e.strerror or e}") from None
    except LoaderError as e:
        raise LoaderError(f"kernel {path}: {e}") from None


def load_kernel_bytes(
    memory: GuestMemory, data: bytes | bytearray | memoryview, *, prefer_pvh: bool = True,
    unpacked: Path | None = None,
) -> LoadedKernel:
    """`load_kernel` for an image already in memory (tests, fuzzers)."""
    if bytes(data[:4]) == ELF_MAGIC:
        elf = load_elf(memory, data)
        if prefer_pvh and elf.pvh_entry_gpa is not None:
            protocol: Protocol = "pvh"
            entry = elf.pvh_entry_gpa
        else:
            protocol, entry = "elf64", elf.entry_gpa
        return LoadedKernel(
            protocol=protocol,
            entry_gpa=entry,
            load_gpa=elf.load_gpa,
            end_gpa=elf.end_gpa,
            entry64_gpa=elf.entry_gpa,
        )
    if bytes(data[0x202:0x206]) == bp.SETUP_HEADER_MAGIC:
        if unpacked is not None:
            return _load_unpacked(memory, data, unpacked)
        bz = load_bzimage(memory, data)
        return LoadedKernel(
            protocol="bzimage",
            entry_gpa=bz.entry_gpa,
            load_gpa=bz.load_gpa,
            end_gpa=bz.end_gpa,
            setup_header=bz.header,
        )
    raise not_a_kernel(bytes(data[:0x440]))


def _load_unpacked(memory: GuestMemory, image: bytes | bytearray | memoryview,
                   path: Path) -> LoadedKernel:
    """The bzImage `image` booted from its kernel as unpacked into the ELF at `path`."""
    header = parse_setup_header(image)
    check_64bit_capable(header)
    # mapped, not read: the segments go from the page cache straight into guest RAM
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            with memoryview(mapped) as vmlinux:
                elf = load_elf(memory, vmlinux)
    except OSError as e:
        raise LoaderError(f"cannot read its unpacked kernel {path}: {e.strerror or e}") from None
    return LoadedKernel(protocol="elf64", entry_gpa=elf.entry_gpa, load_gpa=elf.load_gpa,
                        end_gpa=elf.end_gpa, setup_header=header, entry64_gpa=elf.entry_gpa,
                        unpacked=True)
