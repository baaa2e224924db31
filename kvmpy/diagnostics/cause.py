"""The most likely reason a vCPU died, found by the rules a person would apply, in order.

1. Is the vCPU state itself invalid for its mode? (`check_entry_state`: the VM-entry
   checks, Intel SDM Vol. 3C §27.3.1, and KVM's own KVM_SET_SREGS checks.)
2. Can the instruction at RIP be fetched? (`_fetch_problem`)
3. Which exception would that instruction raise? (`_first_fault`, SDM Vol. 3A §6.15,
   from its operands as capstone's detail mode decodes them: registers by name,
   immediates by value, memory references; never from its text.)
4. Could that exception be delivered through the IDT and onto the stack? (§6.12,
   `_delivery_problem`)

The answer is a `Cause`: one sentence for the user, the rule that found it, and the
exception vector it points at when there is one.

What it is not: certain. KVM reports a triple fault without saying which exception
started it, so the first exception is inferred from the faulting instruction and the
registers. Everything here reads state after the fact; kvmpy.diagnostics.report
renders the same state for people.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

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
)
from kvmpy.hostsyms import host_kernel_symbol
from kvmpy.kvm.exits import (
    Debug,
    FailEntry,
    GuestException,
    InternalError,
    Shutdown,
    Suberror,
    SystemEvent,
    VcpuExit,
    reason_name,
    reason_of,
    suberror_name,
)
from kvmpy.memory import GuestMemory
from kvmpy.trace import disasm, vmem
from kvmpy.trace.disasm import Insn

MASK64 = (1 << 64) - 1

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
DE, UD, BP, SS, GP, PF = 0, 6, 3, 12, 13, 14

# Instructions KVM's emulator does not implement. On PVM every CPL0 instruction
# goes through it, so these end a guest there (ENVIRONMENT.md).
UNEMULATED = frozenset({"int", "int3", "into", "int1", "xrstor", "xrstors", "xsave", "xsaveopt",
                        "xsavec", "xsaves", "fxsave", "fxrstor", "cmpxchg16b", "vmcall",
                        "vmmcall", "syscall", "sysret", "sysenter", "sysexit", "iretq"})
PRIVILEGED = frozenset({"hlt", "cli", "lgdt", "lidt", "lldt", "ltr", "clts", "invd", "wbinvd",
                        "invlpg", "rdmsr", "wrmsr", "lmsw", "swapgs"})
STACK_MNEMONICS = ("push", "pop", "call", "ret", "enter", "leave", "iret")


@dataclass(frozen=True)
class Snapshot:
    """What the diagnosis reads: registers, and the exit the vCPU stopped with."""

    index: int
    regs: Any
    sregs: Any
    exit: VcpuExit | None = None  # None: a live vCPU, not one that stopped


class AtRip(NamedTuple):
    """Where the vCPU is, worked out once for both the cause and the report."""

    space: vmem.AddressSpace  # how the vCPU translates addresses
    bits: int  # code size
    linear: int  # CS.base + RIP
    gpa: int | None  # where that is in guest-physical memory; None: not mapped
    code: bytes  # up to 16 bytes there (none if not in guest RAM)
    host: str | None  # RIP not mapped: the host kernel's symbol there, if it is one
    insn: Insn | None  # the instruction there, if it decodes


class Cause(NamedTuple):
    """The most likely reason a vCPU stopped."""

    text: str  # one sentence for the user
    rule: str  # which rule found it: "entry-state", "init-state", "fetch", "emulation",
    #            "exception", "delivery", "debug", "crash", "exit"
    vector: int | None = None  # the exception the guest most likely raised first


class Fault(NamedTuple):
    """The exception an instruction most likely raised (or -1: it should not fault)."""

    vector: int
    text: str


class FetchProblem(NamedTuple):
    """Why the instruction at RIP cannot be fetched, and the exception that raises."""

    text: str
    vector: int  # #PF for an unmapped RIP, #GP for the rest


def vector_name(vector: int) -> str:
    short, long = VECTORS.get(vector, (f"vector {vector}", "interrupt"))
    return f"{short} ({long})"


def host_rip(rip: int) -> str | None:
    """For a RIP the guest's tables do not map: is it an address of this host's kernel?"""
    symbol = host_kernel_symbol(rip)
    if symbol is None:
        return None
    return (f"this host kernel's {symbol}: the vCPU carries its host's state, a fault "
            "below kvmpy (in the virtualization it runs on)")


def at_rip(snap: Snapshot, memory: GuestMemory) -> AtRip:
    space = vmem.AddressSpace.from_sregs(snap.sregs)
    linear = (snap.sregs.cs.base + snap.regs.rip) & MASK64
    gpa = vmem.to_physical(memory, space, linear)
    code = vmem.read(memory, space, linear, 16)
    host = host_rip(snap.regs.rip) if not code and gpa is None else None
    bits = disasm.code_bits(snap.sregs)
    insn = disasm.one(code, snap.regs.rip, bits) if code else None
    return AtRip(space, bits, linear, gpa, code, host, insn)


# -- 1. the consistency checks -------------------------------------------------------
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
    if regs is not None and long_mode and cs.l and not canonical(regs.rip):
        out.append(f"RIP {regs.rip:#x} is not canonical")
    if memory is not None and cr0 & CR0_PG and not memory.contains(sregs.cr3 & ~0xFFF, 8):
        out.append(f"CR3 {sregs.cr3:#x} points outside guest RAM: the page walk cannot start")
    return out


def canonical(addr: int) -> bool:
    return addr >> 47 in (0, 0x1FFFF)


# -- the rules, in order -----------------------------------------------------------------
def find_cause(snap: Snapshot, memory: GuestMemory, at: AtRip) -> Cause:
    regs, sregs, exit, insn = snap.regs, snap.sregs, snap.exit, at.insn
    problems = check_entry_state(sregs, regs, memory)
    if isinstance(exit, FailEntry):
        return Cause(problems[0] if problems else "the vCPU state is invalid for its mode "
                     "(no rule kvmpy knows is broken; see the entry failure reason)",
                     "entry-state")
    if isinstance(exit, Shutdown) and _in_init_state(regs, sregs):
        return Cause("the registers are the vCPU's INIT state (real mode, CS:IP f000:fff0), "
                     "not where it died: KVM on AMD SVM resets a vCPU when it reports its "
                     "triple fault, so the faulting state is lost", "init-state")
    if problems and isinstance(exit, Shutdown):
        return Cause(f"{problems[0]} (the vCPU state is invalid for its mode)", "entry-state")
    fetch = _fetch_problem(snap, at)
    if isinstance(exit, InternalError):
        return _emulation_cause(exit, regs, insn, fetch)
    if isinstance(exit, GuestException):
        first = _first_fault(snap, memory, at, fetch)
        what = f"unhandled guest exception {vector_name(exit.exception)}"
        if first.vector == exit.exception:
            return Cause(f"{what}: {first.text}", "exception", exit.exception)
        return Cause(what, "exception", exit.exception)
    if isinstance(exit, Debug):
        return Cause("a debug exception reached the VMM with no debugger attached", "debug",
                     exit.exception)
    if isinstance(exit, SystemEvent):
        return Cause("the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)", "crash")
    if not isinstance(exit, Shutdown):
        name = reason_name(reason_of(exit)) if exit is not None else "none"
        return Cause(f"unexpected exit {name}", "exit")
    # a triple fault: which exception, and why it could not be delivered
    first = _first_fault(snap, memory, at, fetch)
    vector = first.vector if first.vector >= 0 else None
    obstacle = _delivery_problem(snap, memory, at.space, vector)
    if obstacle:
        return Cause(f"{first.text}; {obstacle}", "delivery", vector)
    return Cause(f"{first.text}, and delivering it faulted again (check the IDT, GDT and "
                 "stack)", "exception", vector)


def _emulation_cause(exit: InternalError, regs: Any, insn: Insn | None,
                     fetch: FetchProblem | None) -> Cause:
    if fetch is not None:
        return Cause(f"{fetch.text}: the CPU tried to execute code that is not there", "fetch",
                     fetch.vector)
    if exit.suberror == Suberror.EMULATION and insn is not None:
        if insn.mnemonic in UNEMULATED:
            return Cause(f"KVM's instruction emulator cannot execute `{insn.text}` at "
                         f"{regs.rip:#x} (on PVM every CPL0 instruction is emulated)",
                         "emulation")
        return Cause(f"KVM's instruction emulator could not execute `{insn.text}` at "
                     f"{regs.rip:#x}", "emulation")
    return Cause(f"KVM could not handle the vCPU ({suberror_name(exit.suberror)})", "emulation")


def _in_init_state(regs: Any, sregs: Any) -> bool:
    """The state after INIT/RESET (SDM Vol. 3A Table 10-1): what svm.c's
    shutdown_interception() leaves behind, having reset the vCPU ("VMCB is undefined
    after a SHUTDOWN intercept")."""
    return (regs.rip == 0xFFF0 and sregs.cs.selector == 0xF000
            and sregs.cs.base == 0xFFFF0000 and not sregs.cr0 & CR0_PE)


# -- 2. the fetch -----------------------------------------------------------------------------
def _fetch_problem(snap: Snapshot, at: AtRip) -> FetchProblem | None:
    regs, sregs = snap.regs, snap.sregs
    if at.code:
        return None
    if sregs.efer & EFER_LMA and sregs.cs.l and not canonical(regs.rip):
        return FetchProblem(f"RIP {regs.rip:#x} is not canonical", GP)
    if at.gpa is None:
        return FetchProblem(f"RIP {regs.rip:#x} is not mapped by the page tables" +
                            (f"; it is {at.host}" if at.host else ""), PF)
    return FetchProblem(f"RIP points outside guest RAM ({regs.rip:#x} is guest-physical "
                        f"{at.gpa:#x})", GP)


# -- 3. the instruction's own exception ----------------------------------------------------------
_REG64 = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"]
_REG_ALIASES = {**{f"e{n[1:]}": n for n in _REG64}, **{n[1:]: n for n in _REG64},
                "al": "rax", "cl": "rcx", "dl": "rdx", "bl": "rbx"}


def reg_value(regs: Any, name: str) -> int | None:
    """The value of general register `name` as capstone names it ("eax", "r8d", "cl")."""
    if name in _REG64 or name in {f"r{i}" for i in range(8, 16)} or name == "rip":
        return int(getattr(regs, name))
    if name in _REG_ALIASES:
        value = int(getattr(regs, _REG_ALIASES[name]))
        return value & (0xFF if name.endswith("l") else 0xFFFF if len(name) == 2 else 0xFFFFFFFF)
    if name.startswith("r") and name[-1] in "dwb" and name[1:-1].isdigit():
        value = int(getattr(regs, name[:-1]))
        return value & {"d": 0xFFFFFFFF, "w": 0xFFFF, "b": 0xFF}[name[-1]]
    return None


def _source_value(regs: Any, insn: Insn) -> int | None:
    """The value a two-operand instruction moves: its second operand's, if a register's."""
    if len(insn.ops) != 2 or insn.ops[1].kind != "reg":
        return None
    return reg_value(regs, insn.ops[1].reg)


def _first_fault(snap: Snapshot, memory: GuestMemory, at: AtRip,
                 fetch: FetchProblem | None) -> Fault:
    """The exception the instruction at RIP most likely raised, with the reason in words."""
    regs, sregs, insn, space = snap.regs, snap.sregs, at.insn, at.space
    if fetch is not None:
        return Fault(fetch.vector, f"{fetch.text} (#PF or #GP on the instruction fetch)")
    rip = regs.rip
    if insn is None:
        return Fault(UD, f"#UD (invalid opcode): the bytes at {rip:#x} are not an instruction")
    where = f"`{insn.text}` at {rip:#x}"
    cpl = sregs.cs.selector & 3 if sregs.cr0 & CR0_PE else 0
    m, ops = insn.mnemonic, insn.ops
    first = ops[0] if ops else None
    if m == "ud2":
        return Fault(UD, f"#UD (invalid opcode) from {where}")
    if m == "int3":
        return Fault(BP, f"#BP (breakpoint) from {where}")
    if m == "int" and first is not None and first.kind == "imm":
        return Fault(first.imm, f"software interrupt {first.imm} from {where}")
    if m in ("div", "idiv") and first is not None and first.kind == "reg":
        if reg_value(regs, first.reg) == 0:
            return Fault(DE, f"#DE (divide error): {where} divides by {first.reg.upper()} = 0")
        return Fault(DE, f"#DE (divide error, quotient too large) from {where}")
    control = any(op.kind == "reg" and op.reg.startswith("cr") for op in ops)
    if cpl > 0 and (m in PRIVILEGED or control):
        return Fault(GP, f"#GP: {where} is privileged and the CPU is at CPL {cpl}")
    iopl = regs.rflags >> 12 & 3
    if cpl > iopl and insn.is_io:
        return Fault(GP, f"#GP: port I/O {where} at CPL {cpl} needs IOPL {cpl} (IOPL is {iopl})")
    written = first.reg if m == "mov" and first is not None and first.kind == "reg" else ""
    new = _source_value(regs, insn) if written in ("cr0", "cr4") else None
    if written == "cr0" and new is not None:
        if new & CR0_PG and not new & CR0_PE:
            return Fault(GP, f"#GP: {where} sets CR0.PG without CR0.PE")
        if new & CR0_PG and sregs.efer & EFER_LME and not sregs.cr4 & CR4_PAE:
            return Fault(GP, f"long mode requested but CR4.PAE is clear: {where} sets CR0.PG "
                         "with EFER.LME = 1, which raises #GP")
        if sregs.efer & EFER_LMA and not new & CR0_PG:
            return Fault(GP, f"#GP: {where} clears CR0.PG while in long mode")
    if written == "cr4" and new is not None and sregs.efer & EFER_LMA and not new & CR4_PAE:
        return Fault(GP, f"#GP: {where} clears CR4.PAE while in long mode")
    msr = regs.rcx & 0xFFFFFFFF
    if m == "wrmsr" and msr == MSR_EFER and regs.rax & EFER_LME and not sregs.efer & EFER_LME:
        return Fault(GP, f"#GP: {where} sets EFER.LME, which KVM refuses unless the vCPU's "
                     "CPUID reports long mode (set it with KVM_SET_CPUID2)")
    if m in ("wrmsr", "rdmsr"):
        return Fault(GP, f"#GP: {where} accesses MSR {msr:#x}, which KVM refuses (unknown "
                     "MSR or reserved bits)")
    stacky = m.startswith(STACK_MNEMONICS)
    cr2 = sregs.cr2
    if space.paging != "none" and cr2 and vmem.to_physical(memory, space, cr2) is None:
        if stacky or abs(cr2 - regs.rsp) <= 64:
            return Fault(PF, f"#PF: the stack at RSP {regs.rsp:#x} is not mapped ({where} "
                         f"touched {cr2:#x})")
        if insn.accesses_memory:
            return Fault(PF, f"#PF (page fault): {where} touched {cr2:#x}, which is not mapped")
    if stacky and vmem.to_physical(memory, space, regs.rsp - 8) is None:
        return Fault(SS, f"#SS/#PF: {where} uses the stack at RSP {regs.rsp:#x}, which is not "
                     "mapped")
    if insn.is_io or m == "hlt":
        return Fault(-1, f"the CPU was at {where}, which should not fault here")
    return Fault(-1, f"an exception from {where}")


# -- 4. its delivery -----------------------------------------------------------------------------
def _delivery_problem(snap: Snapshot, memory: GuestMemory, space: vmem.AddressSpace,
                      vector: int | None) -> str | None:
    """Why the exception could not reach a handler (SDM Vol. 3A §6.10-6.14)."""
    regs, sregs = snap.regs, snap.sregs
    idt = sregs.idt
    if not sregs.cr0 & CR0_PE:
        if vector is not None and idt.limit < 4 * vector + 3:
            return f"the real-mode IDT limit {idt.limit:#x} does not cover vector {vector}"
        return None
    if idt.limit == 0:
        return "IDT limit is 0: the first exception triple-faults"
    long_mode = bool(sregs.efer & EFER_LMA)
    size = 16 if long_mode else 8
    if vector is None:
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
