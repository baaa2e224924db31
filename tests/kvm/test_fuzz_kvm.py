"""`kvmpy fuzz` through KVM: the op interpreter guest takes every access through a real VM
exit to the device, with a fast reset between inputs; planted bugs are found there by
the same oracles as KVM-free (tests/unit/test_fuzz_command.py), and the real devices
give no finding, the oracles that only a VM has (a vCPU stop, a guest fault) included.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmpy.cli import main
from kvmpy.fuzz.targets import TARGETS
from tests.fuzz_plants import PLANTS, found, fuzz

pytestmark = pytest.mark.kvm


@pytest.fixture(autouse=True)
def _interpreter(guest_dir: Path) -> None:
    """The op interpreter is a test guest (`make guests`), like the others."""


@pytest.mark.parametrize("name", sorted(PLANTS))
def test_a_planted_bug_is_found_through_kvm(name: str, capfd: pytest.CaptureFixture[str],
                                            tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    plant, target, oracle, runs = PLANTS[name]
    plant(monkeypatch)
    status, out = fuzz(capfd, tmp_path, target, runs)
    assert status == 1
    assert found(out)[:2] == (oracle, target)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_target_runs_clean_through_kvm(target: str, capfd: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    status, out = fuzz(capfd, tmp_path, target, 100, seed=11)
    assert status == 0, out
    assert "(through KVM, seed 11): 100 inputs, no finding" in out


def test_replay_traces_the_exits(capfd: pytest.CaptureFixture[str], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A reproducer replays through KVM with kvmpy's exit tracing: the finding again, and
    a line per exit with the guest's instruction."""
    plant, target, oracle, runs = PLANTS["narrow-output-catch"]
    plant(monkeypatch)
    status, out = fuzz(capfd, tmp_path, target, runs)
    assert status == 1
    _, _, path = found(out)
    assert main(["fuzz", "--replay", str(path), "--trace"]) == 1
    out, err = capfd.readouterr()
    assert found(out)[0] == oracle
    assert re.search(r"MMIO write addr=0xd0000050 .* dev=virtio-console", err), err[-2000:]
