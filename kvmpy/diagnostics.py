"""Explain a vCPU's state in words, for the fatal exits.

When a guest dies the user needs: where it was (RIP, and the bytes there),
what mode the CPU was in (real, protected, long; paging; CPL), and the
registers. This reads them through the vCPU's ioctls after the fact.
"""

from __future__ import annotations

from typing import Any

from kvmpy.cpu.modes import CR0_PE, CR0_PG, CR4_PAE, EFER_LMA
from kvmpy.errors import KvmpyError


def cpu_mode(sregs: Any) -> str:
    if not sregs.cr0 & CR0_PE:
        return "real mode"
    if sregs.efer & EFER_LMA:
        return "64-bit long mode" if sregs.cs.l else "compatibility mode"
    paging = "paging" if sregs.cr0 & CR0_PG else "no paging"
    pae = ", PAE" if sregs.cr4 & CR4_PAE else ""
    return f"32-bit protected mode ({paging}{pae})"


def code_address(vcpu: Any, regs: Any, sregs: Any) -> int | None:
    """The guest-physical address of the instruction at CS:RIP, if it can be found."""
    linear = (sregs.cs.base + regs.rip) & 0xFFFFFFFFFFFFFFFF
    if not sregs.cr0 & CR0_PG:
        return linear & 0xFFFFFFFF
    try:
        return vcpu.translate(linear)
    except KvmpyError:
        return None


def describe_vcpu(vcpu: Any, memory: Any) -> str:
    try:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
    except KvmpyError as e:
        return f"  (vCPU state unavailable: {e})"
    lines = [
        f"  vCPU {vcpu.index}: {cpu_mode(sregs)}, CPL {sregs.cs.selector & 3}, "
        f"RFLAGS {regs.rflags:#x} (IF={(regs.rflags >> 9) & 1})",
        f"  RIP {regs.rip:#018x}  RSP {regs.rsp:#018x}  RBP {regs.rbp:#018x}",
        f"  RAX {regs.rax:#018x}  RBX {regs.rbx:#018x}  RCX {regs.rcx:#018x}",
        f"  RDX {regs.rdx:#018x}  RSI {regs.rsi:#018x}  RDI {regs.rdi:#018x}",
        f"  CR0 {sregs.cr0:#x}  CR2 {sregs.cr2:#x}  CR3 {sregs.cr3:#x}  CR4 {sregs.cr4:#x}  "
        f"EFER {sregs.efer:#x}",
        f"  CS {sregs.cs.selector:#06x} base {sregs.cs.base:#x}  "
        f"GDT {sregs.gdt.base:#x}/{sregs.gdt.limit:#x}  IDT {sregs.idt.base:#x}/{sregs.idt.limit:#x}",
    ]
    gpa = code_address(vcpu, regs, sregs)
    if gpa is not None and memory.contains(gpa, 1):
        n = 16
        while n and not memory.contains(gpa, n):
            n -= 1
        code = memory.read(gpa, n)
        lines.append(f"  code at {gpa:#x}: {code.hex(' ')}")
    else:
        lines.append("  code at RIP: not in guest RAM")
    return "\n".join(lines)
