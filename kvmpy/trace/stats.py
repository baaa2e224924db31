"""Exit statistics: how many exits of each kind, and how long kvmpy spent handling them.

What it is: `ExitStats.install(loop)` replaces each entry of a `VcpuLoop`'s
handler table with a wrapper that counts the exit and times the handler
(`time.perf_counter_ns` around it), keyed by exit reason, by port or MMIO
page, and by the device (bus label) that owns the address. Counting is chosen
at construction: a loop without statistics runs its handlers unwrapped, so
the plain exit path pays nothing for this module existing.

The counters are plain dicts updated by the vCPU's own thread; `snapshot()`
copies them (a dict copy is atomic under the GIL), so `Machine.stats()` can be
read from another thread while the guest runs. `format_table` turns the
machine's statistics into the table `kvmpy run --stats` prints at exit.

What it is not: a profiler of the guest. Time inside KVM_RUN (guest time and
KVM's own work) is only visible as the wall time between exits.
"""

from __future__ import annotations

import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvmpy.kvm.exits import RUN_UNION, ExitReason

if TYPE_CHECKING:
    from kvmpy.exitloop import VcpuLoop

_IO_PORT = struct.Struct("<2xH")  # kvm_run.io: direction, size, port
_MMIO_GPA = struct.Struct("<Q")  # kvm_run.mmio.phys_addr
NO_DEVICE = "(none)"
Handler = Callable[[], Any]


def reason_name(reason: int) -> str:
    try:
        return ExitReason(reason).name
    except ValueError:
        return str(reason)


class ExitStats:
    """Counters and handler time for one vCPU loop."""

    def __init__(self, loop: VcpuLoop) -> None:
        # the loop's own Counters, so VcpuLoop.stats() keeps its keys
        self.exits: Counter[int] = loop.exits
        self.io_exits: Counter[tuple[str, int]] = loop.io_exits
        self.reason_ns: Counter[int] = Counter()
        self.address_ns: Counter[tuple[str, int]] = Counter()
        self.device_exits: Counter[str] = Counter()
        self.device_ns: Counter[str] = Counter()
        self._labels: dict[tuple[str, int], str] = {}

    @classmethod
    def install(cls, loop: VcpuLoop) -> ExitStats:
        """Wrap every handler in `loop.handlers`; later additions are not counted."""
        stats = cls(loop)
        for reason, handler in list(loop.handlers.items()):
            if reason == ExitReason.IO:
                loop.handlers[reason] = stats._wrap_io(loop, handler)
            elif reason == ExitReason.MMIO:
                loop.handlers[reason] = stats._wrap_mmio(loop, handler)
            else:
                loop.handlers[reason] = stats._wrap(reason, handler)
        return stats

    def _wrap(self, reason: int, handler: Handler) -> Handler:
        exits, reason_ns, clock = self.exits, self.reason_ns, time.perf_counter_ns

        def counted() -> Any:
            t = clock()
            stop = handler()
            reason_ns[reason] += clock() - t
            exits[reason] += 1
            return stop

        return counted

    def _label(self, loop: VcpuLoop, bus: str, addr: int) -> str:
        key = (bus, addr)
        label = self._labels.get(key)
        if label is None:
            hit = (loop.pio if bus == "pio" else loop.mmio).lookup(addr)
            label = self._labels[key] = hit[2] if hit else NO_DEVICE
        return label

    def _wrap_io(self, loop: VcpuLoop, handler: Handler) -> Handler:
        page, clock = loop.vcpu.run_page, time.perf_counter_ns
        exits, io_exits, reason_ns, address_ns = (self.exits, self.io_exits, self.reason_ns,
                                                  self.address_ns)
        device_exits, device_ns = self.device_exits, self.device_ns
        unpack = _IO_PORT.unpack_from
        reason = int(ExitReason.IO)

        def counted_io() -> Any:
            key = ("pio", unpack(page, RUN_UNION)[0])
            t = clock()
            stop = handler()
            dt = clock() - t
            exits[reason] += 1
            reason_ns[reason] += dt
            io_exits[key] += 1
            address_ns[key] += dt
            label = self._label(loop, *key)
            device_exits[label] += 1
            device_ns[label] += dt
            return stop

        return counted_io

    def _wrap_mmio(self, loop: VcpuLoop, handler: Handler) -> Handler:
        page, clock = loop.vcpu.run_page, time.perf_counter_ns
        unpack = _MMIO_GPA.unpack_from
        reason = int(ExitReason.MMIO)

        def counted_mmio() -> Any:
            gpa = unpack(page, RUN_UNION)[0]
            t = clock()
            stop = handler()
            dt = clock() - t
            key = ("mmio", gpa & ~0xFFF)
            self.exits[reason] += 1
            self.reason_ns[reason] += dt
            self.io_exits[key] += 1
            self.address_ns[key] += dt
            label = self._label(loop, "mmio", gpa)
            self.device_exits[label] += 1
            self.device_ns[label] += dt
            return stop

        return counted_mmio

    def snapshot(self) -> dict[str, Any]:
        """The handler-time part of `VcpuLoop.stats()` (copied: safe while running)."""
        reason_ns, address_ns = dict(self.reason_ns), dict(self.address_ns)
        device_exits, device_ns = dict(self.device_exits), dict(self.device_ns)
        return {
            "by_device": dict(sorted(device_exits.items(), key=lambda kv: -kv[1])),
            "handler_us": {
                "by_reason": {reason_name(r): _us(ns) for r, ns in _desc(reason_ns)},
                "by_address": {f"{bus}:{addr:#x}": _us(ns) for (bus, addr), ns in
                               _desc(address_ns)},
                "by_device": {label: _us(ns) for label, ns in _desc(device_ns)},
            },
        }


def _desc(d: dict[Any, int]) -> list[tuple[Any, int]]:
    return sorted(d.items(), key=lambda kv: -kv[1])


def _us(ns: int) -> float:
    return round(ns / 1000, 3)


def format_table(stats: dict[str, Any]) -> str:
    """`Machine.stats()` as the table printed at exit: per vCPU, reasons then addresses."""
    lines: list[str] = []
    for vcpu in stats.get("vcpus", []):
        mean = vcpu.get("mean_exit_us")
        lines.append(f"vCPU {vcpu['vcpu']}: {vcpu['exits']} exits in {vcpu['wall_s']:.6f} s" +
                     (f", {mean:.3f} us per exit round trip" if mean else ""))
        times = vcpu.get("handler_us", {})
        lines.append(_rows("reason", vcpu.get("by_reason", {}), times.get("by_reason", {})))
        if vcpu.get("by_address"):
            lines.append(_rows("port / MMIO page", vcpu["by_address"],
                               times.get("by_address", {})))
        if vcpu.get("by_device"):
            lines.append(_rows("device", vcpu["by_device"], times.get("by_device", {})))
    for bus in ("pio", "mmio"):
        unhandled = stats.get(f"unhandled_{bus}") or {}
        if unhandled:
            lines.append(f"unclaimed {bus} accesses: " +
                         ", ".join(f"{a} x{n}" for a, n in unhandled.items()))
    return "\n".join(lines)


def _rows(title: str, counts: dict[str, int], times: dict[str, float]) -> str:
    width = max([len(title), *(len(k) for k in counts)])
    out = [f"  {title:<{width}}  {'exits':>9}  {'handler us':>12}  {'us/exit':>9}"]
    for key, n in counts.items():
        t = times.get(key)
        tail = f"{t:>12.1f}  {t / n:>9.3f}" if t is not None and n else f"{'-':>12}  {'-':>9}"
        out.append(f"  {key:<{width}}  {n:>9}  {tail}")
    return "\n".join(out)
