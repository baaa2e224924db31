"""tests/lab_plugin.py: a lab test that fails runs once more; how each outcome is reported.

The sessions are simulated (no lab): `_session` is replaced by a script of what each
session's inner pytest recorded.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.lab_plugin import (
    _SESSION_KEY,
    RERUN_MAX,
    LabProxy,
    LabSession,
    LabTestFailed,
    pytest_terminal_summary,
)


def _records(nodeid: str, outcome: str, text: str = "") -> list[dict[str, Any]]:
    return [{"nodeid": nodeid, "when": "setup", "outcome": "passed", "text": ""},
            {"nodeid": nodeid, "when": "call", "outcome": outcome, "text": text},
            {"nodeid": nodeid, "when": "teardown", "outcome": "passed", "text": ""}]


class _NoPlugins:
    def get_plugin(self, name: str) -> None:
        return None


class _Config:
    pluginmanager = _NoPlugins()


def _run(nodeids: list[str], sessions: list[dict[str, str]],
         monkeypatch: pytest.MonkeyPatch) -> tuple[LabSession, list[list[str]]]:
    """Run a LabSession whose n-th session reports sessions[n] (node id -> outcome)."""
    lab = LabSession(_Config(), nodeids)  # type: ignore[arg-type]
    asked: list[list[str]] = []

    def session(todo: list[str]) -> bool:
        asked.append(list(todo))
        outcomes = sessions[len(asked) - 1]
        assert lab.results is not None
        lab.results.update((n, _records(n, outcomes[n], f"{n} failed in session "
                                        f"{len(asked)}")) for n in todo)
        return False

    monkeypatch.setattr(lab, "_session", session)
    lab.run()
    return lab, asked


def test_a_failed_test_runs_again_alone_and_its_second_result_counts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lab, asked = _run(["a", "b"], [{"a": "failed", "b": "passed"}, {"a": "passed"}],
                      monkeypatch)
    assert asked == [["a", "b"], ["a"]]
    assert lab.results is not None and lab.results["a"][1]["outcome"] == "passed"
    assert lab.first_failures == {"a": "a failed in session 1"}


def test_without_failures_there_is_one_session(monkeypatch: pytest.MonkeyPatch) -> None:
    lab, asked = _run(["a", "b"], [{"a": "passed", "b": "passed"}], monkeypatch)
    assert asked == [["a", "b"]] and lab.first_failures == {}


def test_more_failures_than_rerun_max_are_not_run_again(monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"t{i}" for i in range(RERUN_MAX + 1)]
    lab, asked = _run(names, [dict.fromkeys(names, "failed")], monkeypatch)
    assert asked == [names] and lab.first_failures == {}


class _Proxy:
    """What LabProxy.runtest reads of itself."""

    def __init__(self, nodeid: str, lab: LabSession) -> None:
        self.nodeid, self.lab_session = nodeid, lab


def test_a_test_that_fails_twice_reports_both_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    lab, _ = _run(["a"], [{"a": "failed"}, {"a": "failed"}], monkeypatch)
    with pytest.raises(LabTestFailed) as e:
        LabProxy.runtest(_Proxy("a", lab))  # type: ignore[arg-type]
    text = str(e.value)
    assert text.index("a failed in session 1") < text.index("a failed in session 2")
    assert "a second time" in text


def _summary(lab: LabSession) -> list[str]:
    """What pytest_terminal_summary writes for `lab`."""
    lines: list[str] = []

    class Reporter:
        class config:  # noqa: N801 - stands for pytest's Config
            stash = {_SESSION_KEY: lab}

        def section(self, title: str) -> None:
            lines.append(f"== {title}")

        def write_line(self, line: str) -> None:
            lines.append(line)

    pytest_terminal_summary(Reporter())
    return lines


def test_a_test_that_passes_when_run_again_passes_and_is_listed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lab, _ = _run(["a", "b"], [{"a": "failed", "b": "passed"}, {"a": "passed"}], monkeypatch)
    LabProxy.runtest(_Proxy("a", lab))  # type: ignore[arg-type]
    assert _summary(lab) == ["== lab tests that failed once and passed when run again", "a",
                             "    a failed in session 1"]


def test_the_summary_quotes_pytests_e_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    lab, _ = _run(["a"], [{"a": "failed"}, {"a": "passed"}], monkeypatch)
    lab.first_failures["a"] = "    def test():\n>       boot()\nE   GuestFault: triple fault\n" \
                              "\ntests/x.py:3: GuestFault"
    assert _summary(lab)[1:] == ["a", "    E   GuestFault: triple fault"]
