"""Snapshot directories without KVM: what is written, how RAM and disks come back, and every
hostile or mismatched snapshot refused in one line before anything would be built."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kvmpy.cli import build_parser, restore_config
from kvmpy.errors import ConfigError, SnapshotError
from kvmpy.machine import (
    DiskConfig,
    FlatConfig,
    MachineConfig,
    NetConfig,
    ShareConfig,
    VsockConfig,
)
from kvmpy.memory import GuestMemory
from kvmpy.ratelimit import Limits
from kvmpy.state import ram
from kvmpy.state.config import describe, machine_config
from kvmpy.state.snapshot import METADATA, RAM, STATE, open_snapshot, save_snapshot
from tests.unit.hostile import resign

MEM = 2 << 20
PAGE = 4096


class FakeVm:
    """KVM's dirty log, of the pages a test says the guest wrote (`FakeMachine.write`)."""

    def __init__(self) -> None:
        self.memory_slots = [(0, 0, MEM, 0)]
        self.fd = 3
        self.logging = False
        self.dirty: set[int] = set()

    def log_dirty_pages(self, on: bool = True) -> None:
        self.logging = on
        self.dirty = set(range(MEM // PAGE)) if on else set()  # (KVM's starts all set)

    def dirty_log(self, slot: int, pages: int) -> bytes:
        bitmap = bytearray(pages // 8)
        for page in self.dirty:
            bitmap[page // 8] |= 1 << page % 8
        self.dirty = set()
        return bytes(bitmap)


class FakeMachine:
    """What save_snapshot asks of a Machine, with RAM in a bytearray."""

    def __init__(self, cpus: int = 1, disks: tuple[DiskConfig, ...] = ()) -> None:
        self.config = MachineConfig(mem_size=MEM, cpus=cpus, flat=FlatConfig(Path("g.bin")),
                                    disks=list(disks))
        self.buf = bytearray(MEM)
        for page in (0, 1, 7, 300, 511):  # a few used pages among zeros
            self.buf[page * PAGE: page * PAGE + 5] = b"page%d" % (page % 10)
        self.memory = GuestMemory.from_buffer(self.buf)
        self.vm = FakeVm()
        self.dirty_log_owner: Any = None

    def write(self, gpa: int, data: bytes) -> None:
        """The guest writes: RAM changes, and KVM logs the pages (when it logs)."""
        self.buf[gpa:gpa + len(data)] = data
        if self.vm.logging:
            self.vm.dirty.update(range(gpa // PAGE, (gpa + len(data) - 1) // PAGE + 1))

    def as_built(self) -> MachineConfig:
        return self.config

    def capture_state(self) -> dict[str, Any]:
        return {"vm": {"clock": {"ns": 1}},
                **{f"vcpu{i}": {"cpuid": [], "regs": {"rip": 16 + i}}
                   for i in range(self.config.cpus)}, "serial0": {"ier": 1}}


@pytest.fixture
def snap(tmp_path: Path) -> Path:
    path = tmp_path / "snap"
    save_snapshot(FakeMachine(), path)  # type: ignore[arg-type]
    return path


def test_written_and_opened(snap: Path) -> None:
    assert sorted(os.listdir(snap)) == [RAM, METADATA, STATE]
    meta = json.loads((snap / METADATA).read_text())
    assert meta["format"] == "kvmpy-snapshot" and meta["version"] == 1
    assert meta["ram"]["data_bytes"] == 5 * PAGE
    assert os.stat(snap / RAM).st_size == MEM
    assert os.stat(snap / RAM).st_blocks * 512 <= 64 * PAGE  # zero pages are holes
    s = open_snapshot(snap, verify_ram=True)
    machine = FakeMachine()
    assert s.sections == {"machine": describe(machine.config), **machine.capture_state()}
    assert s.machine.mem_size == MEM and s.machine.cpus == 1


def test_ram_maps_privately_and_lazily(snap: Path) -> None:
    s = open_snapshot(snap)
    memory = s.map_ram()
    assert memory.read(0, MEM) == bytes(FakeMachine().buf)
    memory.write(300 * PAGE, b"guest writes here")
    assert memory.read(300 * PAGE, 17) == b"guest writes here"
    assert memory.read(7 * PAGE, 5) == b"page7"
    again = open_snapshot(snap).map_ram()  # another restore sees the snapshot, not the write
    assert again.read(300 * PAGE, 5) == b"page0"
    memory.close()
    again.close()
    open_snapshot(snap, verify_ram=True)


def test_ram_digest_does_not_depend_on_holes(snap: Path, tmp_path: Path) -> None:
    dense = tmp_path / "dense.bin"
    dense.write_bytes((snap / RAM).read_bytes())  # a copy that keeps no holes
    meta = json.loads((snap / METADATA).read_text())
    ram.verify_ram(dense, meta["ram"]["digest"], "copy")
    data = bytearray(dense.read_bytes())
    data[5 * PAGE + 100] = 1  # a zero page made non-zero
    dense.write_bytes(data)
    with pytest.raises(SnapshotError, match="does not match its digest"):
        ram.verify_ram(dense, meta["ram"]["digest"], "copy")


def test_never_overwrites_and_leaves_nothing_half_written(snap: Path, tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="already exists"):
        save_snapshot(FakeMachine(), snap)  # type: ignore[arg-type]

    class Failing(FakeMachine):
        def capture_state(self) -> dict[str, Any]:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_snapshot(Failing(), tmp_path / "other")  # type: ignore[arg-type]
    assert sorted(os.listdir(tmp_path)) == ["snap"]


# -- hostile snapshots: each refused in one line --------------------------------------------
def refused(path: Path, match: str, **kw: Any) -> None:
    with pytest.raises(SnapshotError, match=match) as e:
        open_snapshot(path, **kw)
    assert "\n" not in str(e.value)


def test_truncated_ram(snap: Path) -> None:
    os.truncate(snap / RAM, MEM - PAGE)
    refused(snap, r"ram.bin is 2093056 bytes, snapshot.json says 2097152 \(truncated\)")


def test_every_flipped_metadata_byte(snap: Path) -> None:
    original = (snap / METADATA).read_bytes()
    for i in range(len(original)):
        for bit in (0x01, 0x20, 0x80):
            damaged = bytearray(original)
            damaged[i] ^= bit
            (snap / METADATA).write_bytes(damaged)
            with pytest.raises(SnapshotError) as e:
                open_snapshot(snap)
            assert "\n" not in str(e.value)
    (snap / METADATA).write_bytes(original)
    open_snapshot(snap)


def test_edited_state(snap: Path) -> None:
    data = bytearray((snap / STATE).read_bytes())
    data[40] ^= 1
    (snap / STATE).write_bytes(data)
    refused(snap, "state.bin does not match its checksum")


def test_wrong_version(snap: Path) -> None:
    meta = json.loads((snap / METADATA).read_text())
    (snap / METADATA).write_text(json.dumps(meta | {"version": 3}))
    refused(snap, r"format version 3; this kvmpy \(0.1.0\) reads versions 1 and 2")
    (snap / METADATA).write_text(json.dumps(meta | {"format": "qemu"}))
    refused(snap, "snapshot.json is not a kvmpy snapshot's")


def test_other_vcpu_count(snap: Path) -> None:
    sections = open_snapshot(snap).sections
    sections["machine"]["cpus"] = 2
    resign(snap, sections=sections)
    refused(snap, "1 vCPU states for a machine of 2 vCPUs")


def test_metadata_and_state_that_disagree(snap: Path) -> None:
    resign(snap, edit=lambda meta: meta["machine"].update(cpus=2))
    refused(snap, "state.bin describes another machine than snapshot.json")


def test_other_memory_size(snap: Path) -> None:
    sections = open_snapshot(snap).sections
    sections["machine"]["mem_size"] = 2 * MEM
    resign(snap, sections=sections)
    refused(snap, "guest RAM laid out otherwise than 4194304 bytes of RAM are")
    resign(snap, edit=lambda meta: meta["ram"].update(regions=[[0, MEM, 4096]]))
    refused(snap, "guest RAM laid out otherwise")


def test_missing_or_strange_files(snap: Path, tmp_path: Path) -> None:
    refused(tmp_path / "nothing", "no such directory")
    refused(snap / RAM, "ram.bin: not a directory")
    (snap / RAM).unlink()
    refused(snap, "ram.bin: No such file or directory")
    os.mkfifo(snap / RAM)
    refused(snap, "ram.bin is not a regular file")
    original = (snap / METADATA).read_bytes()
    (snap / METADATA).unlink()
    os.mkfifo(snap / METADATA)  # (opened, it would wait for a writer forever)
    refused(snap, "snapshot.json is not a regular file")
    (snap / METADATA).unlink()
    (snap / METADATA).write_bytes(original)
    (snap / METADATA).unlink()
    (snap / METADATA).symlink_to("/etc/passwd")
    refused(snap, "snapshot.json: Too many levels of symbolic links")
    (snap / METADATA).unlink()
    (snap / METADATA).write_bytes(b"{" * 2_000_000)
    refused(snap, "larger than")
    (snap / METADATA).write_bytes(b"[" * 100_000 + b"]" * 100_000)
    refused(snap, "is not valid JSON")
    (snap / METADATA).write_bytes(b"[1, 2]")
    refused(snap, "is not a kvmpy snapshot's")


def test_machine_fields_are_checked() -> None:
    good = describe(FakeMachine().config)
    for change, match in [({"cpus": 0}, "cpus: 0 is outside"), ({"mem_size": "big"}, "mem_size"),
                          ({"flat": None}, "exactly one"), ({"disks": [{"path": 1}]}, "path"),
                          ({"rng": 1}, "rng: expected true or false"),
                          ({"nets": [{"tap": "t", "mac": None, "x": 1}]}, "unknown field 'x'")]:
        with pytest.raises(SnapshotError, match=match):
            machine_config(good | change)


# -- disks ---------------------------------------------------------------------------------------
def test_writable_disks_are_copied_in_and_out(tmp_path: Path) -> None:
    image, ro = tmp_path / "disk.img", tmp_path / "ro.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
        f.seek(5 << 20)
        f.write(b"guest data")
    ro.write_bytes(b"r" * 4096)
    machine = FakeMachine(disks=(DiskConfig(image), DiskConfig(ro, read_only=True)))
    save_snapshot(machine, tmp_path / "snap")  # type: ignore[arg-type]
    with open(image, "r+b") as f:  # the guest goes on writing its disk
        f.seek(5 << 20)
        f.write(b"LATER DATA")
    s = open_snapshot(tmp_path / "snap")
    copy = s.disks[0].path
    assert copy.parent == tmp_path / "snap" and os.stat(copy).st_blocks * 512 < 8 << 20
    one, _ = s.working_config([tmp_path / "run1.img", ro])
    two, copies = s.working_config([None, ro])  # a temporary copy, for a second restore at once
    for config in (one, two):
        with open(config.disks[0].path, "rb") as f:
            f.seek(5 << 20)
            assert f.read(10) == b"guest data"
        assert config.disks[1] == DiskConfig(ro.resolve(), read_only=True)
    assert one.disks[0].path != two.disks[0].path
    with pytest.raises(SnapshotError, match="already exists"):
        s.working_config([tmp_path / "run1.img", ro])
    for other in ([tmp_path / "run2.img", tmp_path / "elsewhere.img"], [tmp_path / "run2.img"]):
        with pytest.raises(SnapshotError, match=r"^--disk: disk 2 of the 2 of snapshot .* is "
                           r"read-only .*ro.img, used only when named: give --disk for each, "
                           r"with that file as number 2$"):
            s.working_config(other)
        assert not (tmp_path / "run2.img").exists()  # (refused before any copy)
    with pytest.raises(SnapshotError, match=r"run2.img,ro: disk 1 of .* is a writable one"):
        s.working_config([DiskConfig(tmp_path / "run2.img", read_only=True), ro])
    limited = DiskConfig(tmp_path / "run3.img", limits=Limits(bw=1 << 20))
    three, _ = s.working_config([limited, DiskConfig(ro, limits=Limits(ops=50))])
    assert three.disks == [limited, DiskConfig(ro.resolve(), True, Limits(ops=50))]
    copies.discard()
    assert not copies.files[0].exists() and copies.temp is not None and not copies.temp.exists()
    os.utime(ro, ns=(0, 0))  # the read-only disk changed since
    refused(tmp_path / "snap", "read-only disk .*ro.img changed since the snapshot")


# -- the command line with --restore -------------------------------------------------------------
def cli(*argv: str) -> Any:
    return build_parser().parse_args(["run", *argv])


def test_options_with_restore_must_match_the_snapshot(snap: Path) -> None:
    with pytest.raises(SnapshotError, match="--cpus: snapshot .* has 1 vCPU, not 2 vCPUs"):
        restore_config(cli("--restore", str(snap), "--cpus", "2"))
    with pytest.raises(SnapshotError, match="--mem: .* has 2097152 bytes of RAM, not 4194304"):
        restore_config(cli("--restore", str(snap), "--mem", "4M"))
    with pytest.raises(SnapshotError, match="--rng: .* has no virtio-rng, not virtio-rng"):
        restore_config(cli("--restore", str(snap), "--rng", "on"))
    with pytest.raises(SnapshotError, match="--disk: .* has 0 disks, not 1 disk"):
        restore_config(cli("--restore", str(snap), "--disk", "x.img"))
    with pytest.raises(ConfigError, match="--kernel: a restored guest is already running"):
        restore_config(cli("--restore", str(snap), "--kernel", "bzImage"))
    config, _, _ = restore_config(cli("--restore", str(snap), "--cpus", "1", "--mem", "2M"))
    assert config.cpus == 1 and config.flat is not None
    with pytest.raises(SnapshotError, match="--share: snapshot .* has no shares"):
        restore_config(cli("--restore", str(snap), "--share", "/tmp,tag=t"))
    with pytest.raises(SnapshotError, match="--net: snapshot .* has 0 network devices, not 1"):
        restore_config(cli("--restore", str(snap), "--net", "tap=t0"))
    with pytest.raises(SnapshotError, match="--vsock: snapshot .* has no vsock device"):
        restore_config(cli("--restore", str(snap), "--vsock", "3,uds=/tmp/v.sock"))


def test_host_ends_are_the_callers_never_the_snapshots(tmp_path: Path) -> None:
    """A snapshot is untrusted: the directory a share reached, the tap a network device
    was on and the vsock's socket path are saved, but a restore uses only the ones it is
    given (the refusal says what to give); what the guest holds (tag, MAC, CID) stays."""
    machine = FakeMachine()
    machine.config = machine.config._replace(
        shares=[ShareConfig(tmp_path, "data", read_only=True)],
        nets=[NetConfig("tap7", "52:54:00:00:00:07")],
        vsock=VsockConfig(7, tmp_path / "v.sock"))
    save_snapshot(machine, tmp_path / "snap")  # type: ignore[arg-type]
    saved = open_snapshot(tmp_path / "snap").machine
    assert (saved.shares, saved.nets, saved.vsock) == (
        machine.config.shares, machine.config.nets, machine.config.vsock)
    snap = str(tmp_path / "snap")
    given = {"--share": [f"{tmp_path},tag=data,ro"], "--net": ["tap=mytap"],
             "--vsock": [f"7,uds={tmp_path / 'w.sock'}"]}

    def restore(options: dict[str, list[str]]) -> Any:
        return restore_config(cli("--restore", snap, *[x for option, values in options.items()
                                                       for v in values for x in (option, v)]))

    for option, values, match in [
            ("--share", [], f"--share: snapshot .*saved with: --share {tmp_path},tag=data,ro"),
            ("--net", [], "--net: snapshot .*saved on: --net tap=tap7"),
            ("--vsock", [], f"--vsock: snapshot .*saved with: --vsock 7,uds={tmp_path}/v.sock"),
            ("--share", [f"{tmp_path},tag=other"], "--share: .*saved with"),
            ("--share", [f"{tmp_path},tag=data", f"{tmp_path},tag=data"], "--share: .*saved"),
            ("--share", [f"{tmp_path / 'other'},tag=data,ro"],
             f"--share {tmp_path}/other,tag=data,ro: snapshot .* was saved with --share "
             f"{tmp_path},tag=data,ro; a restored share is that directory, as it was shared"),
            ("--share", [f"{tmp_path},tag=data"], "--share .*tag=data: .* was saved with"),
            ("--net", ["tap=mytap,mac=52:54:00:00:00:08"],
             "--net mac=52:54:00:00:00:08: the guest of snapshot .* has MAC 52:54:00:00:00:07"),
            ("--vsock", ["3,uds=/x.sock"], "--vsock: .* has guest CID 7, not 3"),
            ("--net", ["tap=a", "tap=b"], "--net: .*saved on")]:
        with pytest.raises(SnapshotError, match=f"^{match}"):
            restore(given | {option: values})
    config, _, _ = restore(given)
    assert config.shares == [ShareConfig(tmp_path, "data", read_only=True)]
    assert config.nets == [NetConfig("mytap", "52:54:00:00:00:07")]
    assert config.vsock == VsockConfig(7, tmp_path / "w.sock")
    # names a snapshot makes up are shown quoted: the refusal stays one line
    sections = open_snapshot(tmp_path / "snap").sections
    sections["machine"]["nets"][0]["tap"] = "t\n\x1b[2J"
    resign(tmp_path / "snap", sections=sections)
    with pytest.raises(SnapshotError) as e:
        restore_config(cli("--restore", snap))
    assert str(e.value).endswith("(saved on: --net tap='t\\n\\x1b[2J')"), str(e.value)
    # a machine without them is described as before they could be saved
    assert "shares" not in describe(FakeMachine().config) and "vsock" not in describe(
        FakeMachine().config)


def test_anonymous_ram_is_read_only_where_it_was_touched(tmp_path: Path) -> None:
    """/proc/self/pagemap narrows the scan of anonymous RAM; the result is the same."""
    memory = GuestMemory.anonymous(64 << 20)
    for gpa in (0, 5 << 20, 40 << 20, (64 << 20) - PAGE):
        memory.write(gpa, b"touched %d" % gpa)
    memory.write(20 << 20, bytes(PAGE))  # touched, but zeros: not data
    quick = ram.save_ram(memory, tmp_path / "quick.bin")
    memory.anonymous_backing = False  # as for a restored guest's file-backed RAM: read all
    full = ram.save_ram(memory, tmp_path / "full.bin")
    assert quick["data_bytes"] == full["data_bytes"] == 4 * PAGE
    assert quick["digest"] == full["digest"]
    assert (tmp_path / "quick.bin").read_bytes() == (tmp_path / "full.bin").read_bytes()
    memory.close()
