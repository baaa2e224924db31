"""The soak's report counts what it says: guest deaths per VMM, lab deaths and stalls apart."""

from __future__ import annotations

from tests.bench_kit import bench_module


def boot(vmm: str, ok: bool, s: float = 5.0) -> dict:
    record = {"vmm": vmm, "ok": ok, "s": s, "distress": []}
    if not ok:
        record.update(why="exit status 4, not 0", console=["PCI: Fatal"], stderr=["triple"])
    return record


def test_guest_deaths_lab_deaths_and_stalls_are_counted_apart() -> None:
    soak = bench_module("lab_soak")
    args = soak.parse(["--boots", "3", "--label", "t"])
    records = [boot("kvmpy", True), boot("qemu", True), boot("kvmpy", False),
               boot("qemu", False), boot("kvmpy", True, 7.0), boot("qemu", False)]
    load = {"min": 1.0, "mean": 1.0, "max": 1.0}
    chunks = [{"pairs": 3, "boots": 6, "lab_s": 1800.0, "longest_heartbeat_gap_s": 2.0,
               "host_load_1min": load},
              {"pairs": 1, "boots": 0, "lab_s": 1800.0, "longest_heartbeat_gap_s": 0.0,
               "died": True, "host_load_1min": load}]
    lab_death = {"session": 1, "at_lab_s": 1800.0, "message": "the lab died"}
    r = soak.report(args, ["kvmpy", "qemu"], records, chunks, [], [lab_death], "")
    assert (r["boots"]["kvmpy"]["boots"], r["boots"]["kvmpy"]["deaths"]) == (3, 1)
    assert (r["boots"]["qemu"]["boots"], r["boots"]["qemu"]["deaths"]) == (3, 2)
    assert r["boots"]["kvmpy"]["boot_s"]["median"] == 6.0  # of the boots that lived
    assert (r["lab_deaths"], r["lab_deaths_per_lab_hour"]) == (1, 1.0)
    assert (r["stalls"], r["stalls_per_lab_hour"]) == (0, 0.0)
    assert r["longest_heartbeat_gap_s"] == 2.0  # the died session is not a healthy one
    assert "| kvmpy boots / deaths / distressed | 3 / 1 / 0 |" in soak.table_of([r])
