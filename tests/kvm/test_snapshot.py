"""Snapshots of flat guests on this machine's /dev/kvm: paused mid-run, saved, let run on,
restored in new processes (the command line and QMP too): the guest's own counter
goes on exactly where it was saved. Also the KVM state round trip and the refusals
only a KVM can make (CPUID, device set, values KVM rejects), and any one change to a
re-signed snapshot refused in one line or run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.api import Guest
from kvmpy.cpu.modes import Mode
from kvmpy.errors import SnapshotError
from kvmpy.kvm.state import capture_vcpu, restore_vcpu
from kvmpy.machine import DiskConfig, FlatConfig, Machine, MachineConfig
from kvmpy.state.snapshot import open_snapshot
from kvmpy.stop import StopKind
from tests.qmp_kit import close, connect
from tests.unit.hostile import mutate, resign

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("temp_in_tmp_path")]

KVMPY = [sys.executable, "-m", "kvmpy"]
LIMIT = 0x60


def counter(guest_dir: Path, kind: str, tmp_path: Path, **extra: Any) -> MachineConfig:
    """A counter guest: real mode at CPL0 (with the in-kernel irqchip, two vCPUs, a disk
    and virtio-rng, so their state is in the snapshot too) or long mode at CPL3."""
    if kind == "real":
        disk = tmp_path / "disk.img"
        disk.write_bytes(b"d" * (1 << 20))
        return MachineConfig(mem_size=64 << 20, cpus=2, disks=[DiskConfig(disk)], rng=True,
                             flat=FlatConfig(guest_dir / "counter_real.bin", irqchip=True,
                                             gprs={"rbp": LIMIT}), **extra)
    return MachineConfig(mem_size=128 << 20, flat=FlatConfig(
        guest_dir / "counter_cpl3.bin", Mode.LONG, cpl=3, gprs={"rbp": LIMIT}), **extra)


def count_line(kind: str, n: int) -> str:
    return f"count {n:04x}" if kind == "real" else f"count {n:08x}"


def assert_counts(kind: str, text: str) -> None:
    """0, 1, ... LIMIT, one per line, each exactly once: nothing lost, nothing twice."""
    assert text.split("\n") == [count_line(kind, n) for n in range(LIMIT + 1)] + [""], text


@pytest.mark.parametrize("kind", ["real", "cpl3"])
def test_snapshot_mid_run_continues_exactly_in_new_processes(guest_dir: Path, tmp_path: Path,
                                                             kind: str) -> None:
    snap = tmp_path / "snap"
    with Guest.from_config(counter(guest_dir, kind, tmp_path)) as g:
        g.expect(count_line(kind, 0x10) + "\n", 60)
        g.pause()
        saved = g.output
        meta = g.snapshot(snap)
        time.sleep(0.3)
        assert g.output == saved and g.paused  # nothing runs while paused
        g.resume()
        stop = g.wait(120)
        assert stop is not None and stop.exit_status == 0, stop
        assert_counts(kind, g.output)  # the original runs on to its end
    assert meta["ram"]["data_bytes"] < 1 << 20
    # two restores of the one snapshot at once, each on its own copy of the disk
    runs = [subprocess.Popen([*KVMPY, "run", "--restore", str(snap)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        assert_counts(kind, saved + out.decode())
        if kind == "real":
            assert re.search(rb"disk0.img: a disk of snapshot .* runs on .*kvmpy-restore-",
                             err), err


def test_qmp_stop_snapshot_cont_quit_and_restore_with_qmp(guest_dir: Path, tmp_path: Path
                                                          ) -> None:
    kind, snap, sock = "cpl3", tmp_path / "snap", tmp_path / "qmp.sock"
    guest = ["--flat", str(guest_dir / "counter_cpl3.bin"), "--mode", "long", "--cpl", "3"]
    run = subprocess.Popen([*KVMPY, "run", *guest, "--qmp", f"unix:{sock}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    qmp = connect(sock)
    assert qmp.cmd("query-status") == {"status": "running", "running": True,
                                       "singlestep": False}
    qmp.cmd("stop")
    assert [e["event"] for e in qmp.get_events(wait=True)] == ["STOP"]
    assert qmp.cmd("query-status")["status"] == "paused"
    reply = qmp.cmd("x-kvmpy-snapshot-save", path=str(snap))
    assert reply["path"] == str(snap) and reply["ram_bytes"] > 0
    for bad, desc in [({"path": str(tmp_path / "s2"), "base": "x"}, "Parameter 'base' is "
                       "unexpected"), ({"path": "a\0b"}, "Parameter 'path' is missing or not "
                                       "a string"), ({"path": str(snap)}, f"snapshot {snap}: "
                                                     "already exists")]:
        assert qmp.cmd_raw("x-kvmpy-snapshot-save", bad)["error"]["desc"].startswith(desc)
    assert "Parameter 'now' is unexpected" in str(qmp.cmd_raw("cont", {"now": True}))
    assert qmp.get_events(wait=False) == []  # paused already: no STOP/RESUME around it
    qmp.cmd("cont")
    assert [e["event"] for e in qmp.get_events(wait=True)] == ["RESUME"]
    assert "CommandNotFound" in str(qmp.cmd_raw("no-such-command"))
    assert qmp.cmd("quit") == {}
    event = qmp.pull_event(wait=10)
    assert event["event"] == "SHUTDOWN" and event["data"] == {"guest": False,
                                                             "reason": "host-qmp-quit"}
    out, err = run.communicate(timeout=30)
    assert run.returncode == 0, err
    close(qmp)
    first = out.decode()
    # the snapshot: every line the first run printed up to the `stop`, then the restore's
    sock2 = tmp_path / "qmp2.sock"
    restored = subprocess.Popen([*KVMPY, "run", "--restore", str(snap), "--qmp",
                                 f"unix:{sock2}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    qmp = connect(sock2)
    assert qmp.cmd("query-status")["status"] in ("running", "shutdown")
    event = qmp.pull_event(wait=120)
    assert event["event"] == "SHUTDOWN" and event["data"]["reason"] == "guest-shutdown", event
    out2, err2 = restored.communicate(timeout=30)
    assert restored.returncode == 0, err2
    close(qmp)
    # what the restore printed is the rest of the whole count (it may begin inside a
    # line), and what comes before it is what the first run had printed at the `stop`
    whole = "".join(count_line(kind, n) + "\n" for n in range(0x801))
    text = out2.decode()
    assert len(text) > 100 and whole.endswith(text), text[:100]
    assert first.startswith(whole[: len(whole) - len(text)])


def test_a_save_that_fails_leaves_nothing_and_the_guest_runs_on(guest_dir: Path,
                                                                tmp_path: Path) -> None:
    """A file system that cannot hold the snapshot (here, a file-size limit: EFBIG, as a
    full disk gives ENOSPC): an error reply, no partial directory, and the guest (under
    the default seccomp filter, which the clean-up must fit) counts on to its end."""
    import resource

    sock, limit = tmp_path / "qmp.sock", 64 << 10
    guest = ["--flat", str(guest_dir / "counter_cpl3.bin"), "--mode", "long", "--cpl", "3"]
    run = subprocess.Popen([*KVMPY, "run", *guest, "--qmp", f"unix:{sock}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                                                 (limit, limit)))
    qmp = connect(sock)
    reply = qmp.cmd_raw("x-kvmpy-snapshot-save", {"path": str(tmp_path / "snap")})
    assert reply["error"]["desc"] == f"snapshot {tmp_path / 'snap'}: File too large", reply
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qmp.sock"]
    assert qmp.cmd("query-status")["status"] == "running"
    out, err = run.communicate(timeout=60)
    close(qmp)
    assert run.returncode == 0, err
    assert out.decode() == "".join(count_line("cpl3", n) + "\n" for n in range(0x801))


# -- KVM state -------------------------------------------------------------------------------------
COMPARED = ("regs", "sregs2", "xsave", "xcrs", "debugregs", "lapic", "events", "mp_state")


@pytest.mark.parametrize("compact", [False, True])  # (True: registers as bytes, migration's)
def test_vcpu_state_comes_back_byte_for_byte(guest_dir: Path, tmp_path: Path,
                                            compact: bool) -> None:
    config = counter(guest_dir, "real", tmp_path)
    first = Machine(config._replace(console=open(os.devnull, "wb")))
    try:
        first.start()
        time.sleep(0.2)
        first.pause()
        sections = first.capture_state(compact)
        assert isinstance(sections["vcpu0"]["regs"], str if compact else dict)
    finally:
        first.request_stop(first.stopped or _host_stop())
        first.close()
    second = Machine(config._replace(console=open(os.devnull, "wb")))
    try:
        for vcpu in second.vcpus:
            restore_vcpu(vcpu, sections[f"vcpu{vcpu.index}"], f"vcpu{vcpu.index}")
            again = capture_vcpu(vcpu, compact)
            for part in COMPARED:
                assert again[part] == sections[f"vcpu{vcpu.index}"][part], part
            saved_msrs = dict(map(tuple, sections[f"vcpu{vcpu.index}"]["msrs"]))
            for index, value in again["msrs"]:
                if index != 0x10:  # IA32_TSC moves on between the two reads
                    assert saved_msrs[index] == value, hex(index)
        assert sections["vcpu1"]["mp_state"] != sections["vcpu0"]["mp_state"]  # AP waits
    finally:
        second.close()


def _host_stop():  # type: ignore[no-untyped-def]
    from kvmpy.stop import Stop

    return Stop(StopKind.POWEROFF, "test over")


def saved_real_counter(guest_dir: Path, tmp_path: Path) -> Path:
    """A snapshot of the real-mode counter (irqchip, two vCPUs, a disk, rng) at count 2."""
    snap = tmp_path / "snap"
    with Guest.from_config(counter(guest_dir, "real", tmp_path)) as g:
        g.expect("count 0002\n", 60)
        g.snapshot(snap)
        g.stop()
    return snap


@pytest.mark.parametrize(("part", "value", "message"), [
    ("sregs2", {"cr0": 0x80000000}, "vcpu0.sregs: KVM refused it"),
    ("lapic", "AAAA", r"vcpu0.lapic: 3 bytes, expected 1024"),
    ("msrs", [[0xDEADBEEF, 1]], "MSR 0xdeadbeef is not one this KVM saves"),
    ("xsave", "AAAA", "xsave: 3 bytes; this host's XSAVE area is"),
    ("mp_state", 99, "vcpu0.mp_state: KVM refused it"),
    ("events", "A" * 88, "events: 66 bytes, expected 64"),
    ("regs", "AAAA", r"vcpu0.regs: 3 bytes, expected 144"),  # (the compact form)
])
def test_values_kvm_cannot_take_are_refused_in_one_line(guest_dir: Path, tmp_path: Path,
                                                         part: str, value: Any,
                                                         message: str) -> None:
    snap = saved_real_counter(guest_dir, tmp_path)
    sections = open_snapshot(snap).sections
    if part == "sregs2":
        sections["vcpu0"][part] = sections["vcpu0"][part] | value
    else:
        sections["vcpu0"][part] = value
    resign(snap, sections=sections)
    run = subprocess.run([*KVMPY, "run", "--restore", str(snap)], capture_output=True,
                         timeout=60)
    assert run.returncode == 2 and run.stdout == b""
    err = run.stderr.decode()
    assert re.search(message, err) and err.count("\n") == 1, err  # (no disk copy kept)


def test_another_device_set_or_cpuid_is_refused(guest_dir: Path, tmp_path: Path) -> None:
    snap = saved_real_counter(guest_dir, tmp_path)
    good = open_snapshot(snap).sections
    no_rng = {**good, "machine": good["machine"] | {"rng": False}}
    resign(snap, sections=no_rng)
    with pytest.raises(SnapshotError, match=r"virtio1 is not part of this machine \(another "
                       r"device set\)"):
        s = open_snapshot(snap)
        Machine(s.working_config()[0], snapshot=s)
    cpuid = [list(e) for e in good["vcpu0"]["cpuid"]]
    cpuid[1][5] ^= 1 << 5  # a feature bit this host did not give
    resign(snap, sections={**good, "vcpu0": good["vcpu0"] | {"cpuid": cpuid}})
    run = subprocess.run([*KVMPY, "run", "--restore", str(snap)], capture_output=True,
                         timeout=60)
    assert run.returncode == 2
    assert b"saw other CPUID than this host gives" in run.stderr, run.stderr


def test_guest_time_goes_on_from_where_it_stopped(guest_dir: Path, tmp_path: Path) -> None:
    """kvmclock is saved and put back: a pause or a long wait before the restore is not
    time the guest sees pass."""
    config = counter(guest_dir, "real", tmp_path)
    with Guest.from_config(config) as g:
        g.expect("count 0002\n", 60)
        g.pause()
        before = g.machine.vm.get_clock().clock
        time.sleep(1.0)
        g.resume()
        after = g.machine.vm.get_clock().clock
        g.snapshot(tmp_path / "snap")
        saved = open_snapshot(tmp_path / "snap").sections["vm"]["clock"]["ns"]
        g.stop()
    assert 0 <= after - before < 0.5e9  # the second of pause is not in guest time
    time.sleep(1.0)
    s = open_snapshot(tmp_path / "snap")
    config, _ = s.working_config()
    machine = Machine(config._replace(console=open(os.devnull, "wb")), snapshot=s)
    try:
        machine._before_run()
        now = machine.vm.get_clock().clock
        assert 0 <= now - saved < 0.5e9, (now, saved)
    finally:
        machine.close()


def test_a_network_device_keeps_its_mac_and_finds_its_tap_by_name(guest_dir: Path,
                                                                    tmp_path: Path) -> None:
    from kvmpy.machine import NetConfig
    from tests.lab.virtio_kit import netns

    snap = tmp_path / "snap"
    with netns("kvmpysnap"):
        config = counter(guest_dir, "cpl3", tmp_path)._replace(nets=[NetConfig()])
        with Guest.from_config(config) as g:  # a tap the kernel names, and a random MAC
            g.expect(count_line("cpl3", 3) + "\n", 60)
            net = g.machine.virtio[0][0].device
            tap, mac = net.backend.name, net.mac.hex(":")
            g.pause()  # the restores go on from the last whole line printed (or within the next)
            printed = g.output[:g.output.rindex("\n")].rsplit("\n", 1)[-1]
            after = int(printed.split()[-1], 16) + 2
            g.snapshot(snap)
            g.stop()
        saved = open_snapshot(snap).machine.nets[0]
        assert (saved.tap, saved.mac) == (tap, mac)
        with Guest.restore(snap, nets=[f"tap={tap}"]) as g:  # the same (the first has let go)
            net = g.machine.virtio[0][0].device
            assert (net.backend.name, net.mac.hex(":")) == (tap, mac)
            g.expect(count_line("cpl3", after) + "\n", 60)
        with Guest.restore(snap, nets=["tap=kvmpysnap1"]) as g:  # or another tap
            net = g.machine.virtio[0][0].device
            assert (net.backend.name, net.mac.hex(":")) == ("kvmpysnap1", mac)


# -- any hostile snapshot ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(guest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    snap = saved_real_counter(guest_dir, tmp_path_factory.mktemp("pristine"))
    return snap, open_snapshot(snap).sections


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_one_change_to_a_resigned_snapshot(pristine: tuple[Path, Any],
                                                tmp_path_factory: pytest.TempPathFactory,
                                                data: st.DataObject) -> None:
    """An attacker who re-signs what they edit: one value anywhere in the state (the
    machine, a vCPU's registers, a device's) replaced, dropped or added. The restore
    either runs (the guest may die of what it was given) or is refused in one line and
    keeps no copy of the disk; never a traceback."""
    snap, sections = pristine
    name = data.draw(st.sampled_from(sorted(sections)))  # (not by leaf: CPUID has hundreds)
    resign(snap, sections=sections | {name: mutate(data, sections[name])})
    tmp = tmp_path_factory.mktemp("restore")
    try:
        run = subprocess.run([*KVMPY, "run", "--restore", str(snap)], capture_output=True,
                             timeout=20, env=os.environ | {"TMPDIR": str(tmp)})
        rc, err = run.returncode, run.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired:  # it took the change and the guest runs on
        return
    assert "Traceback" not in err, err
    if rc in (1, 2, 3):  # refused: one line, and the disk copy it made removed
        assert err.startswith("kvmpy: ") and err.count("\n") == 1, err
        assert list(tmp.iterdir()) == [], err
