"""Explain a dead vCPU in words: what it was doing, and the most likely reason it died.

When a guest dies (a triple fault, a failed VM entry, an instruction KVM
cannot emulate, an exception nobody handles) the user needs what a hardware
engineer would look at first: the mode (real, protected, long; paging; CPL),
the registers with their flag bits named, the segment and descriptor-table
registers, the instructions around RIP, the top of the stack, and one
sentence that says what probably went wrong ("IDT limit is 0: the first
exception triple-faults", "long mode requested but CR4.PAE is clear").

The cause is found by rules a person would apply, in order: is the vCPU state
itself invalid for its mode (the VM-entry checks, Intel SDM Vol. 3C §27.3.1,
and KVM's own KVM_SET_SREGS checks)? Can the instruction at RIP be fetched?
Which exception would that instruction raise (SDM Vol. 3A §6.15 lists them)?
Could that exception be delivered through the IDT and onto the stack (§6.12)?

What it is not: certain. KVM reports a triple fault without saying which
exception started it, so the first exception is inferred from the faulting
instruction and the registers. Everything here reads state after the fact,
through vCPU ioctls; it is only ever called on a stopping vCPU's own thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from kvmpy.cpu import lapic
from kvmpy.cpu.registers import (
    CR0_CD,
    CR0_NW,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    CR4_VMXE,
    EFER_LMA,
    EFER_LME,
    MSR_EFER,
    RFLAGS_IF,
)
from kvmpy.errors import KvmpyError
from kvmpy.kvm.exits import (
    Debug,
    FailEntry,
    GuestException,
    InternalError,
    Shutdown,
    Suberror,
    SystemEvent,
    VcpuExit,
    decode,
    reason_name,
    reason_of,
)
from kvmpy.kvm.vcpu import MpState
from kvmpy.memory import GuestMemory
from kvmpy.trace import disasm, vmem
from kvmpy.trace.disasm import Insn

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

# SDM Vol. 3A Table 6-1: exception vectors.
VECTORS = {0: ("#DE", "divide error"), 1: ("#DB", "debug"), 2: ("NMI", "non-maskable interrupt"),
           3: ("#BP", "breakpoint"), 4: ("#OF", "overflow"), 5: ("#BR", "bound range"),
           6: ("#UD", "invalid opcode"), 7: ("#NM", "device not available"),
           8: ("#DF", "double fault"), 10: ("#TS", "invalid TSS"),
           11: ("#NP", "segment not present"), 12: ("#SS", "stack fault"),
           13: ("#GP", "general protection"), 14: ("#PF", "page fault"),
           16: ("#MF", "x87 error"), 17: ("#AC", "alignment check"),
           18: ("#MC", "machine check"), 19: ("#XM", "SIMD exception"),
           20: ("#VE", "virtualization exception"), 21: ("#CP", "control protection")}

# Instructions KVM's emulator does not implement. On PVM every CPL0 instruction
# goes through it, so these end a guest there (ENVIRONMENT.md).
UNEMULATED = frozenset({"int", "int3", "into", "int1", "xrstor", "xrstors", "xsave", "xsaveopt",
                        "xsavec", "xsaves", "fxsave", "fxrstor", "cmpxchg16b", "vmcall",
                        "vmmcall", "syscall", "sysret", "sysenter", "sysexit", "iretq"})
PRIVILEGED = frozenset({"hlt", "cli", "lgdt", "lidt", "lldt", "ltr", "clts", "invd", "wbinvd",
                        "invlpg", "rdmsr", "wrmsr", "lmsw", "swapgs"})

# VMX basic exit reasons for failed entries (SDM Vol. 3D Appendix C).
VMX_ENTRY_FAILURES = {33: "invalid guest state", 34: "MSR loading", 41: "machine-check event"}
MASK64 = (1 << 64) - 1


@dataclass
class Snapshot:
    """What the diagnosis reads: registers, and the exit the vCPU stopped with."""

    index: int
    regs: Any
    sregs: Any
    exit: VcpuExit | None = None  # None: a live vCPU, not one that stopped


@dataclass
class Diagnosis:
    cause: str
    lines: list[str]

    def render(self) -> str:
        return "\n".join([f"  most likely cause: {self.cause}", *self.lines])


# -- reading the vCPU ------------------------------------------------------
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
    lines = _report(snap, memory, _at_rip(snap, memory), _lapic_lines(vcpu))
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


# -- words for numbers ------------------------------------------------------
def bit_names(value: int, names: dict[int, str]) -> str:
    return " ".join(name for bit, name in names.items() if value >> bit & 1)


def cpu_mode(sregs: Any) -> str:
    """The mode in words, with paging for protected mode ("32-bit protected mode (paging)")."""
    name = disasm.mode_name(sregs)
    if sregs.cr0 & CR0_PE and not sregs.efer & EFER_LMA:
        paging = "paging" if sregs.cr0 & CR0_PG else "no paging"
        pae = ", PAE" if sregs.cr4 & CR4_PAE else ""
        return f"{name} ({paging}{pae})"
    return name


def vector_name(vector: int) -> str:
    short, long = VECTORS.get(vector, (f"vector {vector}", "interrupt"))
    return f"{short} ({long})"


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


# -- the consistency checks ----------------------------------------------------
def check_entry_state(sregs: Any, regs: Any | None = None,
                      memory: GuestMemory | None = None) -> list[str]:
    """Every way `sregs` breaks the rules a VM entry (or KVM_SET_SREGS) enforces.

    Each item is one sentence, most fundamental first. SDM Vol. 3C §27.3.1.1
    (control registers), §27.3.1.2 (segment registers), and the checks of
    KVM's kvm_is_valid_sregs(). PVM reports most of these as a triple fault on
    the first entry rather than KVM_EXIT_FAIL_ENTRY.
    """
    out: list[str] = []
    cr0, cr4, efer = sregs.cr0, sregs.cr4, sregs.efer
    if cr0 & CR0_PG and not cr0 & CR0_PE:
        out.append("CR0.PG is set but CR0.PE is clear: paging needs protected mode")
    if cr0 & CR0_NW and not cr0 & CR0_CD:
        out.append("CR0.NW is set without CR0.CD")
    if efer & EFER_LME and cr0 & CR0_PG and not cr4 & CR4_PAE:
        out.append("long mode requested but CR4.PAE is clear")
    if bool(efer & EFER_LMA) != bool(efer & EFER_LME and cr0 & CR0_PG):
        out.append("EFER.LMA does not match EFER.LME and CR0.PG (LMA = LME and PG)")
    if cr4 & CR4_VMXE:
        out.append("CR4.VMXE is set: kvmpy guests cannot use VMX")
    if not cr0 & CR0_PE:
        return out  # real mode: the segment cache may hold anything
    long_mode = bool(efer & EFER_LMA)
    cs, ss = sregs.cs, sregs.ss
    if cs.unusable or not cs.present:
        out.append("CS is not present")
    elif not cs.s or not cs.type & 8:
        out.append(f"CS type {cs.type:#x} is not a code segment")
    elif long_mode and cs.l and cs.db:
        out.append("CS.L and CS.D are both set: not a valid 64-bit code segment")
    if not ss.unusable:
        if not ss.present:
            out.append("SS is not present")
        elif not ss.s or ss.type & 8 or not ss.type & 2:
            out.append(f"SS type {ss.type:#x} is not a writable data segment")
        elif ss.dpl != (cs.selector & 3) and not cs.type & 4:
            out.append(f"SS.DPL ({ss.dpl}) differs from the CPL in CS ({cs.selector & 3})")
    elif not long_mode:
        out.append("SS is unusable outside 64-bit mode")
    if cs.dpl != (cs.selector & 3) and not cs.type & 4 and not cs.unusable:
        out.append(f"CS.DPL ({cs.dpl}) differs from CS.RPL ({cs.selector & 3})")
    tr = sregs.tr
    if tr.unusable or not tr.present:
        out.append("TR is not usable: a VM entry needs a present task register")
    elif tr.s or tr.type not in ((11,) if long_mode else (3, 11)):
        out.append(f"TR type {tr.type:#x} is not a busy {'64' if long_mode else '32'}-bit TSS")
    for name in ("cs", "ss", "ds", "es", "fs", "gs", "tr"):
        seg = getattr(sregs, name)
        if seg.unusable or not seg.present or seg.selector & 4 or seg.selector < 4:
            continue
        if (seg.selector & ~7) + 7 > sregs.gdt.limit:
            out.append(f"{name.upper()} selector {seg.selector:#x} is beyond the GDT limit "
                       f"{sregs.gdt.limit:#x}")
    if regs is not None and long_mode and cs.l and not _canonical(regs.rip):
        out.append(f"RIP {regs.rip:#x} is not canonical")
    if memory is not None and cr0 & CR0_PG and not memory.contains(sregs.cr3 & ~0xFFF, 8):
        out.append(f"CR3 {sregs.cr3:#x} points outside guest RAM: the page walk cannot start")
    return out


def _canonical(addr: int) -> bool:
    return addr >> 47 in (0, 0x1FFFF)


# -- the diagnosis --------------------------------------------------------------
def diagnose(snap: Snapshot, memory: GuestMemory) -> Diagnosis:
    at = _at_rip(snap, memory)
    insn = disasm.one(at.code, snap.regs.rip, at.bits) if at.code else None
    cause = _cause(snap, memory, at, insn)
    return Diagnosis(cause, _report(snap, memory, at, _exit_lines(snap)))


class _AtRip(NamedTuple):
    """Where the vCPU is, worked out once for both the cause and the report."""

    space: vmem.AddressSpace  # how the vCPU translates addresses
    bits: int  # code size
    linear: int  # CS.base + RIP
    gpa: int | None  # where that is in guest-physical memory; None: not mapped
    code: bytes  # up to 16 bytes there (none if not in guest RAM)
    host: str | None  # RIP not mapped: the host kernel's symbol there, if it is one


def _at_rip(snap: Snapshot, memory: GuestMemory) -> _AtRip:
    space = vmem.AddressSpace.from_sregs(snap.sregs)
    linear = (snap.sregs.cs.base + snap.regs.rip) & MASK64
    gpa = vmem.to_physical(memory, space, linear)
    code = vmem.read(memory, space, linear, 16)
    host = _host_rip(snap.regs.rip) if not code and gpa is None else None
    return _AtRip(space, disasm.code_bits(snap.sregs), linear, gpa, code, host)


def _report(snap: Snapshot, memory: GuestMemory, at: _AtRip, middle: list[str]) -> list[str]:
    """State, then `middle` (the exit, or the LAPIC), then code at RIP and the stack."""
    return [*_state_lines(snap, at.space), *middle, *_code_lines(snap, memory, at),
            *_stack_lines(snap, memory, at.space, at.bits)]


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
        return [f"  internal error: {_suberror(exit.suberror)}; data [{words}]"]
    if isinstance(exit, GuestException):
        return [f"  exception: {vector_name(exit.exception)}, error code "
                f"{exit.error_code:#x}"]
    if isinstance(exit, Debug):
        return [f"  debug exit: {vector_name(exit.exception)} at {exit.pc:#x}, "
                f"DR6 {exit.dr6:#x} DR7 {exit.dr7:#x}"]
    return []


def _code_lines(snap: Snapshot, memory: GuestMemory, at: _AtRip) -> list[str]:
    space, bits, rip_linear, gpa, code, host = at
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


def _host_rip(rip: int) -> str | None:
    """For a RIP the guest's tables do not map: is it an address of this host's kernel?"""
    from kvmpy.hostsyms import host_kernel_symbol

    symbol = host_kernel_symbol(rip)
    if symbol is None:
        return None
    return (f"this host kernel's {symbol}: the vCPU carries its host's state, a fault "
            "below kvmpy (in the virtualization it runs on)")


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


def _suberror(suberror: int) -> str:
    try:
        return Suberror(suberror).name.lower().replace("_", " ")
    except ValueError:
        return f"suberror {suberror}"


# -- the most likely cause ----------------------------------------------------
def _cause(snap: Snapshot, memory: GuestMemory, at: _AtRip, insn: Insn | None) -> str:
    regs, sregs, exit = snap.regs, snap.sregs, snap.exit
    space = at.space
    problems = check_entry_state(sregs, regs, memory)
    if isinstance(exit, FailEntry):
        return problems[0] if problems else "the vCPU state is invalid for its mode " \
            "(no rule kvmpy knows is broken; see the entry failure reason)"
    if isinstance(exit, Shutdown) and _in_init_state(regs, sregs):
        return ("the registers are the vCPU's INIT state (real mode, CS:IP f000:fff0), not "
                "where it died: KVM on AMD SVM resets a vCPU when it reports its triple "
                "fault, so the faulting state is lost")
    if problems and isinstance(exit, Shutdown):
        return f"{problems[0]} (the vCPU state is invalid for its mode)"
    fetch = _fetch_problem(snap, at)
    if isinstance(exit, InternalError):
        if fetch:
            return f"{fetch}: the CPU tried to execute code that is not there"
        if exit.suberror == Suberror.EMULATION and insn is not None:
            if insn.mnemonic in UNEMULATED:
                return (f"KVM's instruction emulator cannot execute `{insn.text}` at "
                        f"{regs.rip:#x} (on PVM every CPL0 instruction is emulated)")
            return f"KVM's instruction emulator could not execute `{insn.text}` at {regs.rip:#x}"
        return f"KVM could not handle the vCPU ({_suberror(exit.suberror)})"
    if isinstance(exit, GuestException):
        first = _first_exception(snap, memory, space, insn, fetch)
        what = f"unhandled guest exception {vector_name(exit.exception)}"
        return f"{what}: {first[1]}" if first and first[0] == exit.exception else what
    if isinstance(exit, Debug):
        return "a debug exception reached the VMM with no debugger attached"
    if isinstance(exit, SystemEvent):
        return "the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)"
    if not isinstance(exit, Shutdown):
        return f"unexpected exit {reason_name(reason_of(exit)) if exit is not None else 'none'}"
    # a triple fault: which exception, and why it could not be delivered
    first = _first_exception(snap, memory, space, insn, fetch)
    vector = first[0] if first else None
    obstacle = _delivery_problem(snap, memory, space, vector)
    if first and obstacle:
        return f"{first[1]}; {obstacle}"
    if obstacle:
        return f"{obstacle} (the faulting instruction is `{insn.text if insn else '?'}`)"
    if first:
        return f"{first[1]}, and delivering it faulted again (check the IDT, GDT and stack)"
    return "an exception could not be delivered (check the IDT, GDT and stack)"


def _in_init_state(regs: Any, sregs: Any) -> bool:
    """The state after INIT/RESET (SDM Vol. 3A Table 10-1): what svm.c's
    shutdown_interception() leaves behind, having reset the vCPU ("VMCB is undefined
    after a SHUTDOWN intercept")."""
    return (regs.rip == 0xFFF0 and sregs.cs.selector == 0xF000
            and sregs.cs.base == 0xFFFF0000 and not sregs.cr0 & CR0_PE)


def _fetch_problem(snap: Snapshot, at: _AtRip) -> str | None:
    regs, sregs = snap.regs, snap.sregs
    if at.code:
        return None
    if sregs.efer & EFER_LMA and sregs.cs.l and not _canonical(regs.rip):
        return f"RIP {regs.rip:#x} is not canonical"
    if at.gpa is None:
        return f"RIP {regs.rip:#x} is not mapped by the page tables" + \
            (f"; it is {at.host}" if at.host else "")
    return f"RIP points outside guest RAM ({regs.rip:#x} is guest-physical {at.gpa:#x})"


_REG64 = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"]
_REG_ALIASES = {**{f"e{n[1:]}": n for n in _REG64}, **{n[1:]: n for n in _REG64},
                "al": "rax", "cl": "rcx", "dl": "rdx", "bl": "rbx"}


def _reg_value(regs: Any, name: str) -> int | None:
    name = name.strip()
    if name in _REG64 or name in {f"r{i}" for i in range(8, 16)} or name == "rip":
        return int(getattr(regs, name))
    if name in _REG_ALIASES:
        value = int(getattr(regs, _REG_ALIASES[name]))
        return value & (0xFF if name.endswith("l") else 0xFFFF if len(name) == 2 else 0xFFFFFFFF)
    if name.startswith("r") and name[-1] in "dwb" and name[1:-1].isdigit():
        value = int(getattr(regs, name[:-1]))
        return value & {"d": 0xFFFFFFFF, "w": 0xFFFF, "b": 0xFF}[name[-1]]
    return None


def _first_exception(snap: Snapshot, memory: GuestMemory, space: vmem.AddressSpace,
                     insn: Insn | None, fetch: str | None) -> tuple[int, str] | None:
    """The exception the instruction at RIP most likely raised, with the reason in words."""
    regs, sregs = snap.regs, snap.sregs
    if fetch:
        return 14 if "mapped" in fetch else 13, f"{fetch} (#PF or #GP on the instruction fetch)"
    rip = regs.rip
    if insn is None:
        return 6, f"#UD (invalid opcode): the bytes at {rip:#x} are not an instruction"
    at = f"`{insn.text}` at {rip:#x}"
    cpl = sregs.cs.selector & 3 if sregs.cr0 & CR0_PE else 0
    m, ops = insn.mnemonic, insn.operands
    if m == "ud2":
        return 6, f"#UD (invalid opcode) from {at}"
    if m == "int3":
        return 3, f"#BP (breakpoint) from {at}"
    if m == "int":
        try:
            vector = int(ops, 0)
        except ValueError:
            vector = -1
        return vector, f"software interrupt {vector} from {at}"
    if m in ("div", "idiv") and "[" not in ops:
        value = _reg_value(regs, ops)
        if value == 0:
            return 0, f"#DE (divide error): {at} divides by {ops.upper()} = 0"
        return 0, f"#DE (divide error, quotient too large) from {at}"
    if cpl > 0 and (m in PRIVILEGED or ops.startswith("cr") or ", cr" in ops):
        return 13, f"#GP: {at} is privileged and the CPU is at CPL {cpl}"
    if cpl > (regs.rflags >> 12 & 3) and insn.is_io:
        return 13, f"#GP: port I/O {at} at CPL {cpl} needs IOPL {cpl} (IOPL is " \
            f"{regs.rflags >> 12 & 3})"
    if m == "mov" and ops.startswith("cr0,"):
        new = _reg_value(regs, ops.split(",")[1])
        if new is not None:
            if new & CR0_PG and not new & CR0_PE:
                return 13, f"#GP: {at} sets CR0.PG without CR0.PE"
            if new & CR0_PG and sregs.efer & EFER_LME and not sregs.cr4 & CR4_PAE:
                return 13, (f"long mode requested but CR4.PAE is clear: {at} sets CR0.PG "
                            "with EFER.LME = 1, which raises #GP")
            if sregs.efer & EFER_LMA and not new & CR0_PG:
                return 13, f"#GP: {at} clears CR0.PG while in long mode"
    if m == "mov" and ops.startswith("cr4,"):
        new = _reg_value(regs, ops.split(",")[1])
        if new is not None and sregs.efer & EFER_LMA and not new & CR4_PAE:
            return 13, f"#GP: {at} clears CR4.PAE while in long mode"
    if m == "wrmsr" and regs.rcx & 0xFFFFFFFF == MSR_EFER and regs.rax & EFER_LME \
            and not sregs.efer & EFER_LME:
        return 13, (f"#GP: {at} sets EFER.LME, which KVM refuses unless the vCPU's CPUID "
                    "reports long mode (set it with KVM_SET_CPUID2)")
    if m in ("wrmsr", "rdmsr"):
        return 13, f"#GP: {at} accesses MSR {regs.rcx & 0xFFFFFFFF:#x}, which KVM refuses " \
            "(unknown MSR or reserved bits)"
    stacky = m.startswith(("push", "pop", "call", "ret", "enter", "leave", "iret"))
    cr2 = sregs.cr2
    if space.paging != "none" and cr2 and vmem.to_physical(memory, space, cr2) is None:
        if stacky or abs(cr2 - regs.rsp) <= 64:
            return 14, f"#PF: the stack at RSP {regs.rsp:#x} is not mapped ({at} touched " \
                f"{cr2:#x})"
        if insn.accesses_memory:
            return 14, f"#PF (page fault): {at} touched {cr2:#x}, which is not mapped"
    if stacky and vmem.to_physical(memory, space, regs.rsp - 8) is None:
        return 12, f"#SS/#PF: {at} uses the stack at RSP {regs.rsp:#x}, which is not mapped"
    if m in disasm.IO_MNEMONICS or m == "hlt":
        return -1, f"the CPU was at {at}, which should not fault here"
    return -1, f"an exception from {at}"


def _delivery_problem(snap: Snapshot, memory: GuestMemory, space: vmem.AddressSpace,
                      vector: int | None) -> str | None:
    """Why the exception could not reach a handler (SDM Vol. 3A §6.10-6.14)."""
    regs, sregs = snap.regs, snap.sregs
    idt = sregs.idt
    if not sregs.cr0 & CR0_PE:
        if vector is not None and vector >= 0 and idt.limit < 4 * vector + 3:
            return f"the real-mode IDT limit {idt.limit:#x} does not cover vector {vector}"
        return None
    if idt.limit == 0:
        return "IDT limit is 0: the first exception triple-faults"
    long_mode = bool(sregs.efer & EFER_LMA)
    size = 16 if long_mode else 8
    if vector is None or vector < 0:
        return None
    name = VECTORS.get(vector, (f"vector {vector}", ""))[0]
    if idt.limit < (vector + 1) * size - 1:
        return f"the IDT limit {idt.limit:#x} does not cover vector {vector} ({name})"
    gate = vmem.read(memory, space, idt.base + vector * size, size)
    if len(gate) < size:
        return f"the IDT at {idt.base:#x} is not mapped or outside guest RAM"
    low = int.from_bytes(gate[:8], "little")
    if not low >> 47 & 1:
        return f"IDT entry {vector} ({name}) is not present"
    gate_type = low >> 40 & 0xF
    if long_mode and gate_type not in (0xE, 0xF):
        return f"IDT entry {vector} ({name}) has type {gate_type:#x}, not a 64-bit " \
            "interrupt or trap gate"
    selector = low >> 16 & 0xFFFF
    if selector < 4:
        return f"IDT entry {vector} ({name}) has a null code selector"
    if (selector & ~7) + 7 > sregs.gdt.limit:
        return f"IDT entry {vector} ({name}) uses selector {selector:#x}, beyond the GDT " \
            f"limit {sregs.gdt.limit:#x}"
    offset = (low & 0xFFFF) | (low >> 48 & 0xFFFF) << 16
    if long_mode:
        offset |= (int.from_bytes(gate[8:12], "little")) << 32
    if vmem.to_physical(memory, space, offset) is None:
        return f"IDT entry {vector} ({name}) points to {offset:#x}, which is not mapped"
    frame = 40 if long_mode else 12
    if vmem.to_physical(memory, space, (regs.rsp - frame) & MASK64) is None:
        return f"the stack pointer {regs.rsp:#x} is not mapped: the CPU cannot push the " \
            "exception frame"
    return None
