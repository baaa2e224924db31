"""pytest plugin for the `lab` marker: Linux-booting tests run here or in lab sessions.

- /dev/kvm can boot Linux here (real VT-x/AMD-V), or we are inside the lab already
  (`KVMPY_IN_LAB=1`): `lab` tests run in this process like any other test.
- Otherwise, if the lab can start: every selected `lab` test is replaced by a proxy item
  with the same node id. The first proxy to run starts the lab sessions: the lab tests,
  split by module (module fixtures stay whole) into one share per lab that fits beside the
  others (`parallel_labs`: a lab of one CPU per host core), each `kvmpy lab` running
  `pytest <its node ids>` inside with a results file in a `--rw` share; each proxy then
  reports its own test's outcome from that file (pass, the inner failure text, skip,
  xfail), so lab tests appear in this pytest's output like the others.
- Neither: `lab` tests are skipped, with the reason.

A lab that stops making progress (QEMU's TCG has been seen to livelock or lose an
interrupt: kvmpy/lab/monitor.py) is noticed by its heartbeat within seconds
(kvmpy.lab.runner): the session is killed and the lab CPUs' state printed. That, and a
lab that goes down under the tests (LabDied: its kernel panicked, or the emulated
machine reset), are the lab's failures: the tests it did not finish run in a new
session, with one RETRY line saying so. A test that hangs inside a healthy lab is failed
by pytest-timeout (TEST_TIMEOUT_S) and the session goes on.

Nothing else is retried: a test that failed, failed, whatever its cause (a guest that
triple-faulted in the lab included; docs/lab.md, "The soak").

Also registers `labhost`: tests that boot the lab themselves from the host (a few seconds
each), skipped inside the lab and where the lab cannot start.

Results travel as JSON lines written by this same plugin inside the lab (exact node ids;
junit XML names cannot be mapped back to node ids reliably).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from kvmpy.lab import INSIDE_ENV, LabError, lab_status, linux_kvm_status, run_in_lab
from kvmpy.lab.host import DEFAULT_CPUS, DEFAULT_MEM
from kvmpy.lab.runner import LabBroke

RESULTS_ENV = "KVMPY_LAB_RESULTS"  # inside the lab: where to write the JSON lines
SESSION_TIMEOUT = float(os.environ.get("KVMPY_LAB_SESSION_TIMEOUT", "3600"))
# lab tests take seconds to a minute or two: one running for ten is stuck (its threads'
# stacks are printed, it fails, the next test runs)
TEST_TIMEOUT_S = 600
LAB_RETRIES = 2  # the tests a failed lab did not finish get a new session, twice at most
LABS_ENV = "KVMPY_LABS"  # how many lab sessions run side by side (default: parallel_labs())
MAX_LABS = 4
_SESSION_KEY = pytest.StashKey["LabSession"]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "labhost: boots the lab itself from the host (seconds per test)")


def _inside_lab() -> bool:
    return os.environ.get(INSIDE_ENV) == "1"


# --- inside the lab: record every report for the outer pytest -------------------------------

def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get(RESULTS_ENV)
    if not path or not _inside_lab():
        return
    record: dict[str, Any] = {"nodeid": report.nodeid, "when": report.when,
                              "outcome": report.outcome, "text": report.longreprtext,
                              "duration": report.duration}
    if report.skipped and isinstance(report.longrepr, tuple):
        record["text"] = str(report.longrepr[2])
    if hasattr(report, "wasxfail"):
        record["xfail"] = report.wasxfail or "xfail"
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# --- outside: decide, and replace lab items by proxies --------------------------------------

@pytest.hookimpl(trylast=True)  # after -m/-k deselection: only what will really run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    inside = _inside_lab()
    lab_ok, lab_why = lab_status()
    for item in items:
        if item.get_closest_marker("labhost"):
            if inside:
                item.add_marker(pytest.mark.skip(reason="boots the lab: not run inside the lab"))
            elif not lab_ok:
                item.add_marker(pytest.mark.skip(reason=f"the lab cannot start: {lab_why}"))
    if inside:
        return
    linux_ok, linux_why = linux_kvm_status()
    lab_items = [i for i in items if i.get_closest_marker("lab") and isinstance(i, pytest.Function)]
    if linux_ok or not lab_items:
        return
    if not lab_ok:
        reason = f"Linux cannot boot here ({linux_why}) and the lab cannot start: {lab_why}"
        for item in lab_items:
            item.add_marker(pytest.mark.skip(reason=reason))
        return
    session = LabSession(config, [i.nodeid for i in lab_items])
    config.stash[_SESSION_KEY] = session
    for index, item in enumerate(items):
        if item in lab_items:
            items[index] = LabProxy.from_original(item, session)


def _finished(records: list[dict[str, Any]]) -> bool:
    """Did the inner pytest get to the end of this test (teardown, or a setup that ended it)?"""
    return any(r["when"] == "teardown" or (r["when"] == "setup" and r["outcome"] != "passed")
               for r in records)


class LabTestFailed(Exception):
    """The inner test failed; the message is the inner pytest's failure text."""


def parallel_labs() -> int:
    """Labs that fit side by side: each lab CPU is a TCG thread that keeps a host core busy."""
    if os.environ.get(LABS_ENV):
        return max(1, int(os.environ[LABS_ENV]))
    try:
        meminfo = Path("/proc/meminfo").read_text()
        free = int(meminfo.split("MemAvailable:")[1].split()[0]) << 10
    except (OSError, IndexError, ValueError):
        free = DEFAULT_MEM
    by_mem = free // (DEFAULT_MEM + (DEFAULT_MEM >> 1))  # the lab's RAM and QEMU's own
    return max(1, min(MAX_LABS, (os.cpu_count() or 1) // DEFAULT_CPUS, by_mem))


def split_by_module(nodeids: list[str], shares: int) -> list[list[str]]:
    """At most `shares` lists of node ids, each module in one (its fixtures are module-scoped).

    Biggest module first onto the shortest list; each list keeps the collection order.
    """
    modules: dict[str, list[str]] = {}
    for nodeid in nodeids:
        modules.setdefault(nodeid.split("::")[0], []).append(nodeid)
    lists: list[list[str]] = [[] for _ in range(max(1, min(shares, len(modules))))]
    for tests in sorted(modules.values(), key=len, reverse=True):
        min(lists, key=len).extend(tests)
    order = {nodeid: i for i, nodeid in enumerate(nodeids)}
    return [sorted(ids, key=order.__getitem__) for ids in lists if ids]


class Ended(NamedTuple):
    """How one lab session ended: `broke` if the lab stalled or died under it."""

    broke: bool
    error: str  # "" if the inner pytest ran to its end
    output: str  # what the inner pytest printed


class LabSession:
    """The `kvmpy lab` runs of all the selected lab tests; started by the first proxy."""

    def __init__(self, config: pytest.Config, nodeids: list[str]) -> None:
        self.config = config
        self.nodeids = nodeids
        self.labs = parallel_labs()
        self.results: dict[str, list[dict[str, Any]]] | None = None
        self.ended: dict[str, Ended] = {}  # node id -> how the last session that ran it ended
        self._lock = threading.Lock()

    def run(self) -> dict[str, list[dict[str, Any]]]:
        if self.results is not None:
            return self.results
        self.results = {}
        todo = list(self.nodeids)
        for attempt in range(1 + LAB_RETRIES):
            shares = split_by_module(todo, self.labs)
            with ThreadPoolExecutor(len(shares)) as pool:
                ends = list(pool.map(self._session, shares, range(1, len(shares) + 1)))
            for share, end in zip(shares, ends, strict=True):
                self.ended.update(dict.fromkeys(share, end))
            todo = [n for n in todo if not _finished(self.results.get(n, []))]
            broken = [end.error.split(';')[0] for end in ends if end.broke]
            if not broken or not todo or attempt == LAB_RETRIES:
                break
            self._say(f"lab: RETRY: the lab failed ({'; '.join(broken)}); the {len(todo)} "
                      "lab test(s) it did not finish run again in a new lab "
                      "(the one retry there is: tests/lab_plugin.py)")
        return self.results

    def _session(self, nodeids: list[str], number: int = 1) -> Ended:
        """Run `nodeids` in one lab session into self.results."""
        assert self.results is not None
        name = "lab" if self.labs == 1 else f"lab {number}"
        share = Path(tempfile.mkdtemp(prefix="kvmpy-labtests-"))
        results = share / "results.jsonl"
        out = share / "output.txt"
        # unbuffered: what a session printed is all there if the lab stalls
        env = dict(os.environ, **{RESULTS_ENV: str(results), "PYTHONUNBUFFERED": "1"})
        # pytest-timeout (a dev dependency): a test that hangs fails with every thread's
        # stack, and the next one runs
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEsxX",
                "--color=no", "-o", f"timeout={TEST_TIMEOUT_S}", "-o", "timeout_method=signal",
                *nodeids]
        self.config.add_cleanup(lambda: shutil.rmtree(share, ignore_errors=True))
        self._say(f"{name}: running {len(nodeids)} lab test(s) in one lab session")
        broke, error = False, ""
        try:
            with open(out, "wb") as sink:
                status = run_in_lab(argv, rw=[share], cwd=self.config.rootpath, env=env,
                                    stdout=sink, stderr=sink, timeout=SESSION_TIMEOUT)
            error = "" if status in (0, 1) else f"inner pytest exited with status {status}"
        except LabBroke as e:  # stalled or died: the lab's failure, not a test's
            error, broke = str(e), True
        except LabError as e:
            error = f"the lab failed: {e}"
        output = out.read_text(errors="replace") if out.exists() else ""
        if results.exists():
            session: dict[str, list[dict[str, Any]]] = {}
            for line in results.read_text().splitlines():
                record = json.loads(line)
                session.setdefault(record["nodeid"], []).append(record)
            # a test cut short by a broken lab is run again, not half-reported
            with self._lock:
                self.results.update((n, r) for n, r in session.items()
                                    if _finished(r) or not broke)
        lines = output.strip().splitlines()
        # the inner run's last words if it failed (a hung test's thread stacks among them)
        self._say(f"{name}: session done: {error or (lines or ['(no output)'])[-1]}",
                  *[f"{name}: | {line}" for line in (lines[-60:] if error else [])])
        return Ended(broke, error, output)

    def _say(self, *lines: str) -> None:
        """Lines on the terminal, past the capture of the test that is running, together."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            return
        with self._lock, (capture.global_and_fixture_disabled() if capture
                          else contextlib.nullcontext()):
            reporter.ensure_newline()
            for line in lines:
                reporter.write_line(line)


class LabProxy(pytest.Item):
    """Stands for one lab test in the outer run; reports what it did inside the lab."""

    lab_session: LabSession
    original_location: tuple[str, int | None, str]

    @classmethod
    def from_original(cls, item: pytest.Item, session: LabSession) -> LabProxy:
        assert item.parent is not None
        proxy: LabProxy = cls.from_parent(item.parent, name=item.name)
        proxy.lab_session = session
        proxy.original_location = item.location
        # The module's and class's marks come with the shared parent; add the function's own.
        proxy.own_markers.extend(item.own_markers)
        proxy.keywords.update({mark.name: mark for mark in item.own_markers})
        return proxy

    def reportinfo(self) -> tuple[Any, int | None, str]:
        path, lineno, name = self.original_location
        return self.config.rootpath / path, lineno, name

    def runtest(self) -> None:
        records = self.lab_session.run().get(self.nodeid, [])
        if not _finished(records):
            ended = self.lab_session.ended.get(self.nodeid, Ended(False, "", ""))
            why = ended.error or "the inner pytest did not report it"
            tail = "\n".join(ended.output.splitlines()[-30:])
            raise LabTestFailed(f"{why}\n--- end of the lab session's output ---\n{tail}")
        # every phase that failed: a test whose call failed may also have failed its
        # teardown (the kernel-log check of tests/lab/conftest.py), which says why
        failed = [f"inside the lab{'' if r['when'] == 'call' else ' (in ' + r['when'] + ')'}:\n"
                  f"{r['text']}" for r in records if r["outcome"] == "failed"]
        if failed:
            raise LabTestFailed("\n\n".join(failed))
        for record in records:
            if "xfail" in record and record["outcome"] in ("skipped", "passed"):
                if record["outcome"] == "skipped":
                    pytest.xfail(record["xfail"])
                continue
            if record["outcome"] == "skipped":
                reason = record["text"].removeprefix("Skipped: ")
                # reported at the test's own location, like a skip mark
                raise pytest.skip.Exception(f"inside the lab: {reason}", _use_item_location=True)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> Any:
        if isinstance(excinfo.value, LabTestFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)
