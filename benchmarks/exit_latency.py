"""PIO exit round trip: kvmpy's exit loop against a minimal C VMM, same guest.

The guest (guests/tests/pio_loop.S) does N `out` instructions to port 0x80
and halts. Both VMMs run it on this machine's /dev/kvm, alternately, several
times; the figure is the median time per exit. Target: ratio <= 1.5.
"""

from __future__ import annotations

import json
import subprocess
import time

from common import GUESTS, build_c, median

from kvmpy.cpu.modes import Mode
from kvmpy.machine import FlatConfig, Machine, MachineConfig

N = 200_000
ROUNDS = 5


def kvmpy_ns_per_exit() -> float:
    flat = FlatConfig(GUESTS / "pio_loop.bin", Mode.REAL, gprs={"rcx": N})
    machine = Machine(MachineConfig(mem_size=2 << 20, flat=flat))
    t = time.perf_counter()
    machine.run()
    elapsed = time.perf_counter() - t
    machine.close()
    return elapsed * 1e9 / N


def c_ns_per_exit() -> float:
    exe = build_c("exit_loop")
    out = subprocess.run([str(exe), str(GUESTS / "pio_loop.bin"), str(N)], check=True,
                         capture_output=True, text=True).stdout
    return float(json.loads(out)["ns_per_exit"])


def main() -> dict[str, object]:
    py, c = [], []
    for _ in range(ROUNDS):
        c.append(c_ns_per_exit())
        py.append(kvmpy_ns_per_exit())
    kvmpy_ns, c_ns = median(py), median(c)
    return {
        "exits_per_round": N,
        "rounds": ROUNDS,
        "kvmpy_ns_per_exit": round(kvmpy_ns, 1),
        "c_ns_per_exit": round(c_ns, 1),
        "ratio": round(kvmpy_ns / c_ns, 3),
        "target_ratio_max": 1.5,
    }
