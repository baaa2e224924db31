"""kvmpy.lab.runner without a lab: reading the heartbeat, and when a lab counts as stalled.

Time is a fake clock that the simulated QEMU process advances as it is waited on.
"""

from __future__ import annotations

import os
import time as real_time
from pathlib import Path

import pytest

from kvmpy.lab import runner
from kvmpy.lab.errors import LabError
from kvmpy.lab.runner import LabStalled, _Heartbeat, _Limits, _wait


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(runner, "time", fake)
    return fake


def beats(lines: bytes, cpus: int = 2) -> _Heartbeat:
    """A _Heartbeat that has read `lines` (then EOF)."""
    r, w = os.pipe()
    os.write(w, lines)
    os.close(w)
    heartbeat = _Heartbeat(r, cpus)
    heartbeat.run()  # in this thread: reads to EOF
    return heartbeat


def test_no_beat_yet_is_not_silence(clock: Clock) -> None:
    assert beats(b"").silent() is None


def test_the_cpu_silent_longest_is_named(clock: Clock) -> None:
    heartbeat = beats(b"0 12.01\n1 12.02\n")
    clock.now += 7
    assert heartbeat.silent() == (0, 7.0)


def test_a_cpu_that_never_beat_is_silent_since_the_first_beat(clock: Clock) -> None:
    r, w = os.pipe()
    heartbeat = _Heartbeat(r, 2)
    heartbeat.start()
    for at in (0, 25):  # CPU 0 beats twice, 25 s apart; CPU 1 never
        clock.now += at
        os.write(w, f"0 {at + 3.5}\n".encode())
        while heartbeat.last.get(0) != clock.now:
            real_time.sleep(0.01)
    clock.now += 5
    assert heartbeat.silent() == (1, 30.0)
    assert heartbeat.longest_gap == 25.0
    os.close(w)
    heartbeat.join()


def test_garbage_and_a_cut_line_are_not_beats(clock: Clock) -> None:
    heartbeat = beats(b"hello\n\nx 1.0\n1 2.0")  # the last line never ended
    assert heartbeat.silent() is None


class FakeQemu:
    """A QEMU process that exits after `runs_for` seconds of the fake clock, or never."""

    def __init__(self, clock: Clock, runs_for: float | None) -> None:
        self.clock, self.end = clock, None if runs_for is None else clock.now + runs_for
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.end is not None and self.clock.now >= self.end:
            self.returncode = 0
        return self.returncode

    def wait(self, timeout: float) -> int:
        self.clock.now += timeout
        if self.poll() is None:
            raise runner.subprocess.TimeoutExpired("qemu", timeout)
        return 0


class FakeHeartbeat:
    """Beats from the fake clock's `start` on, and stops beating at `stop`."""

    def __init__(self, clock: Clock, start: float, stop: float | None = None) -> None:
        self.clock, self.start, self.stop = clock, clock.now + start, stop

    def silent(self) -> tuple[int, float] | None:
        if self.clock.now < self.start:
            return None
        last = self.clock.now if self.stop is None else min(self.clock.now,
                                                            self.start + self.stop)
        return 1, self.clock.now - last


LIMITS = _Limits(timeout=None, boot=60, quiet=None, heartbeat=20)


def wait(clock: Clock, qemu_runs_for: float | None, heartbeat: FakeHeartbeat,
         limits: _Limits = LIMITS, tmp: Path = Path("/nonexistent")) -> float:
    """_wait on the fakes; how long (fake) it took."""
    started = clock.now
    _wait(FakeQemu(clock, qemu_runs_for), tmp, limits, heartbeat)  # type: ignore[arg-type]
    return clock.now - started


def test_a_lab_that_beats_runs_to_its_end(clock: Clock) -> None:
    assert wait(clock, 600, FakeHeartbeat(clock, start=3)) == pytest.approx(600, abs=1)


def test_a_lab_cpu_that_stops_beating_is_a_stall_noticed_in_seconds(clock: Clock) -> None:
    started = clock.now
    with pytest.raises(LabStalled, match="lab CPU 1 sent no heartbeat for 2[01] s"):
        wait(clock, None, FakeHeartbeat(clock, start=3, stop=100))
    assert clock.now - started == pytest.approx(3 + 100 + 20, abs=1)


def test_a_lab_that_never_beats_is_a_stall_after_the_boot_limit(clock: Clock) -> None:
    started = clock.now
    with pytest.raises(LabStalled, match="no heartbeat within 60 s"):
        wait(clock, None, FakeHeartbeat(clock, start=10_000))
    assert clock.now - started == pytest.approx(60, abs=1)


def test_a_command_that_takes_too_long_is_an_error_not_a_stall(clock: Clock) -> None:
    with pytest.raises(LabError, match="did not finish in the lab within 300 s") as e:
        wait(clock, None, FakeHeartbeat(clock, start=3), LIMITS._replace(timeout=300))
    assert not isinstance(e.value, LabStalled)


def test_a_quiet_command_is_killed_as_an_error_not_a_stall(clock: Clock, tmp_path: Path) -> None:
    (tmp_path / "ready").touch()  # the command has started
    printed = clock.now
    with pytest.raises(LabError, match="printed nothing for 90 s") as e:
        _wait(FakeQemu(clock, None), tmp_path, LIMITS._replace(quiet=90),  # type: ignore[arg-type]
              FakeHeartbeat(clock, start=3), lambda: printed)  # type: ignore[arg-type]
    assert not isinstance(e.value, LabStalled)
    assert clock.now - printed == pytest.approx(90, abs=1)
