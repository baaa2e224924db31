"""What tracing and statistics cost the exit path: nothing when off, a known price when on.

kvmpy's tracer and exit statistics are observers a `VcpuLoop` is given at
construction, only when asked for; a loop without observers makes no call for
them. So the loop as shipped (tracing compiled in, switched off) should run as
fast as a loop written with no notion of tracing at all. This benchmark
measures both on the same guest (guests/tests/pio_loop.S: N `out`
instructions, then `hlt`), alternately, several rounds, and reports the
median time per exit and their ratio.
Target: ratio <= 1.02.

For scale it also reports what switching them on costs per exit: `--stats`
(two clock reads and a few dict updates) and `--trace` (two ioctls and a
disassembly per exit, written to /dev/null).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from common import GUESTS, median

from kvmpy.cpu.modes import Mode
from kvmpy.exitloop import VcpuLoop
from kvmpy.machine import FlatConfig, Machine, MachineConfig
from kvmpy.stop import Stop
from kvmpy.trace.filter import TraceFilter
from kvmpy.trace.tracer import Tracer

N = 100_000
N_TRACED = 2_000  # tracing on is ~100x slower per exit: fewer exits, same per-exit figure
ROUNDS = 9


def reference_run(loop: VcpuLoop) -> Stop:
    """The exit loop with tracing absent: enter, look the handler up, call it. Nothing else."""
    run, handlers = loop.vcpu.run, loop.handlers
    while loop.stop is None:
        exit = run()
        stop = handlers[type(exit)](exit)
        if stop is not None and loop.stop is None:
            loop.stop = stop
    return loop.stop


def ns_per_exit(exits: int, *, stats: bool = False, trace: bool = False,
                runner: Callable[[VcpuLoop], Stop] | None = None) -> float:
    flat = FlatConfig(GUESTS / "pio_loop.bin", Mode.REAL, gprs={"rcx": exits})
    sink = open(os.devnull, "w")  # closed below
    tracer = Tracer(TraceFilter(), sink) if trace else None
    machine = Machine(MachineConfig(mem_size=2 << 20, flat=flat, stats=stats, trace=tracer))
    t = time.perf_counter()
    if runner is None:
        machine.run()
    else:
        runner(machine.loops[0])
    elapsed = time.perf_counter() - t
    machine.close()
    sink.close()
    return elapsed * 1e9 / exits


def main() -> dict[str, object]:
    shipped, reference, ratios, stats, traced = [], [], [], [], []
    for i in range(ROUNDS):
        # each round measures both back to back, in alternating order, and keeps their
        # ratio: on a shared 2-core machine that cancels most of the drift between rounds
        if i % 2 == 0:
            ref = ns_per_exit(N, runner=reference_run)
            off = ns_per_exit(N)
        else:
            off = ns_per_exit(N)
            ref = ns_per_exit(N, runner=reference_run)
        reference.append(ref)
        shipped.append(off)
        ratios.append(off / ref)
        stats.append(ns_per_exit(N, stats=True))
        traced.append(ns_per_exit(N_TRACED, trace=True))
    return {
        "exits_per_round": N,
        "rounds": ROUNDS,
        "tracing_off_ns_per_exit": round(median(shipped), 1),
        "tracing_absent_ns_per_exit": round(median(reference), 1),
        "ratio": round(median(ratios), 4),  # median of the per-round ratios
        "ratio_of_minimums": round(min(shipped) / min(reference), 4),
        "target_ratio_max": 1.02,
        "stats_on_ns_per_exit": round(median(stats), 1),
        "trace_on_ns_per_exit": round(median(traced), 1),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
