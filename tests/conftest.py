"""Shared fixtures: where the built test guests are, the kvm marker's skip, and CI's rule.

In CI (`CI=true`, as `.ci/run` sets it) a `kvm`, `lab` or `labhost` test that is skipped
fails instead: a machine without a usable /dev/kvm, QEMU or busybox would otherwise
turn 80 tests into skips and the run green. Elsewhere they are skipped, with the reason.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from kvmpy.kvm.detect import KvmKind, describe, kvm_kind

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("KVMPY_CACHE", Path.home() / ".cache" / "kvmpy"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kind = kvm_kind()
    if kind in (KvmKind.PVM, KvmKind.HARDWARE):
        return
    skip = pytest.mark.skip(reason=describe(kind))
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


MUST_RUN_IN_CI = ("kvm", "lab", "labhost")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """In CI, a kvm or lab test's skip is reported as a failure, with the skip's reason."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if (report.skipped and in_ci() and not hasattr(report, "wasxfail")
            and any(item.get_closest_marker(m) for m in MUST_RUN_IN_CI)):
        reason = (report.longrepr[2] if isinstance(report.longrepr, tuple)
                  else str(report.longrepr))
        report.outcome = "failed"
        report.longrepr = (f"{reason}\n(a skipped kvm or lab test fails a CI run: "
                           "tests/conftest.py)")


@pytest.fixture(scope="session")
def guest_dir() -> Path:
    """The flat test guests, built by `make guests` (built here if missing)."""
    out = CACHE / "guests"
    sources = list((ROOT / "guests" / "tests").glob("*.S"))
    if any(not (out / f"{s.stem}.bin").exists() for s in sources):
        subprocess.run(["make", "-s", "guests"], cwd=ROOT, check=True)
    return out

@pytest.fixture
def temp_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test's temporary files (this process's and its children's) in its tmp_path.

    A restore without --disk runs on copies it makes in a new temporary directory and
    keeps after exit (they are the guest's disks now): a test that restores so leaves
    them in pytest's tmp_path, which pytest prunes, and not in /tmp."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


pytest_plugins = ["tests.lab_plugin"]  # the `lab` marker: tests/lab_plugin.py
