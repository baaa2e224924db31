"""The zero page: every field kvmpy writes is at the offset zero-page.rst and boot.rst give."""

import struct

import pytest

from kvmpy import layout
from kvmpy.boot import bootparam as bp
from kvmpy.boot.bzimage import parse_setup_header
from kvmpy.boot.cmdline import Cmdline
from kvmpy.boot.e820 import E820Entry, E820Type
from kvmpy.boot.initrd import LoadedInitrd
from kvmpy.boot.params import build_boot_params, write_boot_params
from kvmpy.boot.synthetic import make_bzimage
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory

E820 = [
    E820Entry(0, layout.EBDA, E820Type.RAM),
    E820Entry(layout.EBDA, layout.HIMEM - layout.EBDA, E820Type.RESERVED),
    E820Entry(layout.HIMEM, 127 * layout.MiB, E820Type.RAM),
]
IMAGE = make_bzimage(cmdline_size=0x7FF)
HEADER = parse_setup_header(IMAGE)


def u(page: bytes, offset: int, fmt: str) -> int:
    return struct.unpack_from("<" + fmt, page, offset)[0]


def test_documented_offsets():
    # Literal offsets from Documentation/arch/x86/zero-page.rst and boot.rst.
    documented = {
        "acpi_rsdp_addr": 0x070, "ext_ramdisk_image": 0x0C0, "ext_ramdisk_size": 0x0C4,
        "ext_cmd_line_ptr": 0x0C8, "e820_entries": 0x1E8, "sentinel": 0x1EF,
        "setup_sects": 0x1F1, "syssize": 0x1F4, "boot_flag": 0x1FE, "header": 0x202,
        "version": 0x206, "type_of_loader": 0x210, "loadflags": 0x211, "code32_start": 0x214,
        "ramdisk_image": 0x218, "ramdisk_size": 0x21C, "heap_end_ptr": 0x224,
        "cmd_line_ptr": 0x228, "initrd_addr_max": 0x22C, "kernel_alignment": 0x230,
        "relocatable_kernel": 0x234, "xloadflags": 0x236, "cmdline_size": 0x238,
        "hardware_subarch": 0x23C, "setup_data": 0x250, "pref_address": 0x258,
        "init_size": 0x260, "kernel_info_offset": 0x268,
    }
    for name, offset in documented.items():
        assert bp.BOOT_PARAMS_FIELDS[name][0] == offset, name
    assert bp.E820_TABLE == 0x2D0 and bp.E820_ENTRY.size == 20
    assert bp.E820_TABLE + 128 * 20 <= 0xD00  # eddbuf follows at 0xd00


def test_zero_page_from_a_bzimage_header():
    page = build_boot_params(
        e820=E820,
        cmdline=Cmdline(layout.CMDLINE, "console=ttyS0"),
        setup_header=HEADER,
        kernel_load_gpa=0x100_0000,
        initrd=LoadedInitrd(0x7E0_0000, 0x12_3456),
        acpi_rsdp_gpa=0xE_0000,
    )
    assert len(page) == 4096
    assert u(page, 0x1FE, "H") == 0xAA55 and page[0x202:0x206] == b"HdrS"
    assert u(page, 0x206, "H") == 0x020F  # the kernel's own version, copied
    assert u(page, 0x238, "I") == 0x7FF  # cmdline_size copied from the header
    assert page[0x210] == 0xFF  # type_of_loader: undefined
    assert page[0x211] == bp.LOADED_HIGH | bp.CAN_USE_HEAP
    assert u(page, 0x224, "H") == 0xFE00
    assert u(page, 0x214, "I") == 0x100_0000  # code32_start = load address
    assert u(page, 0x228, "I") == layout.CMDLINE and u(page, 0x0C8, "I") == 0
    assert u(page, 0x218, "I") == 0x7E0_0000 and u(page, 0x21C, "I") == 0x12_3456
    assert u(page, 0x0C0, "I") == 0 and u(page, 0x0C4, "I") == 0
    assert u(page, 0x070, "Q") == 0xE_0000
    assert u(page, 0x23C, "I") == 0 and u(page, 0x250, "Q") == 0
    assert page[0x1E8] == 3
    for i, e in enumerate(E820):
        assert struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) == (e.addr, e.size, e.type)
    assert page[0x2D0 + 60 : 0x2D0 + 80] == bytes(20)
    # The image has 0xff at 0x1ef; only the header from 0x1f1 is copied, so the sentinel is 0.
    assert IMAGE[0x1EF] == 0xFF and page[0x1EF] == 0
    # Everything below the header that kvmpy did not set is zero.
    assert page[0x1F0] == 0 and not any(page[0x100:0x1E8])
    # The rest of the header is the image's, byte for byte.
    assert page[0x1F1:0x210] == IMAGE[0x1F1:0x210]
    assert page[0x22C:0x238] == IMAGE[0x22C:0x238]
    assert page[0x258:0x26C] == IMAGE[0x258:0x26C]
    assert not any(page[0x26C:0x2D0])


def test_addresses_above_4gib_use_the_ext_fields():
    page = build_boot_params(
        e820=E820,
        cmdline=Cmdline(0x1_2345_6000, ""),
        initrd=LoadedInitrd(0x2_0000_1000, 0x1_0000_0010),
    )
    assert u(page, 0x228, "I") == 0x2345_6000 and u(page, 0x0C8, "I") == 1
    assert u(page, 0x218, "I") == 0x1000 and u(page, 0x0C0, "I") == 2
    assert u(page, 0x21C, "I") == 0x10 and u(page, 0x0C4, "I") == 1


def test_synthetic_header_for_a_vmlinux():
    page = build_boot_params(e820=E820, cmdline=Cmdline(layout.CMDLINE, "x"))
    assert u(page, 0x1FE, "H") == 0xAA55 and page[0x202:0x206] == b"HdrS"
    assert u(page, 0x206, "H") >= 0x0209  # nonzero: the kernel knows the copy happened
    assert u(page, 0x230, "I") == 0x100_0000
    assert u(page, 0x238, "I") == 2047
    assert page[0x210] == 0xFF
    assert u(page, 0x218, "I") == 0 and u(page, 0x21C, "I") == 0  # no initrd


def test_too_many_e820_entries():
    many = [E820Entry(i * 0x2000, 0x1000, E820Type.RAM) for i in range(129)]
    with pytest.raises(ConfigError, match="e820 map has 129 entries, boot_params holds 128"):
        build_boot_params(e820=many)
    assert build_boot_params(e820=many[:128])[0x1E8] == 128


def test_written_at_the_zero_page():
    mem = GuestMemory.from_buffer(bytearray(0x10000))
    gpa = write_boot_params(mem, e820=E820, setup_header=HEADER)
    assert gpa == layout.ZERO_PAGE
    assert mem.read(gpa, 4096) == bytes(build_boot_params(e820=E820, setup_header=HEADER))
