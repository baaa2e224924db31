"""What confinement costs (docs/isolation.md): kvmpy's minimal guest booted to its /init,
and virtio-blk throughput, with no confinement (`--seccomp off`) beside the default
(`--seccomp kill`, each thread on its allow-list) and the default with Landlock
(`--landlock on`), side by side in one lab session (LAB_CPUS, below). Target: at
most 3%.

The boot figure is what lock_down adds on the way (libseccomp loaded, the filters
compiled and loaded, the Landlock rules, the I/O thread restarted); the disk figure is
what the filters add to each of the vCPU's and the I/O thread's system calls (a BPF
program run per call; Landlock checks only opens, and there are none after set-up).
Both are timed by the lab's wall clock, the transfers by the guest's in ns
(benchmarks/virtio_blk.py). In a lab of two CPUs a boot moved by 10-20% from boot to
boot and a disk boot's rate took one of two levels; in a lab of one a session's boots
stay within -7 ... +8% and its disk boots +-5% (docs/isolation.md). The lab's
instruction clock, steadier still for boots (+-1%), is not used: there a nested guest
deadlocks now and then, in disk boots often (6 in at most 20) and since 2026-12-08 in
plain boots too (2 sessions of 2; docs/lab.md).
A third figure measures the filters where nothing else varies: the PIO exit loop of
benchmarks/exit_latency.py (one KVM_RUN per exit, the call a filter is run for at every
call), in a process per run, beside the disk.

The lab's timings drift within a session as well as between sessions, so the modes run
in rounds, each mode once a round, in an order that rotates every round (off, kill,
landlock; kill, landlock, off; landlock, off, kill; ...): over three rounds each mode
runs once in each place, and never twice in a row. (An order that turned around every
round put Landlock first in every odd round and `off` first in every even one; in one
session the first run of a round was the slower by 1-5% on average, so Landlock's cost
came out high in odd rounds and low in even ones.) Each disk figure is the median of
PASSES transfers in one boot, after WARMUP_PASSES not counted: a boot's first write is
slower than its next ones, by 1-18% (median 7%; reading, -4 to +13%), by an amount that
moves from boot to boot, so a median of three that counts it keeps some of that. Each
cost is the median over the rounds of the round's ratio to `off` in that round, with the
quartiles of those ratios beside it: a cost inside its quartiles' spread is noise, not
a cost.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    GUESTS,
    bench_initrd,
    guest_argvs,
    linux_guest_benchmark,
    median,
    run_until,
    write_result,
)

ROUNDS = int(os.environ.get("KVMPY_BENCH_ROUNDS", "9"))  # a multiple of 3: see rotation()
WARMUP_PASSES = 1  # virtio_blk's write-then-read, this many times a boot, not counted;
PASSES = 4  # then this many: the boot's median
MODES = {"off": ["--seccomp", "off"], "kill": ["--seccomp", "kill"],
         "landlock": ["--seccomp", "kill", "--landlock", "on"]}
# what to measure (KVMPY_ISOLATION, any of): `boot`, `disk` and `exits`; `linux` is
# `boot disk`
FIGURE_NAMES = ("boot", "disk", "exits")
EXITS, EXIT_ROUNDS = 20_000, 10  # the PIO exit loop: ~100 us an exit in the lab
# In a lab of two CPUs a disk boot's rate took one of two levels (reading, ~160 or
# ~175-190 MB/s), the lower only in confined boots in one session: likely where the lab
# put the vCPU and I/O threads, not what the filters cost. With one CPU every boot runs
# both threads on it.
LAB_CPUS = 1


def rotation(i: int) -> list[str]:
    """Round `i`'s order of the modes: the modes rotated by `i`."""
    modes = list(MODES)
    return modes[i % len(modes):] + modes[:i % len(modes)]


def quartiles(values: list[float]) -> list[float]:
    s = sorted(values)
    return [s[len(s) // 4], s[(3 * len(s)) // 4]]


def costs(figures: dict[str, list[float]], slower: bool) -> dict[str, object]:
    """Each confined mode against `off`, round by round: its median cost (a fraction;
    `slower`: the figure is a time, so more is worse; else a rate) and the quartiles of
    the rounds' costs; and the cost of its median against `off`'s."""
    out: dict[str, object] = {}
    for mode in MODES:
        if mode == "off":
            continue
        rounds = [(x / o - 1) if slower else (1 - x / o)
                  for x, o in zip(figures[mode], figures["off"], strict=True)]
        out[f"cost_{mode}"] = round(median(rounds), 4)
        out[f"cost_{mode}_quartiles"] = [round(c, 4) for c in quartiles(rounds)]
        # the same from each mode's median over the session (rotation() spreads the
        # drift evenly over the modes): less noisy than a ratio of two single runs
        ratio = median(figures[mode]) / median(figures["off"])
        out[f"cost_{mode}_of_medians"] = round((ratio - 1) if slower else (1 - ratio), 4)
    return out


def _disk_passes(virtio_blk: Any, name: str, argv: list[str]) -> dict[str, float]:
    """One boot running virtio_blk's script WARMUP_PASSES + PASSES times: the median MB/s
    each way of the last PASSES."""
    seen = run_until(name, argv, re.compile(rb"(?s)(blkbench write.*?end.*?){%d}"
                                            % (WARMUP_PASSES + PASSES)))
    passes = [virtio_blk.rates(m, name) for m in virtio_blk.RESULT.finditer(seen)]
    passes = passes[WARMUP_PASSES:]
    return {key: median([p[key] for p in passes]) for key in ("write_mb_s", "read_mb_s")}


def exit_ns(mode: str) -> float:
    """ns per PIO exit of the pio_loop guest (benchmarks/exit_latency.py's) under `mode`,
    in a process of its own: a filter lasts as long as its process."""
    from kvmpy.cpu.modes import Mode
    from kvmpy.isolation.landlock import python_rules
    from kvmpy.machine import FlatConfig, Machine, MachineConfig

    flat = FlatConfig(GUESTS / "pio_loop.bin", Mode.REAL, gprs={"rcx": EXITS})
    machine = Machine(MachineConfig(mem_size=2 << 20, flat=flat,
                                    seccomp="off" if mode == "off" else "kill",
                                    landlock=python_rules() if mode == "landlock" else None))
    t = time.perf_counter()
    machine.run()
    elapsed = time.perf_counter() - t
    machine.close()
    return elapsed * 1e9 / EXITS


def _exits(mode: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--exits", mode], check=True,
                         capture_output=True, text=True).stdout
    return float(out)


def figures_wanted() -> list[str]:
    wanted = os.environ.get("KVMPY_ISOLATION", " ".join(FIGURE_NAMES)).replace(
        "linux", "boot disk").split()
    unknown = set(wanted) - set(FIGURE_NAMES)
    if unknown:
        raise SystemExit(f"KVMPY_ISOLATION: unknown figures {sorted(unknown)} "
                         f"(known: {', '.join(FIGURE_NAMES)}, linux)")
    return [f for f in FIGURE_NAMES if f in wanted]


def measure(figures: list[str] | None = None) -> dict[str, object]:
    """Inside a place where Linux boots: `figures`, or KVMPY_ISOLATION's."""
    figures = figures_wanted() if figures is None else figures
    out: dict[str, object] = {"figures": figures,
                              "modes": {m: " ".join(args) for m, args in MODES.items()}}
    if "exits" in figures:
        # The filter's cost per system call, where nothing but KVM_RUN and the exit's
        # Python runs: the most the filters can cost anything else per exit
        exits: dict[str, list[float]] = {m: [] for m in MODES}
        for i in range(EXIT_ROUNDS):
            for m in rotation(i):
                exits[m].append(_exits(m))
        out["exit_rounds"], out["exits_per_run"] = EXIT_ROUNDS, EXITS
        out["pio_exit_ns"] = {m: round(median(exits[m])) for m in MODES}
        out["pio_exit_ns_all"] = {m: [round(x) for x in exits[m]] for m in MODES}
        out["pio_exit"] = costs(exits, slower=True)
    if "boot" in figures or "disk" in figures:
        out.update(_boots_and_disks(boots="boot" in figures, disks="disk" in figures))
    out["target_cost_max"] = 0.03
    return out


def _boots_and_disks(boots: bool, disks: bool) -> dict[str, object]:
    import linux_boot
    import virtio_blk

    from kvmpy import assets
    from kvmpy.initramfs import INIT_MARKER

    kernel = str(assets.kernel_path().bzimage)
    initrd = str(assets.initramfs_path())
    kvmpy = [str(Path(sys.executable).with_name("kvmpy")), "run", "--kernel", kernel,
             "--initrd", initrd, "--append", linux_boot.APPEND]
    boot_s: dict[str, list[float]] = {m: [] for m in MODES}
    blk: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    where = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        blk_initrd = bench_initrd(Path(tmp) / "blkbench.cpio.gz", "blkbench.sh",
                                  virtio_blk.BENCH_SCRIPT * (WARMUP_PASSES + PASSES))
        image = Path(tmp) / "disk.img"
        with open(image, "wb") as f:
            f.truncate(virtio_blk.IMAGE_MIB << 20)
        for i in range(ROUNDS):
            order = rotation(i)
            for m in order if boots else ():
                boot_s[m].append(linux_boot._time_to_marker(kvmpy + MODES[m],
                                                            INIT_MARKER.encode()))
            for m in order if disks else ():
                argv, _ = guest_argvs(kernel, blk_initrd, "quiet -- sh /blkbench.sh",
                                      ["--disk", str(image), *MODES[m]], [])
                blk[m].append(_disk_passes(virtio_blk, f"kvmpy {m}", argv))
            print(f"isolation_cost round {i}: " + "; ".join(
                f"{m}:" + (f" boot {boot_s[m][-1]:.2f} s" if boots else "") + (
                    f" write {blk[m][-1]['write_mb_s']:.1f}, "
                    f"read {blk[m][-1]['read_mb_s']:.1f} MB/s" if disks else "")
                for m in MODES), file=sys.stderr, flush=True)
    out: dict[str, object] = {"rounds": ROUNDS, "blk_passes_per_boot": PASSES if disks else 0,
                              "blk_warmup_passes_per_boot": WARMUP_PASSES if disks else 0}
    if boots:
        out["boot_s"] = {m: round(median(boot_s[m]), 3) for m in MODES}
        out["boot_s_all"] = {m: [round(x, 3) for x in boot_s[m]] for m in MODES}
        out["boot"] = costs(boot_s, slower=True)
    for key in ("write_mb_s", "read_mb_s") if disks else ():
        figures = {m: [r[key] for r in blk[m]] for m in MODES}
        name = f"blk_{key.removesuffix('_mb_s')}"
        out[f"{name}_mb_s"] = {m: round(median(figures[m]), 1) for m in MODES}
        out[f"{name}_mb_s_all"] = {m: [round(x, 1) for x in figures[m]] for m in MODES}
        out[name] = costs(figures, slower=False)
    return out


def main() -> dict[str, object]:
    """Every figure in one lab session. (The lab's own run of this script measures the
    figures that KVMPY_ISOLATION, which it inherits, names.)"""
    return linux_guest_benchmark(__file__, partial(measure, figures_wanted()),
                                 lab_cpus=LAB_CPUS)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if sys.argv[1] == "--exits":
        print(exit_ns(sys.argv[2]))
    else:
        write_result(sys.argv[1], measure)
