"""Put a vCPU in real, 32-bit protected or 64-bit long mode at a given entry.

A guest normally climbs from real mode to long mode itself (the tutorial
guests do). A VMM that boots a kernel directly does the climb for it: it
writes a GDT and page tables into guest memory and loads the segment caches
and control registers through KVM_SET_SREGS, so the first instruction the
guest runs is already in the mode its entry point expects.

Intel SDM Vol. 3A §9.8 (switching to protected mode), §9.8.5 (to IA-32e mode).
"""

from __future__ import annotations

import enum
from typing import Any

from kvmpy import layout
from kvmpy.cpu.gdt import TYPE_CODE_RX, TYPE_TSS_BUSY, Segment, build_gdt
from kvmpy.cpu.pagetables import build_identity_map
from kvmpy.cpu.registers import (
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    EFER_SCE,
    RFLAGS_IOPL3,
    RFLAGS_RESERVED,
)
from kvmpy.memory import GuestMemory

# Selectors. The Linux boot protocol fixes __BOOT_CS = 0x10 and __BOOT_DS = 0x18
# (Documentation/arch/x86/boot.rst, "32-bit/64-bit boot protocol").
BOOT_CS = 0x10
BOOT_DS = 0x18
USER_CS = 0x28 | 3
USER_DS = 0x20 | 3
BOOT_TSS = 0x30
TSS_SIZE = 104  # 64-bit TSS (SDM Figure 8-11)


class Mode(enum.Enum):
    REAL = "real"
    PROTECTED = "protected"
    LONG = "long"


def _segments(mode: Mode, cpl: int) -> tuple[Segment, Segment, list[Segment]]:
    """(code, data, every GDT entry) for the mode."""
    long = mode is Mode.LONG
    kcode = Segment(BOOT_CS, type=TYPE_CODE_RX, db=0 if long else 1, l=1 if long else 0)
    kdata = Segment(BOOT_DS)
    ucode = Segment(USER_CS, type=TYPE_CODE_RX, dpl=3, db=0 if long else 1, l=1 if long else 0)
    udata = Segment(USER_DS, dpl=3)
    tss = Segment(BOOT_TSS, base=layout.BOOT_TSS, limit=TSS_SIZE - 1, type=TYPE_TSS_BUSY,
                  s=0, db=0)
    table = [kcode, kdata, udata, ucode, tss]
    if cpl == 3:
        return ucode, udata, table
    return kcode, kdata, table


def _load_segments(sregs: Any, code: Segment, data: Segment) -> None:
    code.load_into(sregs.cs)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        data.load_into(seg)


def setup_real(vcpu: Any, entry: int, stack: int = 0xFFF0) -> None:
    """Real mode with CS=DS=ES=SS = entry's 64 KiB paragraph, IP = entry's offset in it."""
    segment_base = entry & ~0xFFFF & 0xFFFFF
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.base = segment_base
        seg.selector = segment_base >> 4
        seg.limit = 0xFFFF
    sregs.cr0 &= ~(CR0_PE | CR0_PG)
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = entry - segment_base
    regs.rsp = stack
    regs.rflags = RFLAGS_RESERVED
    vcpu.set_regs(regs)


def setup_protected(vcpu: Any, memory: GuestMemory, entry: int, stack: int,
                    **gprs: int) -> None:
    """32-bit flat protected mode, paging off, CS=__BOOT_CS, data segments __BOOT_DS."""
    _enter(vcpu, memory, Mode.PROTECTED, entry, stack, cpl=0, gprs=gprs)


def setup_long(vcpu: Any, memory: GuestMemory, entry: int, stack: int, *, cpl: int = 0,
               **gprs: int) -> None:
    """64-bit long mode with kvmpy's identity map of the first 4 GiB.

    With `cpl=3` the guest starts in user mode: user code/data selectors,
    user-accessible pages, and IOPL 3 so it may use port I/O. (PVM runs CPL3
    code natively and cannot grant IOPL: there, user guests use MMIO.)
    """
    _enter(vcpu, memory, Mode.LONG, entry, stack, cpl=cpl, gprs=gprs)


def _enter(vcpu: Any, memory: GuestMemory, mode: Mode, entry: int, stack: int, *,
           cpl: int, gprs: dict[str, int]) -> None:
    code, data, table = _segments(mode, cpl)
    gdt = build_gdt(table)
    memory.write(layout.BOOT_GDT, gdt)
    memory.fill(layout.BOOT_TSS, TSS_SIZE)
    memory.write_u16(layout.BOOT_TSS + 102, TSS_SIZE)  # I/O map base beyond the limit: none

    sregs = vcpu.get_sregs()
    sregs.gdt.base, sregs.gdt.limit = layout.BOOT_GDT, len(gdt) - 1
    sregs.idt.base, sregs.idt.limit = layout.BOOT_IDT, 0  # any exception triple-faults
    _load_segments(sregs, code, data)
    table[-1].load_into(sregs.tr)
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_MP
    if mode is Mode.LONG:
        sregs.cr3 = build_identity_map(memory, user=cpl == 3)
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
        sregs.cr0 |= CR0_PG | CR0_WP
        sregs.efer = EFER_LME | EFER_LMA | EFER_SCE | EFER_NXE
    else:
        sregs.cr4 = 0
        sregs.efer = 0
    vcpu.set_sregs(sregs)

    regs = vcpu.get_regs()
    for name, value in gprs.items():
        setattr(regs, name, value)
    regs.rip = entry
    regs.rsp = stack
    regs.rflags = RFLAGS_RESERVED | (RFLAGS_IOPL3 if cpl == 3 else 0)
    vcpu.set_regs(regs)
