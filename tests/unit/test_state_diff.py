"""Incremental snapshots without KVM (kvmpy.state.diff): a chain of them restores guest RAM
as it was at each link, holds only the pages written, and every hostile or broken chain
(parent missing, replaced or edited, a damaged bitmap, a chain too long) is refused in
one line before anything would be built."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from kvmpy.errors import SnapshotError
from kvmpy.state import diff, snapshot
from kvmpy.state.snapshot import METADATA, RAM, open_snapshot, save_snapshot
from tests.unit.hostile import resign
from tests.unit.test_state_snapshot import MEM, PAGE, FakeMachine


def ram_of(path: Path, **kw: Any) -> bytes:
    memory = open_snapshot(path, **kw).map_ram()
    try:
        return memory.read(0, MEM)
    finally:
        memory.close()


def chain(tmp_path: Path) -> tuple[FakeMachine, list[Path], list[bytes]]:
    """A full snapshot, then two incremental ones; guest RAM at each."""
    m = FakeMachine()
    paths = [tmp_path / "full", tmp_path / "diff1", tmp_path / "diff2"]
    rams = []
    save_snapshot(m, paths[0])  # type: ignore[arg-type]
    rams.append(bytes(m.buf))
    m.write(300 * PAGE, b"over page 300")
    m.write(40 * PAGE - 3, b"across two pages")
    m.write(7 * PAGE, bytes(PAGE))  # a page written back to zeros
    save_snapshot(m, paths[1], base=paths[0])  # type: ignore[arg-type]
    rams.append(bytes(m.buf))
    m.write(300 * PAGE + 2, b"again")
    m.write(MEM - PAGE, b"last page")
    save_snapshot(m, paths[2], incremental=True)  # type: ignore[arg-type]
    rams.append(bytes(m.buf))
    return m, paths, rams


def test_a_chain_restores_ram_as_it_was_at_each_link(tmp_path: Path) -> None:
    _, paths, rams = chain(tmp_path)
    for path, expected in zip(paths, rams, strict=True):
        assert ram_of(path) == expected
        assert ram_of(path, verify_ram=True) == expected
    metas = [json.loads((p / METADATA).read_text()) for p in paths]
    assert [m["version"] for m in metas] == [1, 2, 2]  # full ones stay readable by version 1
    assert metas[1]["ram"]["parent"] == {"path": str(paths[0].resolve()),
                                         "sha256": metas[0]["sha256"]}
    assert metas[1]["ram"]["data_bytes"] == 4 * PAGE  # pages 300, 39, 40 and 7: no more
    assert metas[2]["ram"]["data_bytes"] == 2 * PAGE
    assert os.stat(paths[2] / RAM).st_blocks * 512 <= 16 * PAGE
    assert (paths[1] / diff.DIRTY).stat().st_size == MEM // PAGE // 8


def test_incremental_needs_the_machines_last_snapshot(tmp_path: Path) -> None:
    m = FakeMachine()
    with pytest.raises(SnapshotError, match="no snapshot to be incremental to"):
        save_snapshot(m, tmp_path / "d", incremental=True)  # type: ignore[arg-type]
    save_snapshot(m, tmp_path / "a")  # type: ignore[arg-type]
    save_snapshot(m, tmp_path / "b")  # type: ignore[arg-type]
    with pytest.raises(SnapshotError, match=r"a is not this machine's last snapshot \(.*b is"):
        save_snapshot(m, tmp_path / "d", base=tmp_path / "a")  # type: ignore[arg-type]
    assert not (tmp_path / "d").exists()
    save_snapshot(m, tmp_path / "d", base=tmp_path / "b")  # type: ignore[arg-type]


def test_a_failed_incremental_save_ends_the_chain(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The dirty log was read: its pages would be missing from the next layer."""
    m = FakeMachine()
    save_snapshot(m, tmp_path / "a")  # type: ignore[arg-type]
    m.write(0, b"x")

    def disk_full(*args: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(diff, "save_diff_ram", disk_full)
    with pytest.raises(SnapshotError, match="b: No space left on device$"):
        save_snapshot(m, tmp_path / "b", incremental=True)  # type: ignore[arg-type]
    monkeypatch.undo()
    assert not (tmp_path / "b").exists() and m.dirty_log_owner is None and not m.vm.logging
    with pytest.raises(SnapshotError, match="take a full one first"):
        save_snapshot(m, tmp_path / "b", incremental=True)  # type: ignore[arg-type]


def refused(path: Path, match: str) -> None:
    with pytest.raises(SnapshotError, match=match) as e:
        open_snapshot(path)
    assert "\n" not in str(e.value)


def test_a_missing_parent_is_refused(tmp_path: Path) -> None:
    _, paths, _ = chain(tmp_path)
    paths[0].rename(tmp_path / "moved")
    refused(paths[2], r"diff2: in its chain: snapshot .*diff1: its parent snapshot .*full is "
                      r"missing")


def test_a_parent_taken_again_at_the_same_path_is_refused(tmp_path: Path) -> None:
    _, paths, _ = chain(tmp_path)
    shutil.rmtree(paths[1])
    other = FakeMachine()
    save_snapshot(other, paths[1])  # type: ignore[arg-type]
    refused(paths[2], r"diff2: in its chain: snapshot .*diff1 is another snapshot than the "
                      r"one its child was taken after")


def test_an_edited_parent_is_refused(tmp_path: Path) -> None:
    _, paths, _ = chain(tmp_path)
    resign(paths[0], edit=lambda meta: meta.update(created="1999-01-01T00:00:00Z"))
    refused(paths[1], "full is another snapshot than the one its child was taken after")
    meta = json.loads((paths[0] / METADATA).read_text())
    (paths[0] / METADATA).write_text(json.dumps(meta | {"kvmpy": "9"}))  # not re-signed
    refused(paths[1], r"diff1: in its chain: snapshot .*full: snapshot.json does not match "
                      "its checksum")


def resign_bitmap(path: Path, bitmap: bytes) -> None:
    (path / diff.DIRTY).write_bytes(bitmap)
    resign(path, edit=lambda meta: meta["ram"].update(
        dirty_sha256=hashlib.sha256(bitmap).hexdigest()))


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / diff.DIRTY).write_bytes((p / diff.DIRTY).read_bytes()[:-1]),
     r"ram.dirty is 63 bytes, snapshot.json says 64 \(truncated\)"),
    (lambda p: (p / diff.DIRTY).unlink(), "ram.dirty: No such file"),
    (lambda p: (p / diff.DIRTY).write_bytes(b"\xff" * 64), "ram.dirty does not match its "
                                                            "checksum"),
    (lambda p: resign(p, edit=lambda m: m["ram"].pop("parent")),
     r"snapshot state snapshot.json.ram: no 'parent'"),
    (lambda p: resign(p, edit=lambda m: m["ram"]["parent"].update(path=str(p))),
     "diff2 is another snapshot than the one its child was taken after"),
    (lambda p: resign(p, edit=lambda m: m["ram"]["parent"].update(path=7)),
     "expected a string"),
    (lambda p: resign(p, edit=lambda m: m.update(version=1)), "unknown field"),
    (lambda p: os.truncate(p / RAM, MEM - PAGE), r"ram.bin is .* \(truncated\)"),
])
def test_a_damaged_incremental_snapshot_is_refused(tmp_path: Path, damage: Any,
                                                   message: str) -> None:
    _, paths, _ = chain(tmp_path)
    damage(paths[2])
    refused(paths[2], message)


def test_a_bitmap_past_the_end_of_ram_is_refused(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, paths, _ = chain(tmp_path)
    monkeypatch.setattr(snapshot, "MAX_CHAIN", 2)
    refused(paths[2], "more than 2 snapshots in its chain")
    monkeypatch.undo()
    bitmap = bytearray((paths[2] / diff.DIRTY).read_bytes())
    bitmap[5] ^= 0x10  # a page this layer does not hold: its hole reads as zeros
    resign_bitmap(paths[2], bytes(bitmap))
    with pytest.raises(SnapshotError, match="guest RAM does not match its digest"):
        open_snapshot(paths[2], verify_ram=True)
    with pytest.raises(SnapshotError, match="marks pages past the end"):
        diff.check_bitmap(b"\x00\x80", 15 * PAGE, "x")
