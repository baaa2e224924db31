"""What confinement costs is measured fairly: every mode in every place of a round, never
twice in a row, and each transfer timed by the guest's clock in ns."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.bench_kit import bench_module


def test_the_order_rotates_so_each_mode_runs_once_in_each_place() -> None:
    cost = bench_module("isolation_cost")
    modes = list(cost.MODES)
    for first in range(0, 9, len(modes)):
        rounds = [cost.rotation(i) for i in range(first, first + len(modes))]
        for place in range(len(modes)):
            assert sorted(r[place] for r in rounds) == sorted(modes)
    runs = [m for i in range(9) for m in cost.rotation(i)]
    assert all(a != b for a, b in zip(runs, runs[1:], strict=False))


def test_costs_per_round_and_of_the_medians() -> None:
    cost = bench_module("isolation_cost")
    rates = {"off": [100.0, 90.0, 110.0], "kill": [99.0, 89.1, 108.9],
             "landlock": [90.0, 81.0, 99.0]}
    out = cost.costs(rates, slower=False)
    assert out["cost_kill"] == pytest.approx(0.01)
    assert out["cost_landlock"] == pytest.approx(0.1)
    assert out["cost_kill_of_medians"] == pytest.approx(0.01)
    times = {"off": [2.0, 2.0], "kill": [2.02, 2.02], "landlock": [2.0, 2.0]}
    assert cost.costs(times, slower=True)["cost_kill_of_medians"] == pytest.approx(0.01)


def test_a_transfer_is_timed_in_ns_by_the_guests_clock(tmp_path: Path) -> None:
    blk = bench_module("virtio_blk")
    now = blk.BENCH_SCRIPT.splitlines()[0]
    assert now.startswith("now() {") and "/proc/timer_list" in now
    timer_list = tmp_path / "timer_list"
    timer_list.write_text("Timer List Version: v0.9\nHRTIMER_MAX_CLOCK_BASES: 8\n"
                          "now at 2866436346897 nsecs\n\ncpu: 0\n")
    script = now.replace("/proc/timer_list", str(timer_list)) + "\nnow\n"
    assert subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                          check=True).stdout == "2866436346897\n"
    # 128 MiB written in 1 s and read in 0.5 s
    line = b"blkbench write 0 1000000000 2000000000 read 0 3000000000 3500000000 end"
    found = blk.RESULT.search(line)
    assert found is not None
    size = blk.IMAGE_MIB << 20
    assert blk.rates(found, "kvmpy") == pytest.approx(
        {"write_mb_s": size / 1e6, "read_mb_s": 2 * size / 1e6})
    failed = blk.RESULT.search(line.replace(b"write 0", b"write 1"))
    assert failed is not None
    with pytest.raises(RuntimeError, match="dd failed"):
        blk.rates(failed, "kvmpy")


def test_a_boots_first_transfers_are_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    cost = bench_module("isolation_cost")
    blk = bench_module("virtio_blk")
    size = blk.IMAGE_MIB << 20

    def line(write_s: float, read_s: float) -> bytes:  # a pass, timed in ns
        return (f"blkbench write 0 0 {int(write_s * 1e9)} read 0 0 {int(read_s * 1e9)} "
                "end\n").encode()

    # the warm-up far slower than the counted passes, which differ among themselves
    output = line(4.0, 4.0) + b"".join(line(1.0 + i / 10, 0.5) for i in range(cost.PASSES))

    def run_until(name: str, argv: list[str], pattern: Any) -> bytes:
        short = output.rsplit(b"blkbench", 1)[0]
        assert pattern.search(short) is None, "stops before the last pass"
        assert pattern.search(output) is not None
        return output

    monkeypatch.setattr(cost, "run_until", run_until)
    assert cost.WARMUP_PASSES == 1
    got = cost._disk_passes(blk, "kvmpy", [])
    counted = sorted(size / 1e6 / (1.0 + i / 10) for i in range(cost.PASSES))
    assert got["write_mb_s"] == pytest.approx(cost.median(counted))
    assert got["read_mb_s"] == pytest.approx(2 * size / 1e6)


def test_the_bench_asks_for_its_labs_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """isolation_cost's lab has LAB_CPUS (one), the other benches' BENCH_LAB_CPUS; a
    quiet command is the command's failure, not the lab's (no retry)."""
    import kvmpy.lab

    common = bench_module("common")
    runs: list[dict[str, Any]] = []

    def run_in_lab(argv: list[str], **kwargs: Any) -> int:
        runs.append(kwargs)
        Path(argv[-1]).write_text('{"boot_s": 1.0}')
        return 0

    monkeypatch.setattr(kvmpy.lab, "can_boot_linux", lambda: False)
    monkeypatch.setattr(kvmpy.lab, "run_in_lab", run_in_lab)
    assert common.in_linux_capable_place("bench.py", dict, lab_cpus=1)["boot_s"] == 1.0
    assert common.in_linux_capable_place("bench.py", dict)["boot_s"] == 1.0
    assert [r["cpus"] for r in runs] == [1, common.BENCH_LAB_CPUS]
    assert bench_module("isolation_cost").LAB_CPUS == 1
    assert all("quiet_timeout" not in r and "instruction_clock" not in r for r in runs)
