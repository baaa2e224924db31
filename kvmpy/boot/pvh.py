"""PVH boot: `hvm_start_info`, its module list and memory map, for the 32-bit PVH entry.

What it is: the configurator for a vmlinux entered at its
XEN_ELFNOTE_PHYS32_ENTRY point. The kernel finds `struct hvm_start_info`
through EBX; version 1 adds the memory map, whose entries use e820 types.
The initrd is module 0. Layout and magic from
xen/include/public/arch-x86/hvm/start_info.h:

    hvm_start_info (56 bytes)        at layout.PVH_START_INFO
    hvm_modlist_entry[] (32 each)    at layout.PVH_MODLIST
    hvm_memmap_table_entry[] (24)    at layout.PVH_MEMMAP, up to layout.ZERO_PAGE

What it is not: it loads nothing and sets no registers; the machine puts the
returned gpa in EBX and enters in 32-bit protected mode with paging off.

Learned from rust-vmm linux-loader (src/configurator/x86_64/pvh.rs) and
Firecracker's configure_pvh.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from kvmpy import layout
from kvmpy.boot.cmdline import Cmdline
from kvmpy.boot.e820 import E820Entry
from kvmpy.boot.initrd import LoadedInitrd
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory

XEN_HVM_START_MAGIC_VALUE = 0x336EC578
START_INFO_VERSION = 1  # version 1: memmap_paddr and memmap_entries are valid

# magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr, rsdp_paddr,
# memmap_paddr, memmap_entries, reserved
HVM_START_INFO = struct.Struct("<IIIIQQQQII")
# paddr, size, cmdline_paddr, reserved
HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")
# addr, size, type (e820 types), reserved
HVM_MEMMAP_TABLE_ENTRY = struct.Struct("<QQII")

MAX_MODULES = (layout.PVH_MEMMAP - layout.PVH_MODLIST) // HVM_MODLIST_ENTRY.size
MAX_MEMMAP_ENTRIES = (layout.ZERO_PAGE - layout.PVH_MEMMAP) // HVM_MEMMAP_TABLE_ENTRY.size


def build_start_info(
    *,
    e820: Sequence[E820Entry],
    cmdline: Cmdline | None = None,
    modules: Sequence[LoadedInitrd] = (),
    rsdp_gpa: int = 0,
) -> tuple[bytes, bytes, bytes]:
    """(hvm_start_info, module list, memory map) as bytes for the layout addresses."""
    if len(modules) > MAX_MODULES:
        raise ConfigError(f"{len(modules)} PVH modules, room for {MAX_MODULES}")
    if len(e820) > MAX_MEMMAP_ENTRIES:
        raise ConfigError(f"PVH memory map has {len(e820)} entries, room for {MAX_MEMMAP_ENTRIES}")
    modlist = b"".join(HVM_MODLIST_ENTRY.pack(m.gpa, m.size, 0, 0) for m in modules)
    memmap = b"".join(HVM_MEMMAP_TABLE_ENTRY.pack(e.addr, e.size, e.type, 0) for e in e820)
    start_info = HVM_START_INFO.pack(
        XEN_HVM_START_MAGIC_VALUE,
        START_INFO_VERSION,
        0,  # flags: SIF_* describe Xen domains, none apply
        len(modules),
        layout.PVH_MODLIST if modules else 0,
        cmdline.gpa if cmdline is not None else 0,
        rsdp_gpa,
        layout.PVH_MEMMAP,
        len(e820),
        0,
    )
    return start_info, modlist, memmap


def write_start_info(
    memory: GuestMemory,
    *,
    e820: Sequence[E820Entry],
    cmdline: Cmdline | None = None,
    initrd: LoadedInitrd | None = None,
    rsdp_gpa: int = 0,
) -> int:
    """Write hvm_start_info, modules and memmap; returns its gpa (the value for EBX)."""
    start_info, modlist, memmap = build_start_info(
        e820=e820,
        cmdline=cmdline,
        modules=[initrd] if initrd is not None else [],
        rsdp_gpa=rsdp_gpa,
    )
    memory.write(layout.PVH_START_INFO, start_info)
    memory.write(layout.PVH_MODLIST, modlist)
    memory.write(layout.PVH_MEMMAP, memmap)
    return layout.PVH_START_INFO
