"""bzImage loader: validate the Linux setup header and place the protected-mode kernel.

What it is: the loader half of the Linux x86 boot protocol for the 64-bit
entry (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"). It parses the
setup header at 0x1f1, refuses images it cannot boot with a one-line
`LoaderError`, copies the protected-mode kernel (everything after the
real-mode setup sectors) to its load address in guest RAM, and returns a
`LoadedBzImage`: the entry point (load address + 0x200), the setup header
bytes the zero page starts from, and the range of RAM the kernel will use.

What it is not: it writes no boot_params (`params.py` does) and never runs the
real-mode setup code: kvmpy enters the kernel in long mode.

Where the kernel goes: at `pref_address` (protocol 2.10+, the kernel's
LOAD_PHYSICAL_ADDR) when it is page aligned and lies between 1 MiB and the
MMIO hole (so kvmpy's 4 GiB identity map covers it), else at `layout.HIMEM`.
A relocatable kernel's decompressor aligns its own address up to
`kernel_alignment` and never goes below LOAD_PHYSICAL_ADDR
(arch/x86/boot/compressed/head_64.S, startup_64), then needs `init_size`
bytes from there; `end_gpa` accounts for that so nothing else is placed on top of it.

Learned from rust-vmm linux-loader (src/loader/x86_64/bzimage/mod.rs).
"""

from __future__ import annotations

from typing import NamedTuple

from kvmpy import layout
from kvmpy.boot import bootparam as bp
from kvmpy.errors import LoaderError
from kvmpy.memory import GuestMemory

MIN_VERSION = 0x0206  # cmdline_size exists from 2.06; older kernels are not worth a path
XLOADFLAGS_VERSION = 0x020C  # 2.12: first protocol that can say "I have a 64-bit entry"
PREF_ADDRESS_VERSION = 0x020A  # 2.10: pref_address, init_size, min_alignment
_VERSION_END = 0x208  # bytes needed to read boot_flag, the magic and the version
_HEADER_MIN_END = 0x23C  # a 2.06 header reaches through cmdline_size
_SECTOR = 512


def _version(v: int) -> str:
    return f"{v >> 8}.{v & 0xFF:02d}"


class SetupHeader(NamedTuple):
    """The setup header as the image declares it (boot.rst field names).

    `raw` is bytes 0x1f1 up to the header's own end (0x202 + the byte at
    0x201): what the 64-bit protocol says a loader copies into boot_params.
    """

    raw: bytes
    setup_sects: int  # as stored; 0 means 4
    syssize: int
    version: int
    loadflags: int
    code32_start: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: int
    min_alignment: int
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code at the start of the file: the boot sector plus setup."""
        return ((self.setup_sects or 4) + 1) * _SECTOR

    @property
    def end(self) -> int:
        """One past the header's last byte, as an offset in the image and in boot_params."""
        return bp.SETUP_HEADER_START + len(self.raw)

    @property
    def version_str(self) -> str:
        return _version(self.version)

    def field(self, name: str) -> int:
        """Any setup header field by its boot.rst name (0 if the header is too short for it)."""
        offset, _ = bp.SETUP_HEADER_FIELDS[name]
        padded = bytearray(bp.SETUP_HEADER_LIMIT)
        padded[bp.SETUP_HEADER_START : self.end] = self.raw
        return bp.get(padded, name) if offset < self.end else 0


class LoadedBzImage(NamedTuple):
    """What `load_bzimage` put in guest RAM and where the kernel starts."""

    header: SetupHeader
    load_gpa: int  # first byte of the protected-mode kernel
    load_size: int  # bytes copied there
    run_gpa: int  # where the decompressor will put the kernel (before any KASLR)
    end_gpa: int  # one past the last byte the kernel uses before it reads the e820 map

    @property
    def entry_gpa(self) -> int:
        """The 64-bit entry point (boot.rst, "64-bit Boot Protocol")."""
        return self.load_gpa + bp.ENTRY_64_OFFSET

    @property
    def version(self) -> int:
        return self.header.version


def parse_setup_header(image: bp.Image) -> SetupHeader:
    """Parse and validate the setup header at 0x1f1; raise `LoaderError` naming the fault."""
    n = len(image)
    if n < _VERSION_END:
        raise LoaderError(f"truncated bzImage: {n} bytes, too short for a setup header")
    boot_flag = bp.get(image, "boot_flag")
    if boot_flag != bp.BOOT_FLAG:
        raise LoaderError(
            f"wrong magic: boot_flag at 0x1fe is {boot_flag:#06x}, expected {bp.BOOT_FLAG:#06x}"
        )
    magic = bytes(image[0x202:0x206])
    if magic != bp.SETUP_HEADER_MAGIC:
        raise LoaderError(f"wrong magic: {magic!r} at 0x202, expected b'HdrS' (not a bzImage)")
    version = bp.get(image, "version")
    if version < MIN_VERSION:
        raise LoaderError(
            f"boot protocol {_version(version)} is too old: kvmpy needs 2.06 or newer"
        )
    if version >> 8 != 2:
        raise LoaderError(
            f"boot protocol {_version(version)} is too new: kvmpy knows protocol 2.x"
        )
    end = min(0x202 + image[0x201], bp.SETUP_HEADER_LIMIT)
    if end < _HEADER_MIN_END:
        raise LoaderError(
            f"malformed setup header: its jump at 0x200 ends it at {end:#x}, "
            f"protocol {_version(version)} needs at least {_HEADER_MIN_END:#x}"
        )
    if n < end:
        raise LoaderError(f"truncated bzImage: {n} bytes, the setup header ends at {end:#x}")
    raw = bytes(image[bp.SETUP_HEADER_START : end])
    padded = bytearray(bp.SETUP_HEADER_LIMIT)
    padded[bp.SETUP_HEADER_START : end] = raw

    def field(name: str) -> int:
        return bp.get(padded, name)

    return SetupHeader(
        raw=raw,
        setup_sects=field("setup_sects"),
        syssize=field("syssize"),
        version=version,
        loadflags=field("loadflags"),
        code32_start=field("code32_start"),
        initrd_addr_max=field("initrd_addr_max"),
        kernel_alignment=field("kernel_alignment"),
        relocatable_kernel=field("relocatable_kernel"),
        min_alignment=field("min_alignment") if version >= PREF_ADDRESS_VERSION else 0,
        xloadflags=field("xloadflags") if version >= XLOADFLAGS_VERSION else 0,
        cmdline_size=field("cmdline_size"),
        pref_address=field("pref_address") if version >= PREF_ADDRESS_VERSION else 0,
        init_size=field("init_size") if version >= PREF_ADDRESS_VERSION else 0,
    )


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def _region_end(memory: GuestMemory, gpa: int) -> int | None:
    """End of the RAM region holding `gpa`, or None if `gpa` is not RAM."""
    for region in memory:
        if region.gpa <= gpa < region.end:
            return region.end
    return None


def check_64bit_capable(header: SetupHeader) -> None:
    """Refuse kernels kvmpy cannot enter in long mode, naming why."""
    if not header.loadflags & bp.LOADED_HIGH:
        raise LoaderError(
            "not a bzImage: loadflags LOADED_HIGH is clear (a zImage loaded low is not supported)"
        )
    if header.version < XLOADFLAGS_VERSION:
        raise LoaderError(
            f"not 64-bit capable: boot protocol {header.version_str} has no xloadflags "
            "to declare a 64-bit entry (2.12 or newer needed)"
        )
    if not header.xloadflags & bp.XLF_KERNEL_64:
        raise LoaderError(
            "not 64-bit capable: xloadflags lacks XLF_KERNEL_64 (a 32-bit kernel?)"
        )


def load_bzimage(memory: GuestMemory, image: bytes | bytearray | memoryview) -> LoadedBzImage:
    """Validate `image`, copy its protected-mode kernel into `memory`, return what was loaded."""
    header = parse_setup_header(image)
    check_64bit_capable(header)
    n = len(image)
    setup_size = header.setup_size
    if n <= setup_size:
        raise LoaderError(
            f"truncated bzImage: {n} bytes, no kernel after {setup_size} bytes of setup"
        )
    if header.syssize:
        # build.c pads the kernel to syssize paragraphs; a signature may follow it.
        load_size = header.syssize * 16
        if n < setup_size + load_size:
            raise LoaderError(
                f"truncated bzImage: {n} bytes, the header says {setup_size + load_size}"
            )
    else:
        load_size = n - setup_size

    relocatable = header.relocatable_kernel != 0
    align = header.kernel_alignment
    if relocatable and (align == 0 or align & (align - 1)):
        raise LoaderError(f"bad kernel_alignment {align:#x}: not a power of two")

    pref = header.pref_address
    load_gpa = layout.HIMEM
    if layout.HIMEM <= pref < layout.MMIO_HOLE and pref % 0x1000 == 0:
        load_gpa = pref
    # Where startup_64 decompresses to: aligned up, never below LOAD_PHYSICAL_ADDR.
    run_gpa = load_gpa
    if relocatable:
        run_gpa = _align_up(load_gpa, align)
    if pref:
        run_gpa = max(run_gpa, pref)
    end_gpa = max(load_gpa + load_size, run_gpa + header.init_size)

    ram_end = _region_end(memory, load_gpa)
    if ram_end is None or end_gpa > ram_end:
        where = (
            f"RAM at {load_gpa:#x} ends at {ram_end:#x}"
            if ram_end is not None
            else f"there is no RAM at {load_gpa:#x}"
        )
        raise LoaderError(
            f"kernel larger than memory: it needs guest RAM up to {end_gpa:#x} "
            f"(load {load_size:#x} bytes, init_size {header.init_size:#x}); {where}"
        )
    memory.write(load_gpa, memoryview(image)[setup_size : setup_size + load_size])
    return LoadedBzImage(
        header=header, load_gpa=load_gpa, load_size=load_size, run_gpa=run_gpa, end_gpa=end_gpa
    )
