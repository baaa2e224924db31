"""A dead (or quiet) vCPU in words: its mode, registers with their flag bits named,
segments and descriptor tables, the exit it stopped with, the instructions around
RIP, the top of the stack, and the most likely cause (kvmpy.diagnostics.cause).

When a guest dies (a triple fault, a failed VM entry, an instruction KVM cannot
emulate, an exception nobody handles) the user needs what a hardware engineer would
look at first; `describe_vcpu` is that report, printed under a fatal Stop, and
`describe_running` the same for a live vCPU of a guest gone quiet.

What it is not: a reader of live state. Everything here reads the vCPU through
ioctls after the fact, on the vCPU's own thread, outside KVM_RUN.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from kvmpy.cpu import lapic
from kvmpy.cpu.registers import CR0_PE, EFER_LMA, RFLAGS_IF
from kvmpy.diagnostics.cause import (
    MASK64,
    AtRip,
    Cause,
    Snapshot,
    at_rip,
    find_cause,
    vector_name,
)
from kvmpy.errors import KvmpyError
from kvmpy.kvm.exits import (
    Debug,
    FailEntry,
    GuestException,
    InternalError,
    VcpuExit,
    decode,
    suberror_name,
)
from kvmpy.kvm.vcpu import MpState
from kvmpy.memory import GuestMemory
from kvmpy.trace import disasm, vmem

# Bit names, lowest first (SDM Vol. 3A §2.5 CR0/CR4, §2.2.1 EFER; Vol. 1 §3.4.3 EFLAGS).
CR0_BITS = {0: "PE", 1: "MP", 2: "EM", 3: "TS", 4: "ET", 5: "NE", 16: "WP", 18: "AM",
            29: "NW", 30: "CD", 31: "PG"}
CR4_BITS = {0: "VME", 1: "PVI", 2: "TSD", 3: "DE", 4: "PSE", 5: "PAE", 6: "MCE", 7: "PGE",
            8: "PCE", 9: "OSFXSR", 10: "OSXMMEXCPT", 11: "UMIP", 12: "LA57", 13: "VMXE",
            14: "SMXE", 16: "FSGSBASE", 17: "PCIDE", 18: "OSXSAVE", 20: "SMEP", 21: "SMAP",
            22: "PKE", 23: "CET"}
EFER_BITS = {0: "SCE", 8: "LME", 10: "LMA", 11: "NXE", 12: "SVME", 14: "FFXSR"}
RFLAGS_BITS = {0: "CF", 2: "PF", 4: "AF", 6: "ZF", 7: "SF", 8: "TF", 9: "IF", 10: "DF",
               11: "OF", 14: "NT", 16: "RF", 17: "VM", 18: "AC", 19: "VIF", 20: "VIP", 21: "ID"}

# VMX basic exit reasons for failed entries (SDM Vol. 3D Appendix C).
VMX_ENTRY_FAILURES = {33: "invalid guest state", 34: "MSR loading", 41: "machine-check event"}


class Diagnosis(NamedTuple):
    cause: Cause
    lines: list[str]

    def render(self) -> str:
        return "\n".join([f"  most likely cause: {self.cause.text}", *self.lines])


def snapshot(vcpu: Any, exit: VcpuExit | None = None) -> Snapshot:
    """Registers and the last exit of `vcpu` (call on its own thread, outside KVM_RUN);
    the exit is read from its kvm_run page unless given."""
    return Snapshot(vcpu.index, vcpu.get_regs(), vcpu.get_sregs(),
                    decode(vcpu.run_page) if exit is None else exit)


def describe_vcpu(vcpu: Any, memory: GuestMemory, exit: VcpuExit | None = None) -> str:
    """The full report for a stopping vCPU, as printed under a fatal Stop."""
    try:
        snap = snapshot(vcpu, exit)
    except KvmpyError as e:
        return f"  (vCPU state unavailable: {e})"
    return diagnose(snap, memory).render()


def diagnose(snap: Snapshot, memory: GuestMemory) -> Diagnosis:
    at = at_rip(snap, memory)
    return Diagnosis(find_cause(snap, memory, at), _report(snap, memory, at, _exit_lines(snap)))


_MP_STATES = {MpState.RUNNABLE: "runnable", MpState.UNINITIALIZED: "uninitialized",
              MpState.INIT_RECEIVED: "INIT received", MpState.HALTED: "halted",
              MpState.SIPI_RECEIVED: "SIPI received"}


def describe_running(vcpu: Any, memory: GuestMemory) -> str:
    """Where a live vCPU is (for a guest gone quiet): state, code, stack, pending vectors.

    Called on the vCPU's own thread between two entries (VcpuThreads.sample).
    """
    try:
        snap = Snapshot(vcpu.index, vcpu.get_regs(), vcpu.get_sregs())
        mp_state = vcpu.get_mp_state()
    except KvmpyError as e:
        return f"  (vCPU {vcpu.index} state unavailable: {e})"
    lines = _report(snap, memory, at_rip(snap, memory), _lapic_lines(vcpu))
    lines[0] += f", {_MP_STATES.get(mp_state, f'mp_state {mp_state}')}"
    return "\n".join(lines)


def _lapic_lines(vcpu: Any) -> list[str]:
    """In-service and requested vectors of the in-kernel LAPIC (none without irqchip)."""
    try:
        page = vcpu.get_lapic()
    except KvmpyError:
        return []
    isr = " ".join(map(str, lapic.vectors(page, lapic.ISR))) or "none"
    irr = " ".join(map(str, lapic.vectors(page, lapic.IRR))) or "none"
    return [f"  LAPIC: in service {isr}; requested {irr}; TPR {lapic.read_u32(page, lapic.TPR):#x}"]


def _report(snap: Snapshot, memory: GuestMemory, at: AtRip, middle: list[str]) -> list[str]:
    """State, then `middle` (the exit, or the LAPIC), then code at RIP and the stack."""
    return [*_state_lines(snap, at.space), *middle, *_code_lines(snap, memory, at),
            *_stack_lines(snap, memory, at.space, at.bits)]


# -- words for numbers ------------------------------------------------------
def bit_names(value: int, names: dict[int, str]) -> str:
    return " ".join(name for bit, name in names.items() if value >> bit & 1)


def describe_segment(name: str, seg: Any, long_mode: bool) -> str:
    head = f"{name:<3} {seg.selector:#06x} base {seg.base:#x} limit {seg.limit:#x}"
    if seg.unusable or not seg.present:
        return f"{head}: unusable" if seg.unusable else f"{head}: not present"
    if seg.s:
        if seg.type & 8:
            kind = "code, execute" + ("/read" if seg.type & 2 else "-only")
            if seg.type & 4:
                kind += ", conforming"
            width = "64-bit" if long_mode and seg.l else ("32-bit" if seg.db else "16-bit")
        else:
            kind = "data, read" + ("/write" if seg.type & 2 else "-only")
            if seg.type & 4:
                kind += ", expand-down"
            width = "" if long_mode else ("32-bit" if seg.db else "16-bit")
        return f"{head}: {kind}, DPL {seg.dpl}" + (f", {width}" if width else "")
    system = {2: "LDT", 3: "busy 16-bit TSS", 9: "available TSS", 11: "busy TSS"}
    kind = system.get(seg.type, f"system type {seg.type:#x}")
    if seg.type == 11:
        kind = "busy 64-bit TSS" if long_mode else "busy 32-bit TSS"
    return f"{head}: {kind}"


def _state_lines(snap: Snapshot, space: vmem.AddressSpace) -> list[str]:
    r, s = snap.regs, snap.sregs
    long_mode = bool(s.efer & EFER_LMA)
    cpl = s.cs.selector & 3 if s.cr0 & CR0_PE else 0
    lines = [
        f"  vCPU {snap.index}: {disasm.mode_name(s)}, {space.describe()}, CPL {cpl}, "
        f"interrupts {'on' if r.rflags & RFLAGS_IF else 'off'}",
        f"  RIP {r.rip:#018x}  RSP {r.rsp:#018x}  RBP {r.rbp:#018x}",
        f"  RAX {r.rax:#018x}  RBX {r.rbx:#018x}  RCX {r.rcx:#018x}",
        f"  RDX {r.rdx:#018x}  RSI {r.rsi:#018x}  RDI {r.rdi:#018x}",
    ]
    if long_mode:
        lines += [f"  R8  {r.r8:#018x}  R9  {r.r9:#018x}  R10 {r.r10:#018x}",
                  f"  R11 {r.r11:#018x}  R12 {r.r12:#018x}  R13 {r.r13:#018x}",
                  f"  R14 {r.r14:#018x}  R15 {r.r15:#018x}"]
    lines += [
        f"  RFLAGS {r.rflags:#x} [{bit_names(r.rflags, RFLAGS_BITS)}] IOPL {r.rflags >> 12 & 3}",
        f"  CR0 {s.cr0:#x} [{bit_names(s.cr0, CR0_BITS)}]  CR2 {s.cr2:#x}  CR3 {s.cr3:#x}",
        f"  CR4 {s.cr4:#x} [{bit_names(s.cr4, CR4_BITS)}]  EFER {s.efer:#x} "
        f"[{bit_names(s.efer, EFER_BITS)}]",
    ]
    if s.cr0 & CR0_PE:
        for name in ("cs", "ss", "ds", "es", "fs", "gs", "tr"):
            lines.append("  " + describe_segment(name.upper(), getattr(s, name), long_mode))
    else:
        lines.append("  " + "  ".join(f"{n.upper()} {getattr(s, n).selector:#06x}"
                                      for n in ("cs", "ss", "ds", "es")) +
                     f" (CS base {s.cs.base:#x})")
    idt_note = " (empty: any exception triple-faults)" if s.idt.limit == 0 else ""
    lines.append(f"  GDT {s.gdt.base:#x} limit {s.gdt.limit:#x}  "
                 f"IDT {s.idt.base:#x} limit {s.idt.limit:#x}{idt_note}")
    return lines


def _exit_lines(snap: Snapshot) -> list[str]:
    exit = snap.exit
    if isinstance(exit, FailEntry):
        hw = exit.hardware_reason
        return [f"  entry failure: hardware reason {hw:#x} ({_entry_failure(hw)}), "
                f"host cpu {exit.cpu}"]
    if isinstance(exit, InternalError):
        words = " ".join(f"{d:#x}" for d in exit.data)
        return [f"  internal error: {suberror_name(exit.suberror)}; data [{words}]"]
    if isinstance(exit, GuestException):
        return [f"  exception: {vector_name(exit.exception)}, error code "
                f"{exit.error_code:#x}"]
    if isinstance(exit, Debug):
        return [f"  debug exit: {vector_name(exit.exception)} at {exit.pc:#x}, "
                f"DR6 {exit.dr6:#x} DR7 {exit.dr7:#x}"]
    return []


def _code_lines(snap: Snapshot, memory: GuestMemory, at: AtRip) -> list[str]:
    space, bits, rip_linear, gpa, code, host, _ = at
    if not code or gpa is None:
        where = "not mapped" if gpa is None else f"gpa {gpa:#x}, not in guest RAM"
        return [f"  code at RIP: {where}", *([f"  RIP is {host}"] if host else [])]
    lines = [f"  code at {gpa:#x}: {code.hex(' ')}"]
    rip = snap.regs.rip
    back = min(32, rip_linear & 0xFFF if space.paging != "none" else 32, rip)
    before = vmem.read(memory, space, rip_linear - back, back) if back else b""
    start = rip - len(before)
    insns = disasm.around(before + code, start, rip, bits, after=4)
    if insns:
        lines.append(f"  instructions ({bits}-bit; those before RIP are a best guess):")
        for i in insns:
            mark = "=>" if i.address == rip else "  "
            lines.append(f"    {mark} {i.address:#010x}  {i.raw.hex(' '):<24} {i.text}")
    return lines


def _stack_lines(snap: Snapshot, memory: GuestMemory, space: vmem.AddressSpace,
                 bits: int) -> list[str]:
    s, r = snap.sregs, snap.regs
    width = 8 if bits == 64 else (4 if s.ss.db else 2)
    sp = r.rsp if bits == 64 else r.rsp & (0xFFFFFFFF if s.ss.db else 0xFFFF)
    linear = (s.ss.base + sp) & MASK64 if bits != 64 else sp
    data = vmem.read(memory, space, linear, 8 * width)
    if not data:
        return [f"  stack at {linear:#x}: not mapped or outside guest RAM"]
    words = [int.from_bytes(data[i : i + width], "little")
             for i in range(0, len(data) - width + 1, width)]
    out = [f"  stack at {linear:#x}:"]
    for i in range(0, len(words), 4):
        out.append(f"    {linear + i * width:#010x}: " +
                   " ".join(f"{w:#0{2 + 2 * width}x}" for w in words[i : i + 4]))
    return out


def _entry_failure(hw: int) -> str:
    if hw == MASK64:
        return "SVM VMRUN refused the guest state"
    basic = hw & 0xFFFF
    if hw >> 31 & 1 and basic in VMX_ENTRY_FAILURES:
        return f"VMX entry failure: {VMX_ENTRY_FAILURES[basic]}"
    return "see the VMX/SVM exit codes"
