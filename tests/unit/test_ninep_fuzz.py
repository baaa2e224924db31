"""The 9p fuzz harness itself: clean on random input, and it catches planted bugs,
a confinement bug among them (a name check that lets '../' through)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.ninep import server as server_module

HARNESS = Path(__file__).resolve().parents[2] / "fuzz" / "ninep_fuzz.py"
# rw share, session, then Tmkdir(root, "../canary/new", mode 0o100644, gid 0)
MKDIR_ESCAPE = bytes([0, 0, 0, 8, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0])


@pytest.fixture(scope="module")
def harness() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("ninep_fuzz", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ninep_fuzz"] = module
    spec.loader.exec_module(module)
    yield module
    if module._tree is not None:
        module._tree.close()
    del sys.modules["ninep_fuzz"]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(min_size=16, max_size=1024))
def test_random_sessions_run_clean(harness: ModuleType, data: bytes) -> None:
    harness.run_one(data)


def test_the_escape_input_is_refused_by_the_real_server(harness: ModuleType) -> None:
    harness.stats.clear()
    harness.run_one(MKDIR_ESCAPE)
    assert harness.stats["rlerror"] == 1  # EINVAL: a name with a '/'


def test_a_planted_confinement_bug_is_caught(harness: ModuleType,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "check_name", lambda name: name)
    with pytest.raises(harness.Failure, match="outside the share changed"):
        harness.run_one(MKDIR_ESCAPE)


def test_a_planted_crash_is_caught(harness: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: object, r: object, io: object) -> bytes:
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(server_module.NinePServer, "_mkdir", broken)
    with pytest.raises(harness.Failure, match="logged an error"):
        harness.run_one(MKDIR_ESCAPE)
