"""`make bench`: every kvmpy benchmark, one JSON object on stdout.

Each benchmark measures kvmpy against a reference in the same run (a C loop,
QEMU) and reports the ratio; targets are stated beside the figures, never
asserted in tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exit_latency  # noqa: E402
import fast_reset  # noqa: E402
import flat_startup  # noqa: E402
import fuzz_rate  # noqa: E402
import isolation_cost  # noqa: E402
import linux_boot  # noqa: E402
import migrate  # noqa: E402
import ninep  # noqa: E402
import sandbox_start  # noqa: E402
import snapshot_restore  # noqa: E402
import trace_overhead  # noqa: E402
import virtio_blk  # noqa: E402

BENCHMARKS = {
    "pio_exit_round_trip": exit_latency.main,
    "flat_hello_process": flat_startup.main,
    "trace_compiled_in_but_off": trace_overhead.main,
    "linux_boot_to_init": linux_boot.main,
    "virtio_blk_throughput": virtio_blk.main,
    "virtio_9p_read_and_walk": ninep.main,
    "sandbox_true": sandbox_start.main,
    "linux_snapshot_restore": snapshot_restore.main,
    "flat_fast_reset": fast_reset.main,
    "fuzz_inputs": fuzz_rate.main,
    "linux_live_migration": migrate.main,
    "isolation_cost": isolation_cost.main,
}


def main(names: list[str]) -> int:
    results = {}
    for name, bench in BENCHMARKS.items():
        if names and name not in names:
            continue
        results[name] = bench()
        print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
