"""Shared fixtures: where the built test guests are, and the kvm marker's skip."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

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


@pytest.fixture(scope="session")
def guest_dir() -> Path:
    """The flat test guests, built by `make guests` (built here if missing)."""
    out = CACHE / "guests"
    sources = list((ROOT / "guests" / "tests").glob("*.S"))
    if any(not (out / f"{s.stem}.bin").exists() for s in sources):
        subprocess.run(["make", "-s", "guests"], cwd=ROOT, check=True)
    return out

pytest_plugins = ["tests.lab_plugin"]  # the `lab` marker: tests/lab_plugin.py
