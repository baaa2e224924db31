"""The vCPU exit-dispatch loop: enter the guest, handle why it came back, repeat.

What it is: a table from KVM exit reason to a small named handler. I/O and
MMIO exits go to the buses, which pick the device; HLT, SHUTDOWN, failed
entries, emulation failures and system events end the run with a `Stop`.
The hot path (a port write) is one KVM_RUN call, one `struct.unpack_from` of
the shared kvm_run page, a dict lookup for the port and the device call.

What it is not: it builds nothing. The machine hands it a vCPU, its memory
and the two buses. It never decides what a device does.

Learned from kvmtool x86/kvm-cpu.c and rust-vmm kvm-ioctls' typed VcpuExit.
"""

from __future__ import annotations

import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmpy.kvm.exits import IO_OUT, RUN_IF_FLAG, RUN_UNION, ExitReason, InternalError, SystemEvent
from kvmpy.stop import Stop, StopKind

if TYPE_CHECKING:
    from kvmpy.bus import Bus
    from kvmpy.kvm.vcpu import Vcpu
    from kvmpy.memory import GuestMemory
    from kvmpy.trace.stats import ExitStats

_IO = struct.Struct("<BBHIQ")  # kvm_run.io: direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # kvm_run.mmio: phys_addr, data[8], len, is_write
_FAIL_ENTRY = struct.Struct("<QI")  # hardware_entry_failure_reason, cpu
_INTERNAL = struct.Struct("<II")  # suberror, ndata (then data[16] u64)
_SYSTEM_EVENT = struct.Struct("<II")  # type, ndata


class VcpuLoop:
    """Runs one vCPU until something ends the VM; returns the `Stop`."""

    def __init__(self, vcpu: Vcpu, memory: GuestMemory, pio: Bus, mmio: Bus, *,
                 irqchip: bool = False, stats: bool = False) -> None:
        self.vcpu = vcpu
        self.memory = memory
        self.pio = pio
        self.mmio = mmio
        self.irqchip = irqchip
        self.stop: Stop | None = None  # set by a handler, or by another thread to end the run
        self.exits: Counter[int] = Counter()
        self.io_exits: Counter[tuple[str, int]] = Counter()
        self.count_exits = stats
        self.started = self.ended = 0.0
        self.exits_seen = 0
        # called on the vCPU's own thread after a kick (KVM_RUN returned EINTR)
        self.on_kick: Callable[[], None] | None = None
        # port -> (device, offset): the bus's bisect done once per port
        self._ports: dict[int, tuple[object, int]] = {}
        self.handlers: dict[int, Callable[[], Stop | None]] = {
            ExitReason.IO: self.on_io,
            ExitReason.MMIO: self.on_mmio,
            ExitReason.HLT: self.on_hlt,
            ExitReason.INTR: self.on_intr,
            ExitReason.IRQ_WINDOW_OPEN: lambda: None,
            ExitReason.SHUTDOWN: self.on_shutdown,
            ExitReason.FAIL_ENTRY: self.on_fail_entry,
            ExitReason.INTERNAL_ERROR: self.on_internal_error,
            ExitReason.SYSTEM_EVENT: self.on_system_event,
        }
        # Statistics wrap the handlers now, at construction (kvmpy.trace.stats); so do
        # a tracer and a gdb stub when asked. The plain loop below never checks for them.
        self.exit_stats: ExitStats | None = None
        if stats:  # imported only when asked: every module costs start-up under emulation
            from kvmpy.trace.stats import ExitStats

            self.exit_stats = ExitStats.install(self)

    # -- the loop ---------------------------------------------------------
    def run(self) -> Stop:
        run = self.vcpu.run
        handlers = self.handlers
        self.started = time.perf_counter()
        try:
            while self.stop is None:
                reason = run()
                self.exits_seen += 1  # lets the supervisor leave busy vCPUs alone
                handler = handlers.get(reason)
                if handler is None:
                    self.stop = self.fatal(f"unexpected KVM exit {_reason_name(reason)}")
                else:
                    stop = handler()
                    if stop is not None and self.stop is None:
                        self.stop = stop
        finally:
            self.ended = time.perf_counter()
        return self.stop

    def request_stop(self, stop: Stop) -> None:
        """Ask the loop to end (from a device callback or another thread)."""
        if self.stop is None:
            self.stop = stop

    # -- handlers ---------------------------------------------------------
    def on_io(self) -> None:
        page = self.vcpu.run_page
        direction, size, port, count, offset = _IO.unpack_from(page, RUN_UNION)
        hit = self._ports.get(port)
        if hit is None:
            found = self.pio.lookup(port)
            if found is None:
                self._unhandled_io(direction, size, port, count, offset)
                return None
            hit = self._ports[port] = (found[0], found[1])
        device, dev_offset = hit
        if direction == IO_OUT:
            for i in range(count):  # `rep outs` hands us `count` items at once
                start = offset + i * size
                device.write(dev_offset, bytes(page[start : start + size]))  # type: ignore[attr-defined]
        else:
            for i in range(count):
                start = offset + i * size
                page[start : start + size] = device.read(dev_offset, size)  # type: ignore[attr-defined]
        return None

    def _unhandled_io(self, direction: int, size: int, port: int, count: int, offset: int) -> None:
        page = self.vcpu.run_page
        for i in range(count):
            start = offset + i * size
            if direction == IO_OUT:
                self.pio.write(port, bytes(page[start : start + size]))
            else:
                page[start : start + size] = self.pio.read(port, size)

    def on_mmio(self) -> None:
        page = self.vcpu.run_page
        gpa, data, length, is_write = _MMIO.unpack_from(page, RUN_UNION)
        if is_write:
            self.mmio.write(gpa, data[:length])
        else:
            value = self.mmio.read(gpa, length)
            page[RUN_UNION + 8 : RUN_UNION + 8 + length] = value[:length]
        return None

    def on_hlt(self) -> Stop | None:
        # Without the in-kernel irqchip nothing can ever interrupt this vCPU:
        # a halt is the end of the run. With interrupts off it is the normal end.
        if self.vcpu.run_page[RUN_IF_FLAG]:
            return Stop(StopKind.POWEROFF, "guest halted with interrupts enabled and no "
                        "interrupt source")
        return Stop(StopKind.POWEROFF, "guest halted with interrupts disabled")

    def on_intr(self) -> None:
        # KVM_RUN was interrupted by a signal (Ctrl-C, a kick from another thread);
        # `self.stop` may now be set. Clear immediate_exit so the next entry runs.
        self.vcpu.set_immediate_exit(False)
        if self.on_kick is not None and self.stop is None:
            self.on_kick()
        return None

    def on_shutdown(self) -> Stop:
        return self.fatal("triple fault (KVM_EXIT_SHUTDOWN): an exception occurred while "
                          "delivering a double fault, e.g. no valid IDT")

    def on_fail_entry(self) -> Stop:
        reason, cpu = _FAIL_ENTRY.unpack_from(self.vcpu.run_page, RUN_UNION)
        return self.fatal(f"VM entry failed (hardware reason {reason:#x}, cpu {cpu}): "
                          "the vCPU state is invalid for its mode")

    def on_internal_error(self) -> Stop:
        suberror, ndata = _INTERNAL.unpack_from(self.vcpu.run_page, RUN_UNION)
        try:
            what = InternalError(suberror).name.lower().replace("_", " ")
        except ValueError:
            what = f"suberror {suberror}"
        return self.fatal(f"KVM internal error: {what} (KVM could not handle an instruction)")

    def on_system_event(self) -> Stop:
        kind, _ = _SYSTEM_EVENT.unpack_from(self.vcpu.run_page, RUN_UNION)
        if kind == SystemEvent.RESET:
            return Stop(StopKind.REBOOT, "guest requested a reset")
        if kind == SystemEvent.SHUTDOWN:
            return Stop(StopKind.POWEROFF, "guest powered off")
        return self.fatal(f"guest system event {kind} (crash)")

    def fatal(self, reason: str) -> Stop:
        from kvmpy.diagnostics import describe_vcpu

        return Stop(StopKind.FAULT, reason, details=describe_vcpu(self.vcpu, self.memory))

    # -- statistics -------------------------------------------------------
    def stats(self) -> dict[str, object]:
        wall = (self.ended or time.perf_counter()) - self.started
        exits, io_exits = Counter(dict(self.exits)), Counter(dict(self.io_exits))  # copies
        total = sum(exits.values())
        return {
            "vcpu": self.vcpu.index,
            "exits": total,
            "by_reason": {_reason_name(r): n for r, n in exits.most_common()},
            "by_address": {f"{bus}:{addr:#x}": n for (bus, addr), n in
                           io_exits.most_common()},
            "wall_s": round(wall, 6),
            "mean_exit_us": round(wall / total * 1e6, 3) if total else None,
            **(self.exit_stats.snapshot() if self.exit_stats else {}),
        }


def _reason_name(reason: int) -> str:
    try:
        return ExitReason(reason).name
    except ValueError:
        return str(reason)
