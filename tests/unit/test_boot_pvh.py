"""PVH start info: start_info.h layout, the initrd as module 0, the e820 map as memmap."""

import struct

import pytest

from kvmpy import layout
from kvmpy.boot.cmdline import Cmdline
from kvmpy.boot.e820 import E820Entry, E820Type
from kvmpy.boot.initrd import LoadedInitrd
from kvmpy.boot.pvh import (
    HVM_MEMMAP_TABLE_ENTRY,
    HVM_MODLIST_ENTRY,
    HVM_START_INFO,
    MAX_MEMMAP_ENTRIES,
    MAX_MODULES,
    build_start_info,
    write_start_info,
)
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory

E820 = [
    E820Entry(0, layout.EBDA, E820Type.RAM),
    E820Entry(layout.EBDA, layout.HIMEM - layout.EBDA, E820Type.RESERVED),
    E820Entry(layout.HIMEM, 63 * layout.MiB, E820Type.RAM),
]


def test_struct_sizes_and_layout_room():
    sizes = (HVM_START_INFO.size, HVM_MODLIST_ENTRY.size, HVM_MEMMAP_TABLE_ENTRY.size)
    assert sizes == (56, 32, 24)
    assert layout.PVH_MODLIST >= layout.PVH_START_INFO + 56 and layout.PVH_MODLIST % 8 == 0
    assert MAX_MODULES >= 1 and MAX_MEMMAP_ENTRIES >= 128
    assert layout.PVH_MEMMAP + MAX_MEMMAP_ENTRIES * 24 <= layout.ZERO_PAGE


def test_start_info_with_initrd_written_at_the_layout_addresses():
    mem = GuestMemory.from_buffer(bytearray(0x10000))
    gpa = write_start_info(
        mem, e820=E820, cmdline=Cmdline(layout.CMDLINE, "console=ttyS0"),
        initrd=LoadedInitrd(0x3E0_0000, 0x1234), rsdp_gpa=0xE_0000,
    )
    assert gpa == layout.PVH_START_INFO
    info = mem.read(gpa, 56)
    # offsets from start_info.h: magic 0, version 4, flags 8, nr_modules 12, modlist_paddr 16,
    # cmdline_paddr 24, rsdp_paddr 32, memmap_paddr 40, memmap_entries 48, reserved 52
    assert struct.unpack_from("<I", info, 0)[0] == 0x336EC578
    assert struct.unpack_from("<I", info, 4)[0] == 1
    assert struct.unpack_from("<I", info, 8)[0] == 0
    assert struct.unpack_from("<I", info, 12)[0] == 1
    assert struct.unpack_from("<Q", info, 16)[0] == layout.PVH_MODLIST
    assert struct.unpack_from("<Q", info, 24)[0] == layout.CMDLINE
    assert struct.unpack_from("<Q", info, 32)[0] == 0xE_0000
    assert struct.unpack_from("<Q", info, 40)[0] == layout.PVH_MEMMAP
    assert struct.unpack_from("<I", info, 48)[0] == 3
    assert mem.read(layout.PVH_MODLIST, 32) == struct.pack("<QQQQ", 0x3E0_0000, 0x1234, 0, 0)
    for i, e in enumerate(E820):
        entry = mem.read(layout.PVH_MEMMAP + 24 * i, 24)
        assert struct.unpack("<QQII", entry) == (e.addr, e.size, e.type, 0)


def test_without_initrd_there_is_no_module_list():
    info, modlist, _ = build_start_info(e820=E820)
    assert struct.unpack_from("<I", info, 12)[0] == 0
    assert struct.unpack_from("<Q", info, 16)[0] == 0
    assert struct.unpack_from("<Q", info, 24)[0] == 0
    assert modlist == b""


def test_limits():
    with pytest.raises(ConfigError, match="room for"):
        build_start_info(e820=[E820Entry(i * 0x2000, 0x1000, E820Type.RAM)
                               for i in range(MAX_MEMMAP_ENTRIES + 1)])
    with pytest.raises(ConfigError, match="PVH modules"):
        build_start_info(e820=E820, modules=[LoadedInitrd(0, 1)] * (MAX_MODULES + 1))
