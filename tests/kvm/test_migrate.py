"""Live migration of flat guests on this machine's /dev/kvm (issue 20).

The guest (guests/tests/dirty_cpl3.S, CPL3 so KVM's dirty log sees its writes at
native speed) rewrites 4 MiB of RAM and checks the last tick's values every tick, and
prints a tick count: a page lost or sent stale on the way ends it with MISMATCH, and
the two processes' outputs together must count every tick exactly once. The source
is `kvmpy run --qmp`, driven with QEMU's own QMP client; the destination is `kvmpy
run --incoming`. Then the failures: a destination killed mid-stream, garbage either
way, a connection closed early, another machine, a cancel: the source's guest runs
on and the source says why; a destination given garbage says so in one line.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmpy.api import Guest
from kvmpy.machine import Machine
from kvmpy.migration import wire
from kvmpy.migration.destination import receive
from kvmpy.stop import StopKind
from tests.kvm.test_snapshot import LIMIT, assert_counts, counter
from tests.qmp_kit import close, connect

pytestmark = pytest.mark.kvm

KVMPY = [sys.executable, "-m", "kvmpy"]
TICKS = 0x1000
FINAL = ("completed", "failed", "cancelled")


def flat_args(guest_dir: Path, *extra: str) -> list[str]:
    return ["--flat", str(guest_dir / "dirty_cpl3.bin"), "--mode", "long", "--cpl", "3",
            *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*KVMPY, "run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def wait_status(qmp: Any, statuses: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = qmp.cmd("query-migrate")
        if info.get("status") in statuses:
            return dict(info)
        assert time.monotonic() < deadline, info
        time.sleep(0.02)


def ticks(text: str) -> list[int]:
    """The tick numbers of the complete lines (a run quit mid-line ends in part of one)."""
    return [int(n, 16) for n in re.findall(r"tick ([0-9a-f]{8})\n", text)]


@pytest.fixture
def source(guest_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Any]]:
    """The dirtying guest under `kvmpy run --qmp`, and a QMP client on it."""
    sock = tmp_path / "qmp.sock"
    run = start(flat_args(guest_dir, "--qmp", f"unix:{sock}"))
    qmp = connect(sock)
    yield run, qmp
    if run.poll() is None:
        run.kill()
    run.communicate(timeout=30)
    try:
        close(qmp)
    except Exception:  # noqa: BLE001  (a migrated source is gone, its socket with it)
        pass


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_a_flat_guest_migrates_and_counts_on_exactly(guest_dir: Path, tmp_path: Path,
                                                     source: Any, kind: str) -> None:
    src, qmp = source
    uri = f"unix:{tmp_path / 'mig.sock'}" if kind == "unix" else f"tcp:127.0.0.1:{free_port()}"
    dst = start(flat_args(guest_dir, "--incoming", uri))
    if kind == "tcp":  # a limit no round can meet: pre-copy ends at the round limit
        qmp.cmd("migrate-set-parameters", **{"downtime-limit": 1, "x-max-rounds": 4})
    time.sleep(0.3)  # (the guest has ticked a while)
    assert qmp.cmd("migrate", uri=uri) == {}
    out, err = src.communicate(timeout=60)  # (it may be over before a query-migrate)
    assert src.returncode == StopKind.MIGRATED.value, err
    assert f"kvmpy: migrated to {uri} (".encode() in err, err
    dout, derr = dst.communicate(timeout=120)
    assert dst.returncode == 0 and derr == b"", derr
    # every tick once, in order, across the two processes (a line may begin in one and
    # end in the other); no MISMATCH from the guest
    assert ticks(out.decode()) and dout, (out[-200:], dout[:200])
    seen = ticks((out + dout).decode())
    assert seen == list(range(1, TICKS + 1)), [n for n in seen if n not in range(1, TICKS + 1)]
    if kind == "tcp":  # (a round that found little dirty may end it sooner)
        rounds = int(re.search(rb"\((\d+) rounds, ", err).group(1))  # type: ignore[union-attr]
        assert 1 <= rounds <= 4, err


def test_guest_migrate_moves_devices_irqchip_and_two_vcpus(guest_dir: Path, tmp_path: Path
                                                           ) -> None:
    """Guest.migrate from the API to a destination in this process: the real-mode
    counter with the in-kernel irqchip, two vCPUs, a disk and virtio-rng counts on."""
    from kvmpy.console import ConsoleOutput

    config = counter(guest_dir, "real", tmp_path)
    uri = f"unix:{tmp_path / 'mig.sock'}"
    out = ConsoleOutput()
    dest = Machine(config._replace(console=out), incoming=True)
    received: list[Any] = []
    thread = threading.Thread(target=lambda: received.append(
        receive(dest, wire.parse_address(uri))))
    thread.start()
    try:
        with Guest.from_config(config) as g:
            g.expect("count 0008\n", 60)
            g.snapshot(tmp_path / "snap")  # (its incremental-snapshot tracker gives way)
            info = g.migrate(uri)
            assert info["status"] == "completed" and info["downtime"] > 0, info
            steps = info["x-pause-phases"]  # each step of the pause, in order, timed
            assert list(steps) == ["pause", "paused", "taken", "pages-sent", "captured",
                                   "encoded", "state-sent", "answer"], steps
            assert steps["answer"] <= info["downtime"] + 1 and sorted(steps.values()) == \
                list(steps.values()), steps
            assert g.machine.stopped is not None
            assert g.machine.stopped.kind is StopKind.MIGRATED
            before = g.output
        thread.join(30)
        assert received and received[0].pages > 0
        dest.start()
        stop = dest.wait(120)
        assert stop is not None and stop.exit_status == 0, stop
        assert_counts("real", before + out.text)
    finally:
        dest.close()
    assert f"count {LIMIT:04x}" not in before  # it moved before it was done


def test_guest_time_keeps_to_the_host_across_a_migration(guest_dir: Path, tmp_path: Path
                                                          ) -> None:
    check_guest_time_across_migration(guest_dir, tmp_path, tsc_required=False)


def check_guest_time_across_migration(guest_dir: Path, tmp_path: Path,
                                      tsc_required: bool) -> None:
    """A migration's state goes on by the host time between its capture and the
    destination's run: kvmclock and every vCPU's TSC (so a timer the guest armed fires
    when the host's time says, and a pause does not lengthen a sleep). A snapshot's
    does not (test_snapshot.test_guest_time_goes_on_from_where_it_stopped). The TSC is
    checked where KVM takes a TSC written (the lab's KVM: tests/lab/test_migrate_linux.py
    requires it); this machine's PVM keeps every vCPU's TSC at the host's own."""
    from kvmpy.kvm.state import MSR_IA32_TSC

    with open(os.devnull, "wb") as sink:
        config = counter(guest_dir, "real", tmp_path)._replace(console=sink)
        with Guest.from_config(config) as g:
            g.expect("count 0002\n", 60)
            g.pause()
            up = g.machine.vcpus[0].get_tsc_khz() * 1000 * 1000  # a guest up 1000 s: KVM
            # takes a TSC written within a second of its own count as one to match, not set
            for vcpu in g.machine.vcpus:
                vcpu.set_msrs_upto([(MSR_IA32_TSC, up)])
            tsc_taken = g.machine.vcpus[0].get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC] - up < up // 1000
            sections = g.machine.capture_state(live=True)
            captured = time.monotonic()
        assert tsc_taken or not tsc_required, "this KVM did not take a vCPU's TSC written"
        saved_ns = sections["vm"]["clock"]["ns"]
        saved_tsc = [dict(map(tuple, sections[f"vcpu{i}"]["msrs"]))[MSR_IA32_TSC]
                     for i in range(config.cpus)]
        time.sleep(0.5)
        for live in (True, False):
            dest = Machine(config, incoming=True)
            try:
                dest.restore_state(sections, live=live)
                dest._before_run()  # (kvmclock: just before the vCPUs run)
                elapsed = (time.monotonic() - captured) * 1e9
                ns = dest.vm.get_clock().clock - saved_ns
                khz = dest.vcpus[0].get_tsc_khz()
                tsc_ns = [(v.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC] - saved) * 1_000_000 // khz
                          for v, saved in zip(dest.vcpus, saved_tsc, strict=True)]
            finally:
                dest.close()
            on = (0.5e9, elapsed + 0.1e9) if live else (0, 0.3e9)  # (the time between, or none)
            assert on[0] <= ns <= on[1], (live, ns, elapsed)
            if tsc_taken:
                assert all(on[0] <= t <= on[1] for t in tsc_ns), (live, tsc_ns, elapsed)


# -- failures -------------------------------------------------------------------------------
def test_destination_killed_mid_stream_the_source_runs_on(guest_dir: Path, tmp_path: Path,
                                                          source: Any) -> None:
    src, qmp = source
    uri = f"unix:{tmp_path / 'mig.sock'}"
    dst = start(flat_args(guest_dir, "--incoming", uri))
    qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 20})  # a slow link
    qmp.cmd("migrate", uri=uri)
    info = wait_status(qmp, ("active",))
    deadline = time.monotonic() + 30
    while info["ram"]["transferred"] < 256 << 10:
        assert time.monotonic() < deadline, info
        info = wait_status(qmp, ("active",))
    dst.send_signal(signal.SIGKILL)
    dst.communicate(timeout=30)
    failed = wait_status(qmp, FINAL)
    assert failed["status"] == "failed", failed
    assert "connection" in failed["error-desc"], failed
    assert_runs_on(src, qmp)


def assert_runs_on(src: subprocess.Popen[bytes], qmp: Any) -> None:
    """The source's guest still runs and still ticks, every tick once (it ends itself
    at its last tick, or is quit)."""
    assert qmp.cmd("query-status")["status"] in ("running", "shutdown")
    if src.poll() is None:
        time.sleep(0.2)
        qmp.cmd("quit")
    out, err = src.communicate(timeout=60)
    seen = ticks(out.decode())
    assert b"MISMATCH" not in out and seen == list(range(1, len(seen) + 1)), out[-300:]
    assert b"failed" in err or b"cancelled" in err, err  # said why, on stderr too
    assert b"the guest runs on here" in err, err


def fake_destination(where: Path, answer: bytes) -> threading.Thread:
    """A 'destination' that reads the source's hello, sends `answer`, and closes."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(where))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            wire.recv_hello(conn)
            conn.sendall(answer)
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("answer", "message"), [
    (os.urandom(64), "does not speak kvmpy's migration stream"),
    (b"", "closed the connection inside its hello"),
    (b"KVMPYMIG" + struct.pack("<I", 99), "stream version 99"),
    (b"KVMPYMIG" + struct.pack("<II", 1, 5) + b"[1,2]", "not a JSON object"),
])
def test_a_bad_or_vanishing_destination_leaves_the_guest_running(
        tmp_path: Path, source: Any, answer: bytes, message: str) -> None:
    src, qmp = source
    where = tmp_path / "fake.sock"
    fake_destination(where, answer)
    qmp.cmd("migrate", uri=f"unix:{where}")
    failed = wait_status(qmp, FINAL)
    assert failed["status"] == "failed" and re.search(message, failed["error-desc"]), failed
    assert_runs_on(src, qmp)


def test_another_machine_is_refused_before_any_page_moves(guest_dir: Path, tmp_path: Path,
                                                          source: Any) -> None:
    src, qmp = source
    uri = f"unix:{tmp_path / 'mig.sock'}"
    dst = start(flat_args(guest_dir, "--mem", "64M", "--incoming", uri))
    qmp.cmd("migrate", uri=uri)
    failed = wait_status(qmp, FINAL)
    assert failed["status"] == "failed", failed
    assert "the machines differ in mem_size" in failed["error-desc"], failed
    assert failed["ram"]["normal"] == 0  # no page moved
    _, derr = dst.communicate(timeout=30)
    lines = derr.decode().splitlines()
    assert dst.returncode != 0 and len(lines) == 1, derr
    assert lines[0].startswith("kvmpy: incoming migration: refused") and "mem_size" in lines[0]
    assert_runs_on(src, qmp)


def test_migrate_cancel_keeps_the_guest(guest_dir: Path, tmp_path: Path, source: Any) -> None:
    src, qmp = source
    uri = f"unix:{tmp_path / 'mig.sock'}"
    dst = start(flat_args(guest_dir, "--incoming", uri))
    qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 20})
    qmp.cmd("migrate", uri=uri)
    wait_status(qmp, ("active",))
    assert "already in progress" in str(qmp.cmd_raw("migrate", {"uri": uri}))
    assert "migrate_cancel" in str(qmp.cmd_raw("stop"))  # no pausing under a migration
    qmp.cmd("migrate_cancel")
    assert wait_status(qmp, FINAL)["status"] == "cancelled"
    events: list[str] = []
    while "cancelled" not in events:  # (the event follows the status by a moment)
        events += [e["data"]["status"] for e in qmp.get_events(wait=10)
                   if e["event"] == "MIGRATION"]
    assert events == ["setup", "active", "cancelled"], events
    _, derr = dst.communicate(timeout=30)
    assert dst.returncode != 0 and len(derr.decode().splitlines()) == 1, derr
    assert_runs_on(src, qmp)


@pytest.mark.parametrize(("feed", "message"), [
    (os.urandom(4096), "does not speak kvmpy's migration stream"),
    (b"KVMPYMIG", "closed the connection"),
    ("hello-then-garbage", "record of unknown kind"),
    ("hello-then-wild-pages", "not guest RAM here"),
    ("hello-then-bad-state", "the state"),
])
def test_a_destination_fed_garbage_says_so_in_one_line(guest_dir: Path, tmp_path: Path,
                                                       feed: Any, message: str) -> None:
    where = tmp_path / "mig.sock"
    dst = start(flat_args(guest_dir, "--incoming", f"unix:{where}"))
    conn = wire.connect(wire.parse_address(f"unix:{where}"), 30)
    with conn:
        if isinstance(feed, bytes):
            conn.sendall(feed)
        else:  # a true hello (the destination's own identity), then the garbage
            conn.settimeout(30)
            ident = identity_of(guest_dir)
            wire.send_hello(conn, {"kvmpy": "test", "machine": ident})
            assert wire.recv_hello(conn)["ok"] is True
            if feed == "hello-then-garbage":
                conn.sendall(b"\x77" * 64)
            elif feed == "hello-then-wild-pages":
                conn.sendall(wire.RECORD.pack(wire.PAGES, 1, 1 << 40))
            else:
                junk = b"KVMPYSTA" + os.urandom(100)
                conn.sendall(wire.RECORD.pack(wire.STATE, len(junk), 0) + junk +
                             wire.RECORD.pack(wire.END, 0, 0))
    out, err = dst.communicate(timeout=30)
    lines = err.decode().splitlines()
    assert dst.returncode != 0 and out == b"", (out, err)
    assert len(lines) == 1 and lines[0].startswith("kvmpy: incoming migration: "), err
    assert message in lines[0], lines[0]


def identity_of(guest_dir: Path) -> dict[str, Any]:
    """The identity a `kvmpy run` of the dirtying guest gives (built here, not run)."""
    from kvmpy import options
    from kvmpy.migration.agree import identity

    machine = Machine(options.flat_machine(guest_dir / "dirty_cpl3.bin", mode="long", cpl=3),
                      incoming=True)
    try:
        return identity(machine)
    finally:
        machine.close()


def test_a_destination_that_takes_everything_and_closes_without_running_it(
        tmp_path: Path, source: Any) -> None:
    """The handover: the whole stream arrives, END too, but the connection closes
    without "running". The guest did not run there, so it must run on here."""
    src, qmp = source
    where = tmp_path / "fake.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(where))
    server.listen(1)
    ended = threading.Event()

    def swallow() -> None:
        conn, _ = server.accept()
        with conn:
            hello = wire.recv_hello(conn)
            wire.send_hello(conn, {"machine": hello["machine"], "ok": True})
            while True:
                kind, count, _ = wire.RECORD.unpack(wire.recv_exactly(conn, wire.RECORD.size,
                                                                      "a record"))
                size = {wire.PAGES: count * wire.PAGE, wire.STATE: count}.get(kind, 0)
                while size:
                    size -= len(conn.recv(min(size, 1 << 20)))
                if kind == wire.END:
                    ended.set()
                    return  # closed, no answer
        server.close()

    threading.Thread(target=swallow, daemon=True).start()
    qmp.cmd("migrate", uri=f"unix:{where}")
    failed = wait_status(qmp, FINAL)
    assert ended.is_set() and failed["status"] == "failed", failed
    assert "closed the connection inside the destination's answer" in failed["error-desc"]
    assert qmp.cmd("query-status")["status"] in ("running", "shutdown")
    assert_runs_on(src, qmp)
