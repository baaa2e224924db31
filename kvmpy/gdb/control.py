"""Stopping vCPUs for a debugger, and working on them while they are stopped.

The rule that shapes this module: a vCPU's registers can only be read or
written by the thread that runs it, and only while it is outside KVM_RUN.
So a stopped vCPU's thread does not return to the guest: it *parks* in
`DebugControl.park`, waiting on a queue, and runs the small requests the gdb
server thread hands it (read the registers, set guest debug) until it is told
to resume. The server thread never touches a vCPU fd itself.

Each vCPU's exit loop has a `DebugObserver` (kvmpy.exitloop.ExitObserver),
which sees its exits before and after the loop's handler. A vCPU parks when:
- KVM_EXIT_DEBUG reports a breakpoint, watchpoint or finished single step
  (`on_debug`; the observer takes the exit, the loop has no handler for it);
- it was kicked out of KVM_RUN (signal + immediate_exit, as
  kvmpy.vcpu_threads does) while a stop is requested: Ctrl-C, the start of
  the run, or another vCPU stopping (gdb's all-stop mode);
- with a debugger attached, it is about to die (triple fault, failed entry,
  emulation failure): it parks first, so the user can look, then dies.

What it is not: the protocol. kvmpy.gdb.stub speaks to gdb and decides what
to ask for; this module only moves vCPUs between running and parked.
"""

from __future__ import annotations

import itertools
import queue
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmpy.kvm.exits import (
    Debug,
    FailEntry,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    VcpuExit,
)
from kvmpy.kvm.ioctl import lib
from kvmpy.trace import disasm, vmem
from kvmpy.vcpu_threads import KICK_SIGNAL

from .debugregs import DR6_BS, DebugRegisters, HwPoint
from .swbreak import BP_VECTOR, IN_AL_DX, INT3, SoftBreakpoints, int3_intercepted

if TYPE_CHECKING:
    from kvmpy.exitloop import VcpuLoop
    from kvmpy.kvm.vcpu import Vcpu
    from kvmpy.memory import GuestMemory
    from kvmpy.stop import Stop

SIGINT, SIGTRAP, SIGSEGV = 2, 5, 11
REQUEST_TIMEOUT_S = 10.0
MASK64 = (1 << 64) - 1


class NotStopped(Exception):
    """The vCPU is running (or the VM has ended): its state cannot be touched."""


@dataclass
class StopEvent:
    """Why a vCPU stopped, as gdb's stop reply will say it."""

    signal: int
    reason: str = ""  # "", "swbreak", "hwbreak", "watch", "awatch", "step", "fault"
    addr: int = 0  # watchpoint address
    what: str = ""  # for people: "triple fault" ...
    seq: int = 0


class _Resume:
    """The sentinel that ends a park."""


RESUME = _Resume()


_ACCESSES = (IoOut, IoIn, MmioWrite, MmioRead)
_FATAL = {Shutdown: "triple fault", FailEntry: "VM entry failed",
          InternalError: "KVM internal error"}


@dataclass
class VcpuDebug:
    index: int
    vcpu: Vcpu
    requests: queue.Queue[Any]
    parked: bool = False
    event: StopEvent | None = None
    thread: int | None = None  # ident of the thread running this vCPU, learnt at first park
    stepping: bool = False  # resumed with single-step for gdb
    stepping_over: bool = False  # single-stepping off a breakpoint, then continue
    step_from: int = 0  # RIP when that step began
    took: bool = False  # `before` handled the current exit itself (a breakpoint)


class DebugControl:
    """All-stop control of a VM's vCPUs for one debugger."""

    def __init__(self, vcpus: Sequence[Vcpu], memory: GuestMemory, *, irqchip: bool,
                 stopped: Callable[[], Stop | None], on_change: Callable[[], None] = lambda: None,
                 software_breakpoints: bool = False) -> None:
        self.memory = memory
        self.irqchip = irqchip
        self.stopped = stopped  # how the VM stopped, once it has: then no vCPU stays parked
        self.on_change = on_change  # wakes the server thread: a vCPU parked
        self.points = DebugRegisters()
        # Z0 as int3 (hardware KVM, swbreak.py); None: Z0 in the debug registers (PVM)
        self.sw: SoftBreakpoints | None = None
        if software_breakpoints:
            self.sw = SoftBreakpoints(memory, INT3 if int3_intercepted() else IN_AL_DX)
        self.vcpus = [VcpuDebug(i, vcpu, queue.Queue()) for i, vcpu in enumerate(vcpus)]
        self.cond = threading.Condition()
        self.stop_requested = False
        self.attached = False  # a debugger is connected: fatal exits park first
        self.closed = False
        self._seq = itertools.count(1)
        self._can_signal = _ensure_kick_handler()

    def observer(self, index: int) -> DebugObserver:
        """What vCPU `index`'s exit loop calls around each exit."""
        return DebugObserver(self, self.vcpus[index])

    def stop_at_start(self) -> None:
        """Before the loops run: every vCPU parks before its first instruction."""
        self.stop_requested = True
        for dbg in self.vcpus:
            dbg.vcpu.set_immediate_exit(True)  # the first KVM_RUN returns at once

    # -- around the exits, on the vCPU's thread -------------------------------
    def before(self, dbg: VcpuDebug, exit: VcpuExit) -> bool:
        kind = type(exit)
        if kind is Debug:
            dbg.took = True
            self.on_debug(dbg, exit)  # type: ignore[arg-type]
            return True
        if kind is IoIn and self.sw is not None and self.sw.trap == IN_AL_DX:
            dbg.took = self._trap(dbg, exit)  # type: ignore[arg-type]
            return dbg.took
        what = _FATAL.get(kind)
        if what is not None and self.attached and not self.closed:
            self.report(dbg, StopEvent(SIGSEGV, "fault", what=what))  # park, then die
        return False

    def after(self, dbg: VcpuDebug, loop: VcpuLoop, exit: VcpuExit, stop: Stop | None) -> None:
        took, dbg.took = dbg.took, False
        if took or stop is not None or loop.stop is not None:
            return
        if type(exit) is Interrupted:
            if self.stop_requested:
                self.park(dbg, None)
        elif isinstance(exit, _ACCESSES) and (dbg.stepping or dbg.stepping_over):
            self._access_done(dbg)

    def _access_done(self, dbg: VcpuDebug) -> None:
        """A port or MMIO write KVM emulated can end a single step with no DEBUG exit.

        Measured on PVM: after an emulated `out` (or MMIO write) KVM has already moved
        RIP past the instruction and returns to us for the I/O, and the single-step
        trap for that instruction is never reported (KVM's x86_emulate_instruction
        does not return to the emulator for a write: "FIXME: return into emulator if
        single-stepping"); the next DEBUG exit comes one instruction late. So: if RIP
        moved while stepping, the step is over. (With hardware fast PIO RIP has not
        moved yet, and the DEBUG exit comes as it should.)
        """
        if dbg.vcpu.get_regs().rip != dbg.step_from:
            self._step_done(dbg)

    def _trap(self, dbg: VcpuDebug, exit: IoIn) -> bool:
        """A port read from a patched `in al, dx` is a breakpoint hit, not I/O.

        KVM exits for the read with RIP still on the instruction and completes it
        (AL, RIP + 1) at the next KVM_RUN. It is completed here at once, under
        single-step so the guest runs nothing more, and the registers put back: the
        vCPU then stands on the breakpoint as after an int3 that was intercepted.
        """
        sw = self.sw
        assert sw is not None
        if exit.size != 1 or len(exit.data) != 1 or not sw.patched:
            return False
        vcpu = dbg.vcpu
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        linear = (sregs.cs.base + regs.rip) & MASK64
        if linear not in sw.patched or sw.memory.read_u8(sw.patched[linear][0]) != IN_AL_DX:
            return False
        vcpu.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP)
        vcpu.set_immediate_exit(False)
        vcpu.run()  # completes the read; the single step exits before the guest goes on
        vcpu.set_regs(regs)
        self.report(dbg, StopEvent(SIGTRAP, "swbreak"))
        return True

    def _step_done(self, dbg: VcpuDebug) -> None:
        if dbg.stepping_over:
            dbg.stepping_over = False
            if self.stop_requested:
                self.park(dbg, None)
            else:
                if self.sw is not None and self.sw.active:
                    # put back the int3 this vCPU stepped off
                    self.sw.patch(vmem.AddressSpace.from_sregs(dbg.vcpu.get_sregs()))
                self._apply_debug(dbg, step=False)
        else:
            self._apply_debug(dbg, step=False)
            self.report(dbg, StopEvent(SIGTRAP, "step"))

    # -- the vCPU's side ----------------------------------------------------
    def on_debug(self, dbg: VcpuDebug, exit: Debug) -> None:
        """KVM_EXIT_DEBUG: a breakpoint, watchpoint, or the end of a single step."""
        exception, pc, dr6 = exit.exception, exit.pc, exit.dr6
        if dbg.stepping_over:
            # stepped off a breakpoint: put the breakpoints back and carry on, unless
            # the debugger wants everyone stopped meanwhile (no reason of our own, then)
            self._step_done(dbg)
            return None
        if exception == BP_VECTOR and self.sw is not None:
            self.report(dbg, self._int3_event(dbg, pc))
            return None
        point = self.points.hit(dr6)
        if point is not None and point.is_watch:
            event = StopEvent(SIGTRAP, "watch" if point.kind == "write" else "awatch",
                              addr=point.addr)
        elif point is not None:
            event = StopEvent(SIGTRAP, "swbreak" if point.kind == "sw" else "hwbreak")
        elif dr6 & DR6_BS or dbg.stepping:
            event = StopEvent(SIGTRAP, "step")
        else:
            event = StopEvent(SIGTRAP, "", what=f"debug exception {exception} at {pc:#x}")
        self.report(dbg, event)
        return None

    def _int3_event(self, dbg: VcpuDebug, pc: int) -> StopEvent:
        """#BP: ours if RIP (or the byte before it) is a patched breakpoint.

        KVM on VMX and SVM intercepts #BP before delivery, so RIP is the int3's own
        address (and kvm_run.debug.arch.pc its linear address); should RIP be past it,
        it is set back, so that gdb sees the breakpoint address and resumes there.
        """
        assert self.sw is not None
        vcpu = dbg.vcpu
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        linear = (sregs.cs.base + regs.rip) & MASK64
        if linear in self.sw:
            return StopEvent(SIGTRAP, "swbreak")
        before = (linear - 1) & MASK64
        if before in self.sw and before in self.sw.patched:
            regs.rip = (regs.rip - 1) & MASK64
            vcpu.set_regs(regs)
            return StopEvent(SIGTRAP, "swbreak")
        # an int3 of the guest's own: KVM_GUESTDBG_USE_SW_BP takes every #BP from it
        return StopEvent(SIGTRAP, "", what=f"int3 of the guest at {pc:#x}")

    def report(self, dbg: VcpuDebug, event: StopEvent) -> None:
        """This vCPU stopped for a reason: stop every other one, then park."""
        with self.cond:
            self.stop_requested = True
            event.seq = next(self._seq)  # the first to stop is the one gdb hears about
        self.kick_others(dbg.index)
        self.park(dbg, event)

    def park(self, dbg: VcpuDebug, event: StopEvent | None) -> None:
        """Stay out of the guest, serving requests, until resumed or the VM ends."""
        dbg.thread = threading.get_ident()
        with self.cond:
            dbg.event = event
            dbg.parked = True
            dbg.stepping = dbg.stepping_over = False
            self.cond.notify_all()
        self.on_change()
        try:
            while True:
                try:
                    request = dbg.requests.get(timeout=0.2)
                except queue.Empty:
                    if self.stopped() is not None or self.closed:
                        return
                    continue
                if request is RESUME:
                    return
                request()
        finally:
            with self.cond:
                dbg.parked = False
                self.cond.notify_all()

    # -- the debugger's side ----------------------------------------------
    def kick_others(self, index: int | None = None) -> None:
        for dbg in self.vcpus:
            if dbg.index != index and not dbg.parked:
                self.kick(dbg)

    def kick(self, dbg: VcpuDebug) -> None:
        dbg.vcpu.set_immediate_exit(True)
        if dbg.thread is not None and self._can_signal:
            try:
                signal.pthread_kill(dbg.thread, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def request_stop(self) -> None:
        """Ctrl-C: stop every vCPU (they park with no event of their own)."""
        with self.cond:
            self.stop_requested = True
        self.kick_others()

    def all_parked(self) -> bool:
        return all(d.parked for d in self.vcpus)

    def vm_ended(self) -> bool:
        return self.stopped() is not None

    def wait_all_parked(self, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.all_parked() or self.vm_ended(), timeout)

    def first_event(self) -> tuple[int, StopEvent] | None:
        """The vCPU that stopped first for a reason of its own, and why."""
        with self.cond:
            found = [(d.event.seq, d.index, d.event) for d in self.vcpus
                     if d.parked and d.event is not None]
        if not found:
            return None
        _, index, event = min(found)
        return index, event

    def call(self, index: int, fn: Callable[[Any], Any]) -> Any:
        """Run `fn(vcpu)` on the parked vCPU's own thread; returns its result."""
        dbg = self.vcpus[index]
        if not dbg.parked:
            raise NotStopped(f"vCPU {index} is not stopped")
        done = threading.Event()
        box: dict[str, Any] = {}

        def request() -> None:
            try:
                box["value"] = fn(dbg.vcpu)
            except Exception as e:  # handed back to the caller's thread
                box["error"] = e
            finally:
                done.set()

        dbg.requests.put(request)
        if not done.wait(REQUEST_TIMEOUT_S):
            raise NotStopped(f"vCPU {index} did not answer")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def resume(self, actions: dict[int, str]) -> None:
        """Let vCPUs run: action "c" (continue) or "s" (single-step) per vCPU index.

        vCPUs not named stay parked. Each resumed vCPU sets its own guest-debug
        state first (on its thread): breakpoints in the debug registers, and
        single-step for "s" or to step off a breakpoint it is sitting on.
        """
        if self.sw is not None and self.sw.active:
            self._patch_for(actions)
        resumed = []
        with self.cond:
            self.stop_requested = False
            for dbg in self.vcpus:
                # gdb has heard about the last stop: a vCPU left parked keeps no event
                # (an unreported hit of its own is dropped, as all-stop stubs do)
                dbg.event = None
                if dbg.index in actions and dbg.parked:
                    dbg.parked = False  # from now on, "all parked" means a new stop
                    resumed.append(dbg)
        for dbg in resumed:
            step = actions[dbg.index] == "s"
            dbg.requests.put(lambda dbg=dbg, step=step: self._prepare(dbg, step))
            dbg.requests.put(RESUME)

    def _patch_for(self, actions: dict[int, str]) -> None:
        """Patch int3 for the breakpoints, translated through each resumed vCPU's tables.

        A breakpoint at a resumed vCPU's RIP stays out: that vCPU steps off it first,
        and patches it then (`_step_done`).
        """
        assert self.sw is not None

        def where(vcpu: Any) -> tuple[vmem.AddressSpace, int]:
            regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
            return vmem.AddressSpace.from_sregs(sregs), (sregs.cs.base + regs.rip) & MASK64

        places = [self.call(d.index, where) for d in self.vcpus
                  if d.index in actions and d.parked]
        skip = frozenset(rip for _, rip in places)
        for space, _ in places:
            self.sw.patch(space, skip)

    def unpatch(self) -> None:
        """The VM has stopped: guest memory shows its own bytes again."""
        if self.sw is not None:
            self.sw.unpatch()

    def detach(self) -> None:
        """Forget every breakpoint and let all vCPUs run freely."""
        self.points.clear()
        if self.sw is not None:
            self.sw.clear()
        self.attached = False
        self.resume({d.index: "c" for d in self.vcpus})

    def close(self) -> None:
        self.closed = True
        if self.sw is not None:
            self.sw.clear()
        self.attached = False
        with self.cond:
            self.stop_requested = False
        for dbg in self.vcpus:
            if dbg.parked:
                dbg.requests.put(lambda dbg=dbg: self._set_debug(dbg, 0, None))
                dbg.requests.put(RESUME)

    # -- on the vCPU thread, at resume -----------------------------------------
    def _prepare(self, dbg: VcpuDebug, step: bool) -> None:
        vcpu = dbg.vcpu
        # a stale kick need not cost an exit, but a stop asked for meanwhile must stay
        vcpu.set_immediate_exit(self.stop_requested)
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        rip_linear = (sregs.cs.base + regs.rip) & MASK64
        space = vmem.AddressSpace.from_sregs(sregs)
        code = vmem.read(self.memory, space, rip_linear, disasm.MAX_INSN)
        insn = disasm.one(code, regs.rip, disasm.code_bits(sregs)) if code else None
        if insn is not None and insn.mnemonic == "hlt" and not self.irqchip:
            # single-stepping `hlt` skips the halt (KVM reports the step, not the HLT);
            # run it for real: without an irqchip it ends the run, as it would undebugged
            self._apply_debug(dbg, step=False)
            return
        on_breakpoint = self.points.executes_at(rip_linear) or (
            self.sw is not None and rip_linear in self.sw)
        dbg.step_from = regs.rip
        if step:
            dbg.stepping = True
            self._apply_debug(dbg, step=True, breakpoints=not on_breakpoint)
        elif on_breakpoint:
            # a breakpoint at RIP would fire again at once (PVM ignores RFLAGS.RF): step
            # off it with breakpoints out, then `on_debug` puts them back and continues
            dbg.stepping_over = True
            self._apply_debug(dbg, step=True, breakpoints=False)
        else:
            self._apply_debug(dbg, step=False)

    def _apply_debug(self, dbg: VcpuDebug, *, step: bool, breakpoints: bool = True) -> None:
        control = 0
        regs = None
        if step:
            control |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP
        if breakpoints and self.points.active:
            control |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_HW_BP
            regs = self.points.debugreg()
        if breakpoints and self.sw is not None and self.sw.active:
            control |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_SW_BP
        self._set_debug(dbg, control, regs)

    @staticmethod
    def _set_debug(dbg: VcpuDebug, control: int, debugreg: list[int] | None) -> None:
        dbg.vcpu.set_guest_debug(control, debugreg)


class DebugObserver:
    """One vCPU's exit loop, seen by the debugger: `DebugControl.before` / `after`."""

    def __init__(self, control: DebugControl, dbg: VcpuDebug) -> None:
        self.control = control
        self.dbg = dbg

    def before(self, loop: VcpuLoop, exit: VcpuExit) -> bool:
        return self.control.before(self.dbg, exit)

    def after(self, loop: VcpuLoop, exit: VcpuExit, stop: Stop | None) -> None:
        self.control.after(self.dbg, loop, exit, stop)


def _ensure_kick_handler() -> bool:
    """A kick is SIGUSR1 to the vCPU's thread; without a handler it would kill us."""
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None):
        return True
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda *_: None)
        return True
    return False  # kicks fall back to immediate_exit alone (seen at the next exit)


__all__ = ["DebugControl", "HwPoint", "NotStopped", "StopEvent", "SIGINT", "SIGTRAP", "SIGSEGV"]
