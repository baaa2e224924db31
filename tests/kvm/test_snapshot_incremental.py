"""Incremental snapshots of a flat guest on this machine's /dev/kvm (kvmpy.state.diff): a
full snapshot, then one holding only the pages written since (over QMP, and from
Python), restored in new processes: the guest's own counter goes on exactly where each
was taken, and a chain whose parent is gone is refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.api import Guest
from kvmpy.errors import SnapshotError
from tests.kvm.test_snapshot import assert_counts, count_line, counter
from tests.qmp_kit import close, connect

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("temp_in_tmp_path")]

KVMPY = [sys.executable, "-m", "kvmpy"]


def restored_output(snap: Path, *options: str) -> str:
    run = subprocess.run([*KVMPY, "run", "--restore", str(snap), *options],
                         capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.decode()


@pytest.mark.parametrize("kind", ["real", "cpl3"])
def test_a_chain_of_incremental_snapshots_restores_each_link(guest_dir: Path, tmp_path: Path,
                                                             kind: str) -> None:
    full, diff1, diff2 = tmp_path / "full", tmp_path / "diff1", tmp_path / "diff2"
    outputs = []
    with Guest.from_config(counter(guest_dir, kind, tmp_path)) as g:
        for n, path, base in ((0x8, full, None), (0x10, diff1, full), (0x18, diff2, diff1)):
            g.expect(count_line(kind, n) + "\n", 60)
            g.pause()
            outputs.append(g.output)
            meta = g.snapshot(path, base=base)
            if base is None:
                full_bytes = meta["ram"]["data_bytes"]
            else:  # the pages the counter wrote, not all it uses (two, in real mode)
                assert 0 < meta["ram"]["data_bytes"] <= full_bytes, (meta["ram"], full_bytes)
            g.resume()
        with pytest.raises(SnapshotError, match="full is not this machine's last snapshot"):
            g.snapshot(tmp_path / "wrong", base=full)
        g.wait(120)
        assert_counts(kind, g.output)
    for path, before in zip((full, diff1, diff2), outputs, strict=True):
        assert_counts(kind, before + restored_output(path))
    if os.geteuid() == 0:  # in a jail too, which holds the chain's directories
        jail = ["--jail", str(tmp_path / "jail"), "--uid", "65534", "--gid", "65534"]
        assert_counts(kind, outputs[2] + restored_output(diff2, *jail))
    full.rename(tmp_path / "elsewhere")
    run = subprocess.run([*KVMPY, "run", "--restore", str(diff2)], capture_output=True,
                         timeout=60)
    err = run.stderr.decode()
    assert run.returncode == 2 and err.count("\n") == 1, err
    assert "diff2: in its chain: snapshot" in err and "full is missing" in err, err


def test_qmp_incremental_snapshot_save(guest_dir: Path, tmp_path: Path) -> None:
    kind, sock = "cpl3", tmp_path / "qmp.sock"
    guest = ["--flat", str(guest_dir / "counter_cpl3.bin"), "--mode", "long", "--cpl", "3"]
    run = subprocess.Popen([*KVMPY, "run", *guest, "--qmp", f"unix:{sock}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    qmp = connect(sock)
    try:
        refused = qmp.cmd_raw("x-kvmpy-snapshot-save", {"path": str(tmp_path / "d0"),
                                                        "incremental": True})
        assert "take a full one first" in str(refused), refused
        qmp.cmd("stop")
        full = qmp.cmd("x-kvmpy-snapshot-save", path=str(tmp_path / "full"))
        qmp.cmd("cont")
        diff = qmp.cmd("x-kvmpy-snapshot-save", path=str(tmp_path / "diff"), incremental=True)
        assert diff["ram_bytes"] < full["ram_bytes"]  # (its code and page tables: not written)
        qmp.cmd("quit")
    finally:
        close(qmp)
    out, err = run.communicate(timeout=60)
    text = restored_output(tmp_path / "diff")
    whole = "".join(count_line(kind, n) + "\n" for n in range(0x801))
    assert len(text) > 100 and whole.endswith(text), text[:100]


def test_a_fast_reset_point_ends_the_chain(guest_dir: Path, tmp_path: Path) -> None:
    """Both read KVM's dirty log: a reset point takes it, and a snapshot taken while one
    is marked does not start a chain."""
    with Guest.from_config(counter(guest_dir, "cpl3", tmp_path)) as g:
        g.expect(count_line("cpl3", 2) + "\n", 60)
        g.snapshot(tmp_path / "full")
        g.mark()
        with pytest.raises(SnapshotError, match="take a full one first"):
            g.snapshot(tmp_path / "diff", base=tmp_path / "full")
        g.snapshot(tmp_path / "full2")  # the reset point keeps the log
        with pytest.raises(SnapshotError, match="take a full one first"):
            g.snapshot(tmp_path / "diff", base=tmp_path / "full2")
        assert g.reset() >= 0  # and the reset still works
        g.stop()
