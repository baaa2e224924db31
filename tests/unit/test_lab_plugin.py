"""tests/lab_plugin.py: a broken lab's unfinished tests run again; a failed test fails.

The sessions are simulated (no lab): `_session` is replaced by a script of what each
session's inner pytest recorded and whether its lab stalled.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.lab_plugin import (
    LAB_RETRIES,
    LABS_ENV,
    Ended,
    LabProxy,
    LabSession,
    LabTestFailed,
    parallel_labs,
    split_by_module,
)


def _records(nodeid: str, outcome: str, text: str = "") -> list[dict[str, Any]]:
    if outcome == "cut short":  # the lab stalled during its call
        return [{"nodeid": nodeid, "when": "setup", "outcome": "passed", "text": ""}]
    return [{"nodeid": nodeid, "when": "setup", "outcome": "passed", "text": ""},
            {"nodeid": nodeid, "when": "call", "outcome": outcome, "text": text},
            {"nodeid": nodeid, "when": "teardown", "outcome": "passed", "text": ""}]


class _NoPlugins:
    def get_plugin(self, name: str) -> None:
        return None


class _Config:
    pluginmanager = _NoPlugins()


Script = list[tuple[dict[str, str], bool]]  # per session: node id -> outcome, stalled


def _run(nodeids: list[str], sessions: Script, monkeypatch: pytest.MonkeyPatch,
         said: list[str] | None = None) -> tuple[LabSession, list[list[str]]]:
    """Run a LabSession whose n-th session reports sessions[n]; the node ids it asked for."""
    monkeypatch.setenv(LABS_ENV, "1")  # one session at a time, in order
    lab = LabSession(_Config(), nodeids)  # type: ignore[arg-type]
    asked: list[list[str]] = []

    def session(todo: list[str], number: int = 1) -> Ended:
        asked.append(list(todo))
        outcomes, stalled = sessions[len(asked) - 1]
        assert lab.results is not None
        lab.results.update((n, _records(n, outcomes[n], f"{n} failed in session {len(asked)}"))
                           for n in todo if n in outcomes and outcomes[n] != "cut short")
        error = "the lab stalled: lab CPU 1 sent no heartbeat for 20 s" if stalled else ""
        return Ended(stalled, error, "")

    monkeypatch.setattr(lab, "_session", session)
    lines_said = said if said is not None else []
    monkeypatch.setattr(lab, "_say", lambda *lines: lines_said.extend(lines))
    lab.run()
    return lab, asked


class _Proxy:
    """What LabProxy.runtest reads of itself."""

    def __init__(self, nodeid: str, lab: LabSession) -> None:
        self.nodeid, self.lab_session = nodeid, lab


def _outcome(nodeid: str, lab: LabSession) -> str:
    try:
        LabProxy.runtest(_Proxy(nodeid, lab))  # type: ignore[arg-type]
    except LabTestFailed as e:
        return f"failed: {e}"
    return "passed"


def test_a_failed_test_is_not_run_again(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    lab, asked = _run(["a", "b"], [({"a": "failed", "b": "passed"}, False),
                                   ({"a": "passed"}, False)], monkeypatch, said)
    assert asked == [["a", "b"]]
    assert _outcome("a", lab) == "failed: inside the lab:\na failed in session 1"
    assert _outcome("b", lab) == "passed"
    assert not [line for line in said if "RETRY" in line or "RERUN" in line]


def test_a_stalled_lab_runs_only_what_it_did_not_finish_again_and_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    lab, asked = _run(["a", "b", "c"],
                      [({"a": "failed", "b": "cut short"}, True),
                       ({"b": "passed", "c": "passed"}, False), ({"a": "passed"}, False)],
                      monkeypatch, said)
    # a finished (failed) before the lab stalled: it is not run again
    assert asked == [["a", "b", "c"], ["b", "c"]]
    assert _outcome("a", lab).startswith("failed")
    assert _outcome("b", lab) == _outcome("c", lab) == "passed"
    retries = [line for line in said if "RETRY" in line]
    assert len(retries) == 1 and "the 2 lab test(s) it did not finish" in retries[0]


def test_a_lab_that_keeps_stalling_fails_what_it_did_not_finish(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lab, asked = _run(["a", "b"], [({"a": "passed", "b": "cut short"}, True)]
                      + [({"b": "cut short"}, True)] * LAB_RETRIES, monkeypatch)
    assert asked == [["a", "b"]] + [["b"]] * LAB_RETRIES
    assert _outcome("a", lab) == "passed"
    assert _outcome("b", lab).startswith("failed: the lab stalled: lab CPU 1 sent no heartbeat")


def test_without_a_stall_there_is_one_session(monkeypatch: pytest.MonkeyPatch) -> None:
    _, asked = _run(["a", "b"], [({"a": "passed", "b": "passed"}, False)], monkeypatch)
    assert asked == [["a", "b"]]


def test_a_failed_call_reports_its_failed_teardown_too() -> None:
    """The kernel-log check runs at teardown: its distress says why the call failed."""
    lab = LabSession(_Config(), ["a"])  # type: ignore[arg-type]
    lab.results = {"a": [
        {"nodeid": "a", "when": "setup", "outcome": "passed", "text": ""},
        {"nodeid": "a", "when": "call", "outcome": "failed", "text": "TimeoutError"},
        {"nodeid": "a", "when": "teardown", "outcome": "failed", "text": "NETDEV WATCHDOG"}]}
    assert _outcome("a", lab) == ("failed: inside the lab:\nTimeoutError\n\n"
                                  "inside the lab (in teardown):\nNETDEV WATCHDOG")


def test_modules_stay_whole_and_the_biggest_go_to_the_emptiest_lab() -> None:
    ids = ["m1.py::a", "m2.py::a", "m1.py::b", "m3.py::a", "m1.py::c", "m2.py::b"]
    assert split_by_module(ids, 2) == [["m1.py::a", "m1.py::b", "m1.py::c"],
                                       ["m2.py::a", "m3.py::a", "m2.py::b"]]
    assert split_by_module(ids, 1) == [ids]
    assert split_by_module(ids, 8) == [["m1.py::a", "m1.py::b", "m1.py::c"],
                                       ["m2.py::a", "m2.py::b"], ["m3.py::a"]]


def test_two_labs_run_at_once_and_only_the_stalled_ones_tests_run_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # each session's script, by the first node id it is given; x's lab stalls in b
    scripts = {"x.py::a": ({"x.py::a": "passed", "x.py::b": "cut short"}, True),
               "y.py::a": ({"y.py::a": "failed"}, False),
               "x.py::b": ({"x.py::b": "passed"}, False)}
    both = threading.Barrier(2, timeout=10)  # broken unless the first two sessions overlap
    asked: list[list[str]] = []
    said: list[str] = []
    monkeypatch.setenv(LABS_ENV, "2")
    lab = LabSession(_Config(), ["x.py::a", "y.py::a", "x.py::b"])  # type: ignore[arg-type]

    def session(todo: list[str], number: int = 1) -> Ended:
        asked.append(todo)
        if len(asked) <= 2:
            both.wait()
        outcomes, stalled = scripts[todo[0]]
        assert lab.results is not None
        lab.results.update((n, _records(n, outcomes[n], f"{n} failed"))
                           for n in todo if outcomes[n] != "cut short")
        return Ended(stalled, "the lab stalled" if stalled else "", "")

    monkeypatch.setattr(lab, "_session", session)
    monkeypatch.setattr(lab, "_say", lambda *lines: said.extend(lines))
    lab.run()
    assert sorted(asked) == [["x.py::a", "x.py::b"], ["x.py::b"], ["y.py::a"]]
    assert _outcome("x.py::a", lab) == _outcome("x.py::b", lab) == "passed"
    assert _outcome("y.py::a", lab) == "failed: inside the lab:\ny.py::a failed"
    retries = [line for line in said if "RETRY" in line]
    assert len(retries) == 1 and "the 1 lab test(s) it did not finish" in retries[0]


def test_one_lab_per_core_for_a_one_cpu_lab_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LABS_ENV, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("tests.lab_plugin.DEFAULT_CPUS", 1)
    assert parallel_labs() == 2
    monkeypatch.setattr("tests.lab_plugin.DEFAULT_CPUS", 2)
    assert parallel_labs() == 1
    monkeypatch.setenv(LABS_ENV, "3")
    assert parallel_labs() == 3
