"""The zero page: `struct boot_params` for entering Linux at its 64-bit entry.

What it is: the configurator for the bzImage and ELF 64-bit entries. It
builds the 4096-byte boot_params the kernel finds through RSI, following
boot.rst ("64-bit Boot Protocol": zero the page, copy the setup header from
0x1f1 up to 0x202 + the byte at 0x201, then fill in the loader's fields) and
zero-page.rst for the offsets. kvmpy fills:

- type_of_loader 0xff (no assigned ID), loadflags |= CAN_USE_HEAP with
  heap_end_ptr, code32_start = where the protected-mode kernel was loaded;
- cmd_line_ptr / ext_cmd_line_ptr, ramdisk_image / ramdisk_size and their
  ext_ halves (the high 32 bits, zero-page.rst 0x0c0..0x0c8);
- hardware_subarch = X86_SUBARCH_PC, setup_data = 0 (no chained data);
- e820_entries and e820_table (at most 128 entries); acpi_rsdp_addr if given.

A vmlinux has no setup header, so for it kvmpy writes the few header fields
the kernel reads (boot_flag, "HdrS", version, kernel_alignment, cmdline_size),
much as Firecracker's configure_64bit_boot does.

What it is not: it loads nothing and never sets registers; the machine puts
the returned gpa in RSI. The sentinel at 0x1ef stays 0 because only the header
from 0x1f1 is copied (zero-page.rst: a nonzero sentinel makes the kernel scrub).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmpy import layout
from kvmpy.boot import bootparam as bp
from kvmpy.boot.bzimage import SetupHeader
from kvmpy.boot.cmdline import DEFAULT_MAX_LEN, Cmdline
from kvmpy.boot.e820 import E820Entry
from kvmpy.boot.initrd import LoadedInitrd
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory

# boot.rst: heap_end_ptr is "the offset (from the beginning of the real-mode
# code) of the end of the setup stack/heap, minus 0x0200". The real-mode code
# never runs under kvmpy; this is the conventional value for setup at X and
# the command line at X + 0x10000.
HEAP_END_PTR = 0xFE00
# For a vmlinux: the header fields kvmpy writes are those of protocol 2.15, and
# the kernel walks setup_data (zero here) only from 2.09 on (setup.c parse_setup_data).
SYNTHETIC_VERSION = 0x020F
SYNTHETIC_KERNEL_ALIGNMENT = 0x0100_0000  # as Firecracker; read only by a decompressor


def _lo(value: int) -> int:
    return value & 0xFFFF_FFFF


def _hi(value: int) -> int:
    return value >> 32


def build_boot_params(
    *,
    e820: Sequence[E820Entry],
    cmdline: Cmdline | None = None,
    setup_header: SetupHeader | None = None,
    kernel_load_gpa: int = layout.HIMEM,
    initrd: LoadedInitrd | None = None,
    acpi_rsdp_gpa: int = 0,
) -> bytearray:
    """The zero page as bytes (see the module docstring)."""
    if len(e820) > bp.E820_MAX_ENTRIES_ZEROPAGE:
        raise ConfigError(
            f"e820 map has {len(e820)} entries, boot_params holds "
            f"{bp.E820_MAX_ENTRIES_ZEROPAGE}"
        )
    page = bytearray(bp.BOOT_PARAMS_SIZE)
    if setup_header is not None:
        page[bp.SETUP_HEADER_START : setup_header.end] = setup_header.raw
    else:
        bp.put(page, "boot_flag", bp.BOOT_FLAG)
        page[0x202:0x206] = bp.SETUP_HEADER_MAGIC
        bp.put(page, "version", SYNTHETIC_VERSION)
        bp.put(page, "loadflags", bp.LOADED_HIGH)
        bp.put(page, "kernel_alignment", SYNTHETIC_KERNEL_ALIGNMENT)
        bp.put(page, "cmdline_size", DEFAULT_MAX_LEN)

    bp.put(page, "type_of_loader", bp.TYPE_OF_LOADER_UNDEFINED)
    bp.put(page, "loadflags", bp.get(page, "loadflags") | bp.CAN_USE_HEAP)
    bp.put(page, "heap_end_ptr", HEAP_END_PTR)
    bp.put(page, "code32_start", _lo(kernel_load_gpa))
    bp.put(page, "hardware_subarch", bp.X86_SUBARCH_PC)
    bp.put(page, "setup_data", 0)

    if cmdline is not None:
        bp.put(page, "cmd_line_ptr", _lo(cmdline.gpa))
        bp.put(page, "ext_cmd_line_ptr", _hi(cmdline.gpa))
    if initrd is not None:
        bp.put(page, "ramdisk_image", _lo(initrd.gpa))
        bp.put(page, "ext_ramdisk_image", _hi(initrd.gpa))
        bp.put(page, "ramdisk_size", _lo(initrd.size))
        bp.put(page, "ext_ramdisk_size", _hi(initrd.size))
    if acpi_rsdp_gpa:
        bp.put(page, "acpi_rsdp_addr", acpi_rsdp_gpa)

    bp.put(page, "e820_entries", len(e820))
    for i, entry in enumerate(e820):
        bp.E820_ENTRY.pack_into(
            page, bp.E820_TABLE + i * bp.E820_ENTRY.size, entry.addr, entry.size, entry.type
        )
    return page


def write_boot_params(
    memory: GuestMemory,
    *,
    e820: Sequence[E820Entry],
    cmdline: Cmdline | None = None,
    setup_header: SetupHeader | None = None,
    kernel_load_gpa: int = layout.HIMEM,
    initrd: LoadedInitrd | None = None,
    acpi_rsdp_gpa: int = 0,
    gpa: int = layout.ZERO_PAGE,
) -> int:
    """Build the zero page and write it at `gpa`; returns `gpa` (the value for RSI)."""
    page = build_boot_params(
        e820=e820,
        cmdline=cmdline,
        setup_header=setup_header,
        kernel_load_gpa=kernel_load_gpa,
        initrd=initrd,
        acpi_rsdp_gpa=acpi_rsdp_gpa,
    )
    memory.write(gpa, page)
    return gpa
