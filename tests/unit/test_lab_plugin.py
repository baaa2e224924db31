"""tests/lab_plugin.py: a broken lab's unfinished tests run again; a failed test fails.

The sessions are simulated (no lab): `_session` is replaced by a script of what each
session's inner pytest recorded and whether its lab stalled.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.lab_plugin import (
    LAB_RETRIES,
    LabProxy,
    LabSession,
    LabTestFailed,
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
    lab = LabSession(_Config(), nodeids)  # type: ignore[arg-type]
    asked: list[list[str]] = []

    def session(todo: list[str]) -> bool:
        asked.append(list(todo))
        outcomes, stalled = sessions[len(asked) - 1]
        assert lab.results is not None
        lab.results.update((n, _records(n, outcomes[n], f"{n} failed in session {len(asked)}"))
                           for n in todo if n in outcomes and outcomes[n] != "cut short")
        lab.error = "the lab stalled: lab CPU 1 sent no heartbeat for 20 s" if stalled else ""
        return stalled

    monkeypatch.setattr(lab, "_session", session)
    monkeypatch.setattr(lab, "_say", (said if said is not None else []).append)
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
