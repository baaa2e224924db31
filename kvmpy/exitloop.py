"""The vCPU exit-dispatch loop: enter the guest, handle why it came back, repeat.

What it is: a table from the type of exit (`kvmpy.kvm.exits`: `IoOut`, `MmioRead`,
`Hlt`, ...) to a small named handler. Port and MMIO accesses go to the buses,
which pick the device; HLT, SHUTDOWN, failed entries, emulation failures and
system events end the run with a `Stop`. The hot path (a port write, an MMIO
access) is one KVM_RUN call, one decode of the kvm_run page, a dict lookup for the
handler, one for the port or address (kvmpy.portcache), and the device call.

Observers (the tracer, exit statistics, the gdb stub) are a list given at
construction: the loop calls each one's `before` and `after` around the handler
(`ExitObserver`). A loop without observers makes no call for them.

What it is not: it builds nothing. The machine hands it a vCPU, its memory
and the two buses. It never decides what a device does.

Learned from kvmtool x86/kvm-cpu.c and rust-vmm kvm-ioctls' typed VcpuExit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from kvmpy.kvm.exits import (
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    IrqWindowOpen,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    SystemEventType,
    VcpuExit,
    reason_name,
    reason_of,
    suberror_name,
)
from kvmpy.portcache import PortCache
from kvmpy.stop import Stop, StopKind

if TYPE_CHECKING:
    from kvmpy.bus import Bus
    from kvmpy.kvm.vcpu import Vcpu
    from kvmpy.memory import GuestMemory

Handler = Callable[[Any], "Stop | None"]
MMIO_CACHE_LIMIT = 4096  # MMIO addresses whose device the loop remembers (kvmpy.portcache)


class HandlerTable(dict[type, Handler]):
    """Exit type -> handler; an exit type without one gets `unexpected` (`table[kind]`
    is one C-level lookup, the exit path's own)."""

    def __init__(self, handlers: dict[type, Handler], unexpected: Handler) -> None:
        super().__init__(handlers)
        self.unexpected = unexpected

    def __missing__(self, kind: type) -> Handler:
        return self.unexpected


class ExitObserver(Protocol):
    """Something that watches a loop's exits: a tracer, statistics, a debugger.

    The loop calls every observer's `before` in the order it was given them,
    then its own handler, then every `after` in reverse order, so each observer's
    pair encloses the later ones'. `before` returning True means the observer
    took care of the exit itself (a debugger's breakpoint): the handler and the
    later observers do not see it. Both run on the vCPU's own thread.
    """

    def before(self, loop: VcpuLoop, exit: VcpuExit) -> bool: ...

    def after(self, loop: VcpuLoop, exit: VcpuExit, stop: Stop | None) -> None: ...


class VcpuLoop:
    """Runs one vCPU until something ends the VM; returns the `Stop`."""

    def __init__(self, vcpu: Vcpu, memory: GuestMemory, pio: Bus, mmio: Bus, *,
                 observers: Sequence[ExitObserver] = ()) -> None:
        self.vcpu = vcpu
        self.memory = memory
        self.pio = pio
        self.mmio = mmio
        self.observers = tuple(observers)
        self.stop: Stop | None = None  # set by a handler, or by another thread to end the run
        self.exits_seen = 0  # lets the supervisor (kvmpy.vcpu_threads) leave busy vCPUs alone
        # called on the vCPU's own thread after a kick (KVM_RUN returned EINTR)
        self.on_kick: Callable[[], None] | None = None
        self.ports = PortCache(pio)
        self.addresses = PortCache(mmio, limit=MMIO_CACHE_LIMIT)
        self.handlers = HandlerTable({
            IoOut: self.on_io_out,
            IoIn: self.on_io_in,
            MmioWrite: self.on_mmio_write,
            MmioRead: self.on_mmio_read,
            Hlt: self.on_hlt,
            Interrupted: self.on_interrupted,
            IrqWindowOpen: self.on_irq_window_open,
            Shutdown: self.on_shutdown,
            FailEntry: self.on_fail_entry,
            InternalError: self.on_internal_error,
            SystemEvent: self.on_system_event,
        }, self.on_unexpected)

    # -- the loop ---------------------------------------------------------
    def run(self) -> Stop:
        run, handlers = self.vcpu.run, self.handlers
        observed = bool(self.observers)
        while self.stop is None:
            exit = run()
            self.exits_seen += 1
            if observed:
                stop = self.handle(exit)
            else:  # `handle` without observers, written out: this is the hot path
                stop = handlers[type(exit)](exit)
            if stop is not None and self.stop is None:
                self.stop = stop
        return self.stop

    def handle(self, exit: VcpuExit) -> Stop | None:
        """Everything `run` does with one exit: the observers' `before` in order, the
        handler unless one of them took the exit, their `after` in reverse order."""
        handler, observers = self.handlers[type(exit)], self.observers
        if not observers:
            return handler(exit)
        stop, seen = None, 0
        for observer in observers:
            seen += 1
            if observer.before(self, exit):
                break  # it took the exit: no handler, no later observer
        else:
            stop = handler(exit)
        for observer in observers[seen - 1 :: -1]:
            observer.after(self, exit, stop)
        return stop

    def request_stop(self, stop: Stop) -> None:
        """Ask the loop to end (from a device callback or another thread)."""
        if self.stop is None:
            self.stop = stop

    # -- handlers ---------------------------------------------------------
    def on_io_out(self, exit: IoOut) -> None:
        port, size, data = exit
        hit = self.ports[port]
        if hit is None:
            for i in range(0, len(data), size):
                self.pio.write(port, data[i : i + size])  # counts and logs the unclaimed port
            return None
        device, offset = hit
        if len(data) == size:
            device.write(offset, data)
        else:  # `rep outs` hands us several items at once
            for i in range(0, len(data), size):
                device.write(offset, data[i : i + size])
        return None

    def on_io_in(self, exit: IoIn) -> None:
        port, size, data = exit
        hit = self.ports[port]
        for i in range(0, len(data), size):
            if hit is None:
                data[i : i + size] = self.pio.read(port, size)
            else:
                data[i : i + size] = hit[0].read(hit[1], size)
        return None

    def on_mmio_write(self, exit: MmioWrite) -> None:
        gpa, data = exit
        hit = self.addresses[gpa]
        if hit is None:
            self.mmio.write(gpa, data)  # counts and logs the unclaimed access
        else:
            hit[0].write(hit[1], data)
        return None

    def on_mmio_read(self, exit: MmioRead) -> None:
        gpa, data = exit
        n = len(data)
        hit = self.addresses[gpa]
        data[:] = (self.mmio.read(gpa, n) if hit is None else hit[0].read(hit[1], n))[:n]
        return None

    def on_hlt(self, exit: Hlt) -> Stop:
        # Without the in-kernel irqchip nothing can ever interrupt this vCPU:
        # a halt is the end of the run. With interrupts off it is the normal end.
        if exit.interrupts:
            return Stop(StopKind.POWEROFF, "guest halted with interrupts enabled and no "
                        "interrupt source")
        return Stop(StopKind.POWEROFF, "guest halted with interrupts disabled")

    def on_interrupted(self, exit: Interrupted) -> None:
        # KVM_RUN was interrupted by a signal (Ctrl-C, a kick from another thread);
        # `self.stop` may now be set. Clear immediate_exit so the next entry runs.
        self.vcpu.set_immediate_exit(False)
        if self.on_kick is not None and self.stop is None:
            self.on_kick()
        return None

    def on_irq_window_open(self, exit: IrqWindowOpen) -> None:
        return None  # kvmpy never asks for one; nothing to do if KVM reports it anyway

    def on_shutdown(self, exit: Shutdown) -> Stop:
        return self.fatal("triple fault (KVM_EXIT_SHUTDOWN): an exception occurred while "
                          "delivering a double fault, e.g. no valid IDT", exit)

    def on_fail_entry(self, exit: FailEntry) -> Stop:
        return self.fatal(f"VM entry failed (hardware reason {exit.hardware_reason:#x}, "
                          f"cpu {exit.cpu}): the vCPU state is invalid for its mode", exit)

    def on_internal_error(self, exit: InternalError) -> Stop:
        return self.fatal(f"KVM internal error: {suberror_name(exit.suberror)} (KVM could not "
                          "handle an instruction)", exit)

    def on_system_event(self, exit: SystemEvent) -> Stop:
        if exit.type == SystemEventType.RESET:
            return Stop(StopKind.REBOOT, "guest requested a reset")
        if exit.type == SystemEventType.SHUTDOWN:
            return Stop(StopKind.POWEROFF, "guest powered off")
        return self.fatal(f"guest system event {exit.type} (crash)", exit)

    def on_unexpected(self, exit: VcpuExit) -> Stop:
        return self.fatal(f"unexpected KVM exit {reason_name(reason_of(exit))}", exit)

    def fatal(self, reason: str, exit: VcpuExit) -> Stop:
        # imported only for a dying vCPU: it brings capstone, and start-up is measured
        from kvmpy.diagnostics import describe_vcpu

        return Stop(StopKind.FAULT, reason, details=describe_vcpu(self.vcpu, self.memory, exit))
