"""The migration bench measures both VMMs' downtime one way: QEMU's from its own events'
timestamps, and a round the lab loses before its migration runs again, named."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bench_kit import bench_module


class FakeQmp:
    """qemu.qmp's legacy client as the bench uses it: events, pulled one at a time."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events

    def pull_event(self, wait: float = 0) -> dict[str, Any] | None:
        if not self.events:
            raise TimeoutError
        return self.events.pop(0)


def event(name: str, seconds: int, microseconds: int) -> dict[str, Any]:
    return {"event": name, "timestamp": {"seconds": seconds, "microseconds": microseconds}}


def test_an_events_time_is_its_qemu_timestamp_past_other_events() -> None:
    migrate = bench_module("migrate")
    qmp = FakeQmp([event("MIGRATION", 9, 0), event("STOP", 10, 250_000),
                   event("RESUME", 11, 0)])
    assert migrate._event_time(qmp, "STOP", timeout=1) == 10.25
    assert migrate._event_time(qmp, "RESUME", timeout=1) == 11.0
    with pytest.raises(RuntimeError, match="no STOP event"):
        migrate._event_time(qmp, "STOP", timeout=1)


@pytest.fixture
def migrate(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The bench module, its guest files and command lines stood in for, low rate only,
    kvmpy only."""
    import kvmpy.assets

    migrate = bench_module("migrate")
    monkeypatch.setattr(kvmpy.assets, "kernel_path", lambda: type("K", (), {"bzimage": "k"}))
    monkeypatch.setattr(kvmpy.assets, "initramfs_path", lambda: "i")
    monkeypatch.setattr(migrate, "guest_argvs", lambda *a: (["kvmpy", "run"], ["qemu"]))
    monkeypatch.setattr(migrate, "ONLY_RATES", ["low"])
    monkeypatch.setattr(migrate, "ONLY_VMMS", ["kvmpy"])
    return migrate


def test_a_guest_lost_before_its_migration_costs_a_round_not_the_run(
        migrate: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    results = iter([migrate.GuestLost("before the migration: no prompt"),
                    *[{"downtime_ms": 30.0, "reported_downtime_ms": 33.0, "sent_ms": 20.0,
                       "guest_stall_ms": 100.0, "total_s": 0.5, "sequence_ok": True}] * 2])

    def one(vmm: str, argv: list[str], rate: str, work: Any) -> dict[str, Any]:
        got = next(results)
        if isinstance(got, Exception):
            raise got
        return got

    monkeypatch.setattr(migrate, "one_migration", one)
    monkeypatch.setattr(migrate, "ROUNDS", 2)
    low = migrate.measure()["low"]
    assert low["lost_rounds"] == ["kvmpy round 0: before the migration: no prompt"]
    assert len(low["kvmpy_all"]) == 2 and low["kvmpy_downtime_ms"] == 30.0


def test_a_guest_lost_too_often_ends_the_run(migrate: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def one(vmm: str, argv: list[str], rate: str, work: Any) -> dict[str, Any]:
        raise migrate.GuestLost("died")

    monkeypatch.setattr(migrate, "one_migration", one)
    with pytest.raises(migrate.GuestLost):
        migrate.measure()
