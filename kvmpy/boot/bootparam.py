"""Offsets and formats of the Linux x86 setup header and `struct boot_params`, named once.

What it is: the field tables of the two structures a bzImage and a 64-bit Linux
entry share, as (offset, struct format) pairs at the offsets the kernel
documents, and `get`/`put` to read or write one field in a buffer. The setup
header sits at 0x1f1 both in the bzImage file and inside boot_params, so one
table serves the parser (`bzimage.py`) and the zero-page builder (`params.py`).

What it is not: it decides nothing. Validation lives in `bzimage.py`, the
values kvmpy writes in `params.py`.

Sources: Documentation/arch/x86/boot.rst ("The real-mode kernel header",
"Details of header fields"), Documentation/arch/x86/zero-page.rst, and
arch/x86/include/uapi/asm/bootparam.h. Learned from rust-vmm linux-loader
(src/loader/bootparam.rs).
"""

from __future__ import annotations

import struct
from mmap import mmap
from typing import TypeAlias

# A kernel image as the parsers take it: in memory, or a read-only mapping of the file
# (`kernel.check_kernel_file` reads only the header pages that way).
Image: TypeAlias = bytes | bytearray | memoryview | mmap

# --- struct setup_header (boot.rst, "The real-mode kernel header") ----------
# name -> (offset in the image and in boot_params, struct format); the protocol
# version that introduced a field is in the comment.
SETUP_HEADER_FIELDS: dict[str, tuple[int, str]] = {
    "setup_sects": (0x1F1, "B"),  # 2.00 (0 means 4)
    "root_flags": (0x1F2, "H"),
    "syssize": (0x1F4, "I"),  # 2.04: protected-mode code size in 16-byte paragraphs
    "ram_size": (0x1F8, "H"),
    "vid_mode": (0x1FA, "H"),
    "root_dev": (0x1FC, "H"),
    "boot_flag": (0x1FE, "H"),  # 0xAA55
    "jump": (0x200, "H"),  # 0xEB, then the header's length - 2: it ends at 0x202 + byte 0x201
    "header": (0x202, "I"),  # "HdrS"
    "version": (0x206, "H"),
    "realmode_swtch": (0x208, "I"),
    "start_sys_seg": (0x20C, "H"),
    "kernel_version": (0x20E, "H"),
    "type_of_loader": (0x210, "B"),
    "loadflags": (0x211, "B"),
    "setup_move_size": (0x212, "H"),
    "code32_start": (0x214, "I"),
    "ramdisk_image": (0x218, "I"),
    "ramdisk_size": (0x21C, "I"),
    "bootsect_kludge": (0x220, "I"),
    "heap_end_ptr": (0x224, "H"),  # 2.01
    "ext_loader_ver": (0x226, "B"),  # 2.02
    "ext_loader_type": (0x227, "B"),
    "cmd_line_ptr": (0x228, "I"),  # 2.02
    "initrd_addr_max": (0x22C, "I"),  # 2.03
    "kernel_alignment": (0x230, "I"),  # 2.05
    "relocatable_kernel": (0x234, "B"),  # 2.05
    "min_alignment": (0x235, "B"),  # 2.10
    "xloadflags": (0x236, "H"),  # 2.12
    "cmdline_size": (0x238, "I"),  # 2.06
    "hardware_subarch": (0x23C, "I"),  # 2.07
    "hardware_subarch_data": (0x240, "Q"),
    "payload_offset": (0x248, "I"),  # 2.08
    "payload_length": (0x24C, "I"),
    "setup_data": (0x250, "Q"),  # 2.09
    "pref_address": (0x258, "Q"),  # 2.10
    "init_size": (0x260, "I"),  # 2.10
    "handover_offset": (0x264, "I"),  # 2.11
    "kernel_info_offset": (0x268, "I"),  # 2.15
}

SETUP_HEADER_START = 0x1F1
SETUP_HEADER_MAGIC = b"HdrS"
BOOT_FLAG = 0xAA55
# boot_params reserves hdr up to 0x290, where edd_mbr_sig_buffer begins (zero-page.rst).
SETUP_HEADER_LIMIT = 0x290
# The 64-bit entry point is 0x200 bytes into the protected-mode kernel (boot.rst,
# "64-bit Boot Protocol").
ENTRY_64_OFFSET = 0x200

# loadflags (boot.rst, "Details of header fields")
LOADED_HIGH = 1 << 0  # protected-mode code is loaded at 0x100000 (bzImage)
KASLR_FLAG = 1 << 1  # set by the kernel itself
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6  # obsolete since 2.07
CAN_USE_HEAP = 1 << 7  # heap_end_ptr is valid

# xloadflags (2.12)
XLF_KERNEL_64 = 1 << 0  # has the legacy 64-bit entry point at 0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4
XLF_5LEVEL = 1 << 5
XLF_5LEVEL_ENABLED = 1 << 6

TYPE_OF_LOADER_UNDEFINED = 0xFF  # "no assigned ID" (boot.rst, type_of_loader)
X86_SUBARCH_PC = 0  # hardware_subarch (2.07)

# --- struct boot_params, the "zero page" (zero-page.rst) ----------------------
BOOT_PARAMS_SIZE = 0x1000
BOOT_PARAMS_FIELDS: dict[str, tuple[int, str]] = {
    "acpi_rsdp_addr": (0x070, "Q"),
    "ext_ramdisk_image": (0x0C0, "I"),  # high 32 bits of ramdisk_image
    "ext_ramdisk_size": (0x0C4, "I"),
    "ext_cmd_line_ptr": (0x0C8, "I"),
    "alt_mem_k": (0x1E0, "I"),
    "e820_entries": (0x1E8, "B"),
    "sentinel": (0x1EF, "B"),  # nonzero: the loader copied too much; the kernel then scrubs
    **SETUP_HEADER_FIELDS,
}
E820_TABLE = 0x2D0  # struct boot_e820_entry e820_table[E820_MAX_ENTRIES_ZEROPAGE]
E820_MAX_ENTRIES_ZEROPAGE = 128
E820_ENTRY = struct.Struct("<QQI")  # addr, size, type: packed, 20 bytes (bootparam.h)


def get(buf: Image, name: str) -> int:
    """Read one boot_params/setup_header field, by name, at its documented offset."""
    offset, fmt = BOOT_PARAMS_FIELDS[name]
    return int(struct.unpack_from("<" + fmt, buf, offset)[0])


def put(buf: bytearray, name: str, value: int) -> None:
    """Write one boot_params/setup_header field, by name, at its documented offset."""
    offset, fmt = BOOT_PARAMS_FIELDS[name]
    struct.pack_into("<" + fmt, buf, offset, value)
