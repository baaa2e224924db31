"""`kvmpy run --flat hello_real.bin`, process start to exit, wall clock.

Reference in the same run: the C exit loop's whole process (create VM, run a
tiny guest, exit), which is the floor any VMM process pays. Target: kvmpy
under 150 ms.
"""

from __future__ import annotations

import subprocess
import sys
import time

from common import GUESTS, build_c, median

ROUNDS = 10


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> dict[str, object]:
    hello = str(GUESTS / "hello_real.bin")
    exe = str(build_c("exit_loop"))
    kvmpy = [timed([sys.executable, "-m", "kvmpy", "run", "--flat", hello])
             for _ in range(ROUNDS)]
    c = [timed([exe, str(GUESTS / "pio_loop.bin"), "1"]) for _ in range(ROUNDS)]
    return {
        "rounds": ROUNDS,
        "kvmpy_ms": round(median(kvmpy) * 1e3, 1),
        "c_minimal_vmm_ms": round(median(c) * 1e3, 1),
        "ratio": round(median(kvmpy) / median(c), 2),
        "target_kvmpy_ms_max": 150,
    }
