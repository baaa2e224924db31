"""Incremental snapshots: only the guest RAM written since the snapshot before.

What it is: once a machine's snapshot is saved, `track(machine, parent)` turns on
KVM's dirty-page log (and kvmpy's own record of the pages its devices write, as a fast
reset does: kvmpy.state.reset) and keeps that snapshot as the parent. An incremental
snapshot (`Guest.snapshot(path, base=parent)`, QMP `x-kvmpy-snapshot-save` with
`"incremental": true`) then writes, besides the whole small state, only those pages:

    ram.bin     as big as guest RAM, the pages of this layer at their offsets, holes
                elsewhere
    ram.dirty   a bitmap, bit N set when page N of ram.bin is in this layer (a page
                the guest wrote zeros to is in the bitmap and a hole in the file)

and names its parent by path and by the SHA-256 of the parent's snapshot.json, which
covers all of the parent (its RAM digest, state checksum, its own parent), so a restore
that finds anything else there refuses it. Each incremental snapshot is the parent of
the next: a chain, as Firecracker's diff snapshots make, whose first link is a full
snapshot. A restore maps that full snapshot's RAM privately (lazily, as any restore)
and copies each layer's pages over it, oldest first: its cost grows with the pages the
layers hold, not with guest RAM.

The dirty log is read and cleared by an incremental save; a save that fails after
reading it stops the tracking (the pages it read would be missing from the next one),
so the next snapshot must be full. A fast reset needs the same log: marking one ends
the tracking, and a machine with a reset point does not start it.

What it is not: a merge of a chain into one snapshot, or tracking after a restore (a
restored machine's first snapshot is a full one, which then starts a chain).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from kvmpy.errors import SnapshotError
from kvmpy.memory import PAGE, GuestMemory
from kvmpy.state.ram import _pwrite_all, layout

if TYPE_CHECKING:
    from kvmpy.machine import Machine

DIRTY = "ram.dirty"
_RUN = struct.Struct("<QQ")


class Parent(NamedTuple):
    """The snapshot an incremental one is taken after."""

    path: Path  # absolute
    sha256: str  # of its snapshot.json (the "sha256" field)


class DirtyTracker:
    """KVM's dirty log of `machine`, counted from the snapshot `parent`."""

    def __init__(self, machine: Machine, parent: Parent) -> None:
        self.machine = machine
        self.parent = parent

    def take(self) -> list[list[int]]:
        """Per region, the page offsets written since the parent (read and cleared)."""
        from kvmpy.state.reset import dirty_pages

        return dirty_pages(self.machine)

    def close(self) -> None:
        from kvmpy.state.reset import stop_logging_writes

        stop_logging_writes(self.machine, self)


def track(machine: Machine, parent: Parent) -> None:
    """Count written pages from the snapshot `parent` just saved (or go on counting, from
    it, if a tracker already runs) -- unless a fast reset's reset point reads the log."""
    owner = machine.dirty_log_owner
    if isinstance(owner, DirtyTracker):
        owner.take()  # (a clean log from this snapshot, which holds what was logged)
        owner.parent = parent
        return
    if owner is not None:
        return  # (a reset point: it keeps the log; incremental snapshots wait for a full one)
    from kvmpy.state.reset import log_writes

    log_writes(machine, DirtyTracker(machine, parent))


def tracker_for(machine: Machine, base: Path | None) -> DirtyTracker:
    """The tracker an incremental snapshot of `machine` reads, whose parent must be
    `base` when given; SnapshotError (one line) when there is none."""
    owner = machine.dirty_log_owner
    if not isinstance(owner, DirtyTracker):
        raise SnapshotError("incremental snapshot: this machine has no snapshot to be "
                            "incremental to since it started or was last reset (take a full "
                            "one first)")
    if base is not None and Path(base).resolve() != owner.parent.path:
        raise SnapshotError(f"incremental snapshot: {base} is not this machine's last "
                            f"snapshot ({owner.parent.path} is)")
    return owner


def save_diff_ram(memory: GuestMemory, pages: list[list[int]], path: Path
                  ) -> tuple[dict[str, Any], bytes]:
    """Write the pages `pages` (per region, offsets) of `memory` to a new file at `path`
    laid out as a full ram.bin is; the metadata that describes it, and the bitmap."""
    import hashlib

    regions = layout((region.gpa, region.size) for region in memory)
    total = sum(size for _, size, _ in regions)
    bitmap = bytearray((total // PAGE + 7) // 8)
    digest = hashlib.sha256()
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, total)
        for region, (_, _, file_offset), offsets in zip(memory, regions, pages, strict=True):
            for start, length in _runs(offsets):
                data = region.view[start:start + length]
                offset = file_offset + start
                digest.update(_RUN.pack(offset, length))
                digest.update(data)
                _pwrite_all(fd, data, offset)
                written += length
                for page in range(offset // PAGE, (offset + length) // PAGE):
                    bitmap[page >> 3] |= 1 << (page & 7)
    finally:
        os.close(fd)
    return ({"size": total, "regions": regions, "data_bytes": written,
             "digest": digest.hexdigest()}, bytes(bitmap))


def check_bitmap(bitmap: bytes, size: int, what: str) -> None:
    """No bit for a page past the end of guest RAM."""
    pages = size // PAGE
    if pages % 8 and bitmap and bitmap[-1] >> (pages % 8):
        raise SnapshotError(f"{what}: {DIRTY} marks pages past the end of guest RAM")


def apply_layer(memory: GuestMemory, regions: list[list[int]], ram: Path, bitmap: bytes,
                what: str) -> None:
    """Copy the pages `bitmap` marks from the layer's `ram` file into `memory`."""
    from kvmpy.state.reset import set_bits

    fd = os.open(ram, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pages = set_bits(bitmap)
        for region, (_, size, file_offset) in zip(memory, regions, strict=True):
            first, last = file_offset // PAGE, (file_offset + size) // PAGE
            mine = [(p - first) * PAGE for p in pages if first <= p < last]
            for start, length in _runs(mine):
                n = os.preadv(fd, [region.view[start:start + length]], file_offset + start)
                if n != length:
                    raise SnapshotError(f"{what}: {ram} changed while it was read")
    finally:
        os.close(fd)


def verify_layer(ram: Path, bitmap: bytes, expected_digest: str, what: str) -> None:
    """Read the layer's pages and compare their digest; SnapshotError if not."""
    import hashlib

    from kvmpy.state.reset import set_bits

    digest = hashlib.sha256()
    with open(ram, "rb") as f:
        for start, length in _runs([p * PAGE for p in set_bits(bitmap)]):
            f.seek(start)
            digest.update(_RUN.pack(start, length))
            digest.update(f.read(length))
    if digest.hexdigest() != expected_digest:
        raise SnapshotError(f"{what}: guest RAM does not match its digest (changed since "
                            "the snapshot was taken)")


def _runs(offsets: list[int]) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive pages among sorted page offsets."""
    out: list[tuple[int, int]] = []
    for offset in offsets:
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + PAGE)
        else:
            out.append((offset, PAGE))
    return out
