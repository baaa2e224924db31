"""Exit statistics: how many exits of each kind, and how long kvmpy spent handling them.

What it is: `ExitStats`, an observer of one `VcpuLoop` (kvmpy.exitloop.ExitObserver)
that counts every exit and times the loop's handler for it (`time.perf_counter_ns`
in `before` and `after`), keyed by exit reason, by port or MMIO page, and by the
device (bus label) that owns the address. The machine gives a loop one only when
statistics are asked for, as its innermost observer, so the time is the handler's
own; a loop without statistics pays nothing for this module existing.

The counters are plain dicts updated by the vCPU's own thread; `snapshot()`
copies them (a dict copy is atomic under the GIL), so `Machine.stats()` can be
read from another thread while the guest runs. `format_table` turns the
machine's statistics into the table `kvmpy run --stats` prints at exit.

What it is not: a profiler of the guest. Time inside KVM_RUN (guest time and
KVM's own work) is only visible as the wall time between exits.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from kvmpy.kvm.exits import IoIn, IoOut, MmioRead, MmioWrite, VcpuExit, reason_name, reason_of

if TYPE_CHECKING:
    from kvmpy.exitloop import VcpuLoop
    from kvmpy.stop import Stop

NO_DEVICE = "(none)"


class ExitStats:
    """Counters and handler time for the loop of vCPU `index`."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.exits: Counter[int] = Counter()  # by KVM_EXIT_* reason
        self.reason_ns: Counter[int] = Counter()
        self.io_exits: Counter[tuple[str, int]] = Counter()  # by ("pio", port), ("mmio", page)
        self.address_ns: Counter[tuple[str, int]] = Counter()
        self.device_exits: Counter[str] = Counter()
        self.device_ns: Counter[str] = Counter()
        self.first_ns = self.last_ns = 0  # when the first exit came, and the latest ended
        self._started = 0  # the current handler's start
        self._labels: dict[tuple[str, int], str] = {}

    # -- the observer ------------------------------------------------------
    def before(self, loop: VcpuLoop, exit: VcpuExit) -> bool:
        self._started = time.perf_counter_ns()
        return False

    def after(self, loop: VcpuLoop, exit: VcpuExit, stop: Stop | None) -> None:
        self.last_ns = now = time.perf_counter_ns()
        dt = now - self._started
        if not self.first_ns:
            self.first_ns = self._started
        reason = reason_of(exit)
        self.exits[reason] += 1
        self.reason_ns[reason] += dt
        kind = type(exit)
        if kind is IoOut or kind is IoIn:
            key = ("pio", exit.port)  # type: ignore[union-attr]
        elif kind is MmioWrite or kind is MmioRead:
            key = ("mmio", exit.gpa)  # type: ignore[union-attr]
        else:
            return
        label = self._labels.get(key) or self._label(loop, key)
        if key[0] == "mmio":
            key = ("mmio", key[1] & ~0xFFF)  # counted by page
        self.io_exits[key] += 1
        self.address_ns[key] += dt
        self.device_exits[label] += 1
        self.device_ns[label] += dt

    def _label(self, loop: VcpuLoop, key: tuple[str, int]) -> str:
        """The device at ("pio", port) or ("mmio", gpa), as the bus names it; remembered."""
        bus, addr = key
        hit = (loop.pio if bus == "pio" else loop.mmio).lookup(addr)
        label = self._labels[key] = hit[2] if hit else NO_DEVICE
        return label

    # -- reading -----------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Everything counted so far, for `Machine.stats()` (copied: safe while running)."""
        exits, io_exits = dict(self.exits), dict(self.io_exits)
        reason_ns, address_ns = dict(self.reason_ns), dict(self.address_ns)
        device_exits, device_ns = dict(self.device_exits), dict(self.device_ns)
        total = sum(exits.values())
        wall = (self.last_ns - self.first_ns) / 1e9
        return {
            "vcpu": self.index,
            "exits": total,
            "by_reason": {reason_name(r): n for r, n in _desc(exits)},
            "by_address": {f"{bus}:{addr:#x}": n for (bus, addr), n in _desc(io_exits)},
            "wall_s": round(wall, 6),  # from the first exit to the end of the latest
            "mean_exit_us": round(wall / (total - 1) * 1e6, 3) if total > 1 else None,
            "by_device": dict(_desc(device_exits)),
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
