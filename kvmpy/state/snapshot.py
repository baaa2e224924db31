"""A snapshot on disk: one directory holding everything a paused VM is.

    DIR/snapshot.json   metadata: format and version, kvmpy's version, when, the machine
                        (kvmpy.state.config), and for each part its size and checksum
    DIR/state.bin       the small state: vCPUs, irqchip, devices (kvmpy.state.stream)
    DIR/ram.bin         guest RAM, zero pages as holes, mapped privately on restore
                        (kvmpy.state.ram)
    DIR/disk<N>.img     a copy of writable disk N as it was (kvmpy.state.disks);
                        read-only disks are referenced by path, size and mtime

`save_snapshot` writes it into a hidden directory beside DIR and renames it into
place at the end, so DIR is either a whole snapshot or not there. `open_snapshot`
treats DIR as untrusted input and checks all of it that can be checked without
building a VM: the metadata's format and every field, each file's size, the state's
checksum and framing, the machine against the state's sections (vCPU count, which
parts have state), RAM's size and layout, the disks. Anything wrong is one line
naming it (SnapshotError); nothing is built from a snapshot that failed. Each
owner then checks its own values as it restores them (kvmpy.state.values).
What is not checked by default is the content of guest RAM: reading all of it would
cost the lazy restore its point, and a guest's RAM is the guest's own data (see
kvmpy.state.ram; `verify_ram=True` checks it).

`Snapshot.working_config` is the machine a restore builds: the saved one, with each
writable disk a fresh copy of the snapshot's (at a path the caller names, or in a
new temporary directory), so two restores of one snapshot never share a disk, and
every host end that is not in the snapshot (a read-only disk, a tap, a shared
directory, a vsock socket) the one its caller names.
docs/snapshots.md describes the format field by field.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from kvmpy import __version__, layout
from kvmpy.errors import KvmpyError, SnapshotError
from kvmpy.log import get_logger
from kvmpy.memory import GuestMemory, ram_spans
from kvmpy.state import config as machine_state
from kvmpy.state import ram, stream
from kvmpy.state.digest import sha256
from kvmpy.state.disks import copy_image
from kvmpy.state.values import U64, StateReader, shown

if TYPE_CHECKING:
    from kvmpy.machine import (
        DiskConfig,
        Machine,
        MachineConfig,
        NetConfig,
        ShareConfig,
        VsockConfig,
    )

log = get_logger(__name__)

FORMAT = "kvmpy-snapshot"
VERSION = 1  # a full snapshot; what every kvmpy that reads snapshots reads
VERSION_INCREMENTAL = 2  # RAM as the pages written since a parent (kvmpy.state.diff)
MAX_CHAIN = 64  # incremental snapshots on top of one full one
METADATA = "snapshot.json"
STATE = "state.bin"
RAM = "ram.bin"
MAX_METADATA = 1 << 20
MAX_STATE = 256 << 20


def disk_file(index: int) -> str:
    return f"disk{index}.img"


# -- saving ------------------------------------------------------------------------------------
def take_snapshot(machine: Machine, path: str | Path, *, incremental: bool = False,
                  base: str | Path | None = None) -> dict[str, Any]:
    """Write a snapshot of the running (or paused) `machine` to the new directory `path`;
    a running guest is paused for it and resumed after. Returns its metadata.
    `incremental` (or a `base`, which must be the machine's last snapshot) writes only
    the RAM written since that snapshot (kvmpy.state.diff)."""
    if machine.stopped is not None:
        raise KvmpyError(f"no snapshot of a stopped guest ({machine.stopped.reason})")
    was_running = not machine.paused
    machine.pause()
    try:
        return save_snapshot(machine, Path(path), incremental=incremental,
                             base=None if base is None else Path(base))
    finally:
        if was_running:
            machine.resume()


def save_snapshot(machine: Machine, path: Path, *, incremental: bool = False,
                  base: Path | None = None) -> dict[str, Any]:
    """Write `machine` (paused: vCPUs out of KVM_RUN, I/O thread stopped) to the new
    directory `path`; returns the metadata written. Incremental when asked or given a
    `base`. Then count the pages written from it, for an incremental snapshot after it
    (kvmpy.state.diff)."""
    from kvmpy.state import diff

    path = Path(path)
    if path.exists():
        raise SnapshotError(f"snapshot {path}: already exists (kvmpy never overwrites one)")
    if not path.parent.is_dir():
        raise SnapshotError(f"snapshot {path}: no directory {path.parent}")
    tracker = diff.tracker_for(machine, base) if incremental or base else None
    started = time.perf_counter()
    work = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        work.mkdir()
    except OSError as e:
        raise SnapshotError(f"snapshot {path}: {e.strerror}") from None
    try:
        sections = {"machine": machine_state.describe(machine.as_built()),
                    **machine.capture_state()}
        state = stream.encode(sections)
        (work / STATE).write_bytes(state)
        if tracker is None:
            ram_meta = ram.save_ram(machine.memory, work / RAM)
            ram_meta.pop("file")
        else:  # (the dirty log is read and cleared: a failure from here ends the chain)
            ram_meta, bitmap = diff.save_diff_ram(machine.memory, tracker.take(), work / RAM)
            (work / diff.DIRTY).write_bytes(bitmap)
            ram_meta |= {"parent": {"path": str(tracker.parent.path),
                                    "sha256": tracker.parent.sha256},
                         "dirty_sha256": sha256(bitmap).hexdigest()}
        meta = {
            "format": FORMAT, "version": VERSION if tracker is None else VERSION_INCREMENTAL,
            "kvmpy": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": sections["machine"],
            "state": {"size": len(state), "sha256": sha256(state).hexdigest()},
            "ram": ram_meta,
            "disks": [_save_disk(i, disk, work) for i, disk in enumerate(machine.config.disks)],
        }
        meta["seconds"] = round(time.perf_counter() - started, 6)
        meta["sha256"] = write_metadata(work, meta)
        os.rename(work, path)
    except BaseException as e:
        import shutil  # (not on a restore's path: imported when needed, like tempfile)

        if tracker is not None:  # (its pages would be missing from the next one)
            tracker.close()
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, KvmpyError):  # (a full disk...)
            raise SnapshotError(f"snapshot {path}: {e.strerror or e}") from None
        raise
    diff.track(machine, diff.Parent(path.resolve(), meta["sha256"]))
    return meta


def write_metadata(directory: Path, meta: dict[str, Any]) -> str:
    """snapshot.json: the metadata and, last, the SHA-256 of its own canonical form, so
    that no byte of it can change unnoticed (not even the date or a version string).
    Returns that SHA-256 (what an incremental snapshot after it names it by)."""
    body = {k: v for k, v in meta.items() if k != "sha256"}
    sha = _canonical_sha(body)
    (directory / METADATA).write_text(json.dumps(body | {"sha256": sha}, indent=1) + "\n")
    return sha


def _canonical_sha(body: dict[str, Any]) -> str:
    return sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _save_disk(index: int, disk: DiskConfig, work: Path) -> dict[str, Any]:
    st = os.stat(disk.path)
    if disk.read_only:
        return {"read_only": True, "path": str(Path(disk.path).resolve()), "size": st.st_size,
                "mtime_ns": st.st_mtime_ns}
    how = copy_image(Path(disk.path), work / disk_file(index))
    return {"read_only": False, "source": str(disk.path), "size": st.st_size, "copied": how}


# -- opening ----------------------------------------------------------------------------------
class DiskPart(NamedTuple):
    read_only: bool
    path: Path  # the snapshot's copy of a writable disk, or the read-only disk itself
    size: int


class RamLayer(NamedTuple):
    """An incremental snapshot's RAM: the pages `bitmap` marks, in `ram`."""

    ram: Path
    bitmap: bytes


class Snapshot(NamedTuple):
    """A snapshot directory that passed every check `open_snapshot` makes."""

    path: Path
    machine: MachineConfig  # as saved: writable disks are the snapshot's own copies
    sections: dict[str, Any]
    regions: list[list[int]]  # guest RAM: [gpa, size, offset in ram.bin]
    disks: list[DiskPart]
    sha256: str = ""  # of its snapshot.json
    # RAM: the full snapshot's ram.bin at the root of its chain, then each incremental
    # snapshot's layer on it, oldest first (none for a full snapshot)
    base_ram: Path | None = None
    layers: tuple[RamLayer, ...] = ()

    def what(self) -> str:
        return f"snapshot {self.path}"

    def directories(self) -> list[Path]:
        """Where a restore reads: this snapshot and, for an incremental one, each before
        it in its chain."""
        rams = [self.base_ram, *(layer.ram for layer in self.layers)]
        return [self.path, *sorted({p.parent for p in rams if p is not None} - {self.path})]

    def map_ram(self) -> GuestMemory:
        path = self.base_ram or self.path / RAM
        try:
            memory = ram.map_ram(path, self.regions)
        except OSError as e:  # (gone since it was opened, or not in a jail's view)
            raise SnapshotError(f"{self.what()}: {path}: {e.strerror}") from None
        if self.layers:
            from kvmpy.state.diff import apply_layer

            try:
                for layer in self.layers:
                    apply_layer(memory, self.regions, layer.ram, layer.bitmap, self.what())
            except BaseException:
                memory.close()
                raise
        return memory

    def check_cpuid(self, here: Callable[[int], Sequence[tuple[int, ...]]]) -> None:
        """Refuse a snapshot whose vCPUs saw CPUID this host would not give them
        (`here(i)`: the entries kvmpy sets on vCPU i of this machine here)."""
        from kvmpy.kvm.state import cpuid_of

        for i in range(self.machine.cpus):
            saved = {e[:2]: e for e in cpuid_of(self.sections[f"vcpu{i}"], f"vcpu{i}")}
            mine = {tuple(e[:2]): tuple(e) for e in here(i)}
            differ = sorted(k for k in saved.keys() | mine.keys() if saved.get(k) != mine.get(k))
            if differ:
                function, index = differ[0]
                raise SnapshotError(f"{self.what()}: vCPU {i} saw other CPUID than this host "
                                    f"gives (leaf {function:#x}.{index} first): taken on "
                                    "another CPU or KVM")

    def working_config(self, disks: Sequence[DiskConfig | Path | None] = (), *,
                       nets: Sequence[NetConfig] = (), shares: Sequence[ShareConfig] = (),
                       vsock: VsockConfig | None = None) -> tuple[MachineConfig, WorkingCopies]:
        """The machine to restore, on this host: each writable disk copied from the
        snapshot to `disks[i]` (a new file, with the limits given for it) or, when none
        is given, into a new temporary directory; a read-only disk used where it is,
        which `disks[i]` must name; the taps, shares and vsock socket the caller gives
        (kvmpy.state.config.on_this_host: a snapshot names no host file, directory, tap
        or socket that its restore uses unasked). Everything is checked before the first
        copy. The copies are the caller's: to keep (`WorkingCopies.keep`, which says
        where they are) or to remove if the restore fails (`discard`)."""
        from kvmpy.machine import DiskConfig
        from kvmpy.options import disk_config
        from kvmpy.state.config import on_this_host

        n = len(self.disks)
        if len(disks) > n:
            raise SnapshotError(f"--disk: {self.what()} has {n} disks, {len(disks)} given")
        given = [None if d is None else disk_config(d)
                 for d in [*disks, *[None] * (n - len(disks))]]
        for i, (part, wanted) in enumerate(zip(self.disks, given, strict=True)):
            if part.read_only and (wanted is None or wanted.path.resolve() != part.path):
                raise SnapshotError(f"--disk: disk {i + 1} of the {n} of {self.what()} is "
                                    f"read-only {shown(str(part.path))}, used only when "
                                    f"named: give --disk for each, with that file as "
                                    f"number {i + 1}")
            if not part.read_only and wanted is not None and wanted.read_only:
                raise SnapshotError(f"--disk {wanted.path},ro: disk {i + 1} of {self.what()} "
                                    "is a writable one (its guest has it so)")
        machine = on_this_host(self.machine, self.what(), nets=nets, shares=shares,
                               vsock=vsock)
        out: list[DiskConfig] = []
        made: list[Path] = []
        temp: Path | None = None
        try:
            for i, (part, wanted) in enumerate(zip(self.disks, given, strict=True)):
                if part.read_only:
                    assert wanted is not None
                    out.append(DiskConfig(part.path, read_only=True, limits=wanted.limits))
                    continue
                if wanted is None:
                    import tempfile

                    temp = temp or Path(tempfile.mkdtemp(prefix="kvmpy-restore-"))
                    wanted = DiskConfig(temp / disk_file(i))
                if wanted.path.exists():
                    raise SnapshotError(f"--disk {wanted.path}: already exists; a restored "
                                        "disk is a new copy of the snapshot's (kvmpy never "
                                        "overwrites a file)")
                try:
                    copy_image(part.path, wanted.path)
                except OSError as e:
                    raise SnapshotError(f"--disk {wanted.path}: cannot copy disk {i + 1} of "
                                        f"{self.what()} there: {e.strerror}") from None
                made.append(wanted.path)
                out.append(wanted)
        except BaseException:
            WorkingCopies(self, made, temp).discard()
            raise
        return machine._replace(disks=out), WorkingCopies(self, made, temp)


class WorkingCopies(NamedTuple):
    """The disk copies a restore runs on, and the temporary directory holding them."""

    snapshot: Snapshot
    files: list[Path]
    temp: Path | None

    def keep(self) -> None:
        """The restore went ahead: say where each disk lives now (it stays after exit)."""
        for path in self.files:
            log.warning("%s: a disk of %s runs on %s", path.name, self.snapshot.what(), path)

    def discard(self) -> None:
        """(Best effort, on the way out of a failure whose own error is the one to
        report: in a jail a copy is a mount point, which cannot be removed there.)"""
        for path in self.files:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        if self.temp is not None:
            import shutil

            shutil.rmtree(self.temp, ignore_errors=True)


def open_snapshot(path: Path | str, *, verify_ram: bool = False, _chain: int = 0,
                  _sha: str | None = None) -> Snapshot:
    """Read and check the snapshot at `path` (and the chain of snapshots an incremental
    one is taken after); SnapshotError (one line) for anything wrong. (`_chain`: how
    deep in a chain this one is; `_sha`: the checksum its child names it by, checked
    before its own parent is opened, so no edited chain can loop.)"""
    path = Path(path)
    what = f"snapshot {path}"
    if not path.is_dir():
        raise SnapshotError(f"{what}: "
                            + ("not a directory" if path.exists() else "no such directory"))
    meta = _json_file(path / METADATA, what)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SnapshotError(f"{what}: {METADATA} is not a kvmpy snapshot's")
    version = meta.get("version")
    if version not in (VERSION, VERSION_INCREMENTAL):  # (first: another version may check
        # itself otherwise)
        raise SnapshotError(f"{what}: format version {repr(version)[:20]}; this kvmpy "
                            f"({__version__}) reads versions {VERSION} and "
                            f"{VERSION_INCREMENTAL}")
    if meta.get("sha256") != _canonical_sha({k: v for k, v in meta.items() if k != "sha256"}):
        raise SnapshotError(f"{what}: {METADATA} does not match its checksum (damaged or "
                            "edited)")
    if _sha is not None and meta["sha256"] != _sha:
        raise SnapshotError(f"{what} is another snapshot than the one its child was taken "
                            "after (checksum differs)")
    r = StateReader(meta, METADATA)
    r.str("sha256", 64)
    r.str("format", 64)
    r.int("version", 0, U64)
    r.str("kvmpy", 64)
    r.str("created", 64)
    r.number("seconds")
    machine = machine_state.machine_config(meta["machine"], f"{METADATA} machine")
    r.sub("machine")  # (read above with its own checks)

    s = r.sub("state")
    state_size, state_sha = s.int("size", 0, MAX_STATE), s.str("sha256", 64)
    s.done()
    data = _read_exact(path / STATE, state_size, what)
    if sha256(data).hexdigest() != state_sha:
        raise SnapshotError(f"{what}: {STATE} does not match its checksum (damaged or edited)")
    sections = stream.decode(data, f"{what}: {STATE}")
    if sections.get("machine") != meta["machine"]:
        raise SnapshotError(f"{what}: {STATE} describes another machine than {METADATA}")
    vcpus = sorted(n for n in sections if n.startswith("vcpu"))
    if vcpus != sorted(f"vcpu{i}" for i in range(machine.cpus)):
        raise SnapshotError(f"{what}: {len(vcpus)} vCPU states for a machine of "
                            f"{machine.cpus} vCPUs")

    m = r.sub("ram")
    size, regions = m.int("size", 0, U64), m.list("regions", 4)
    m.int("data_bytes", 0, U64)
    digest = m.str("digest", 64)
    if version == VERSION_INCREMENTAL:
        p = m.sub("parent")
        parent_path, parent_sha = Path(p.str("path", 4096)), p.str("sha256", 64)
        p.done()
        dirty_sha = m.str("dirty_sha256", 64)
    m.done()
    expected = ram.layout(ram_spans(machine.mem_size, (layout.MMIO_HOLE, layout.MMIO_HOLE_END)))
    if regions != expected or size != machine.mem_size:
        raise SnapshotError(f"{what}: guest RAM laid out otherwise than {machine.mem_size} "
                            "bytes of RAM are")
    _check_size(path / RAM, size, what)
    base_ram: Path | None = None
    layers: tuple[RamLayer, ...] = ()
    if version == VERSION_INCREMENTAL:
        from kvmpy.memory import PAGE
        from kvmpy.state import diff

        bitmap = _read_exact(path / diff.DIRTY, (size // PAGE + 7) // 8, what)
        if sha256(bitmap).hexdigest() != dirty_sha:
            raise SnapshotError(f"{what}: {diff.DIRTY} does not match its checksum (damaged "
                                "or edited)")
        diff.check_bitmap(bitmap, size, what)
        parent = _open_parent(parent_path, parent_sha, expected, what, verify_ram, _chain)
        base_ram = parent.base_ram or parent.path / RAM
        layers = (*parent.layers, RamLayer(path / RAM, bitmap))
        if verify_ram:
            diff.verify_layer(path / RAM, bitmap, digest, what)
    elif verify_ram:
        ram.verify_ram(path / RAM, digest, what)

    disks = [_open_disk(path, i, d, what) for i, d in enumerate(r.subs("disks", 64))]
    if len(disks) != len(machine.disks) or any(
            d.read_only != c.read_only for d, c in zip(disks, machine.disks, strict=False)):
        raise SnapshotError(f"{what}: its disks are not the machine's disks")
    r.done()
    from kvmpy.machine import DiskConfig

    saved = machine._replace(disks=[DiskConfig(d.path, d.read_only) for d in disks])
    return Snapshot(path, saved, sections, expected, disks, meta["sha256"], base_ram, layers)


def _open_parent(path: Path, sha: str, regions: list[list[int]], what: str, verify_ram: bool,
                 chain: int) -> Snapshot:
    """The snapshot an incremental one was taken after, checked to be that very one."""
    if chain + 1 >= MAX_CHAIN:
        raise SnapshotError(f"{what}: more than {MAX_CHAIN} snapshots in its chain")
    if not path.is_dir():
        raise SnapshotError(f"{what}: its parent snapshot {path} is missing (an incremental "
                            "snapshot holds only what changed after it)")
    try:
        parent = open_snapshot(path, verify_ram=verify_ram, _chain=chain + 1, _sha=sha)
    except SnapshotError as e:
        if chain:  # (said once, by the snapshot the restore was asked for)
            raise
        raise SnapshotError(f"{what}: in its chain: {e}") from None
    if parent.regions != regions:
        raise SnapshotError(f"{what}: its parent {path} has other guest RAM")
    return parent


def _open_disk(path: Path, index: int, r: StateReader, what: str) -> DiskPart:
    read_only = r.bool("read_only")
    size = r.int("size", 0, U64)
    if read_only:
        disk = Path(r.str("path", 4096))
        mtime = r.int("mtime_ns", 0, U64)
        r.done()
        try:
            st = os.stat(disk)
        except OSError as e:
            raise SnapshotError(f"{what}: read-only disk {disk}: {e.strerror}") from None
        if st.st_size != size or st.st_mtime_ns != mtime:
            raise SnapshotError(f"{what}: read-only disk {disk} changed since the snapshot "
                                "(size or modification time)")
        return DiskPart(True, disk, size)
    r.str("source", 4096)
    r.str("copied", 32)
    r.done()
    _check_size(path / disk_file(index), size, what)
    return DiskPart(False, path / disk_file(index), size)


def _json_file(path: Path, what: str) -> Any:
    try:
        # (O_NONBLOCK: a FIFO put in its place must not hold the restore forever)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise SnapshotError(f"{what}: {path.name}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotError(f"{what}: {path.name} is not a regular file")
        data = f.read(MAX_METADATA + 1)
    if len(data) > MAX_METADATA:
        raise SnapshotError(f"{what}: {path.name} is larger than {MAX_METADATA} bytes")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise SnapshotError(f"{what}: {path.name} is not valid JSON (damaged or edited)") \
            from None


def _check_size(path: Path, size: int, what: str) -> None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError as e:
        raise SnapshotError(f"{what}: {path.name}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotError(f"{what}: {path.name} is not a regular file")
    if st.st_size != size:
        raise SnapshotError(f"{what}: {path.name} is {st.st_size} bytes, {METADATA} says "
                            f"{size} ({'truncated' if st.st_size < size else 'grown'})")


def _read_exact(path: Path, size: int, what: str) -> bytes:
    _check_size(path, size, what)
    with open(path, "rb") as f:
        data = f.read(size + 1)
    if len(data) != size:
        raise SnapshotError(f"{what}: {path.name} changed while it was read")
    return data
