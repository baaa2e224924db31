"""kvmpy confined (kvmpy.isolation), seen from a guest that asks the test device to try
an escape (kvmpy/isolation/escape.py, guests/tests/escape.S) on this machine's /dev/kvm."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm

ALL = "execve,open,socket,ptrace"


def escape(guest_dir: Path, calls: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KVMPY_TEST_ESCAPE": calls}
    env.pop("KVMPY_SECCOMP", None)
    return subprocess.run([sys.executable, "-m", "kvmpy", "run", "--flat",
                           str(guest_dir / "escape.bin"), "--mode", "long", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_unconfined_every_call_goes_through(guest_dir: Path) -> None:
    r = escape(guest_dir, ALL, "--seccomp", "off")
    assert r.returncode == 0, r.stderr
    # root reads /etc/shadow; anyone else gets EACCES from the file's mode, not from us
    expected_open = "ok" if os.geteuid() == 0 else "EACCES"
    assert r.stdout == f"execve: ENOENT\nopen: {expected_open}\nsocket: ok\nptrace: ESRCH\n"


def on_vcpu_thread(tmp_path: Path) -> list[str]:
    """A single vCPU runs on the main thread (the union of the lists), unless a QMP
    server may pause it: then on its own thread, held to the vCPU list."""
    return ["--qmp", f"unix:{tmp_path / 'qmp.sock'}"]


@pytest.mark.parametrize("thread", ["main", "vcpu0"])
@pytest.mark.parametrize("call,number", [("execve", 59), ("socket", 41), ("ptrace", 101)])
def test_kill_by_default_names_the_call(guest_dir: Path, tmp_path: Path, call: str,
                                        number: int, thread: str) -> None:
    """SIGSYS, one line naming the call and the thread, no report reaches the guest."""
    where = on_vcpu_thread(tmp_path) if thread == "vcpu0" else []
    r = escape(guest_dir, f"open,{call}", *where)
    assert r.returncode == -signal.SIGSYS, (r.returncode, r.stderr)
    assert r.stdout == ""
    assert r.stderr == (f"kvmpy: seccomp: the {thread} thread called {call} ({number}), "
                        "which its allow-list denies: killed by SIGSYS\n")


def test_log_lets_the_calls_through_and_the_kernel_logs_them(guest_dir: Path,
                                                             tmp_path: Path) -> None:
    r = escape(guest_dir, "execve,socket", "--seccomp", "log", *on_vcpu_thread(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "execve: ENOENT\nsocket: ok\n"
    log = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout
    denied = re.findall(r'type=1326 .* comm="kvmpy-vcpu0" .* syscall=(\d+) ', log)
    assert {"59", "41"} <= set(denied)


def test_a_normal_run_is_not_killed(guest_dir: Path, tmp_path: Path) -> None:
    """The default (kill) through a whole run on a vCPU thread, with a QMP server, to
    the end of the process."""
    r = subprocess.run([sys.executable, "-m", "kvmpy", "run", "--flat",
                        str(guest_dir / "mmio_echo.bin"), "--mode", "long", "--stats",
                        *on_vcpu_thread(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "mmio ok\n"


def landlock_abi() -> int:
    from kvmpy.isolation.landlock import abi

    return abi()


@pytest.mark.skipif(landlock_abi() == 0, reason="this kernel has no Landlock (5.13+, "
                    "landlock in lsm=)")
def test_landlock_open_outside_the_given_files_fails_with_eacces(guest_dir: Path) -> None:
    r = escape(guest_dir, "open,socket", "--seccomp", "off", "--landlock", "on")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "open: EACCES\nsocket: ok\n"  # (seccomp's to stop, not Landlock's)


NOBODY = "65534"


@pytest.mark.skipif(os.geteuid() != 0, reason="--jail needs root")
def test_in_the_jail_root_holds_only_the_vms_files_and_kvmpy_is_unprivileged(
        guest_dir: Path, tmp_path: Path) -> None:
    image = (guest_dir / "escape.bin").resolve()
    r = escape(guest_dir, "look,open", "--jail", str(tmp_path / "jail"), "--uid", NOBODY,
               "--gid", NOBODY)
    assert r.returncode == 0, r.stderr
    # (besides the interpreter's read-only trees: kvmpy.isolation.jail.runtime_paths)
    assert r.stdout == (f"look: uid {NOBODY} gid {NOBODY} files /dev/kvm {image}\n"
                        "open: ENOENT\n")
    assert list((tmp_path / "jail").iterdir()) == []  # the jail's root was its own tmpfs


@pytest.mark.skipif(os.geteuid() != 0, reason="--jail needs root")
def test_seccomp_in_the_jail_names_the_call(guest_dir: Path, tmp_path: Path) -> None:
    """kvmpy is PID 1 of its namespace there, which cannot kill itself with a signal:
    it exits with 128 + SIGSYS instead, and the parent outside passes that on."""
    r = escape(guest_dir, "ptrace", "--jail", str(tmp_path / "jail"), "--uid", NOBODY,
               "--gid", NOBODY)
    assert r.returncode == 128 + signal.SIGSYS
    assert r.stderr.endswith("kvmpy: seccomp: the main thread called ptrace (101), which "
                             "its allow-list denies: killed by SIGSYS\n")


@pytest.mark.parametrize("args,message", [
    (["--jail", "J"], "--jail: give --uid and --gid"),
    (["--jail", "J", "--uid", "0", "--gid", "0"], "--jail: --uid and --gid must not be 0"),
    (["--uid", "1000"], "--uid, --gid: with --jail"),
    (["--landlock-rw", "/tmp"], "--landlock-rw: with --landlock on"),
])
def test_isolation_options_refused_in_one_line(guest_dir: Path, tmp_path: Path,
                                               args: list[str], message: str) -> None:
    args = [str(tmp_path / "jail") if a == "J" else a for a in args]
    r = escape(guest_dir, "open", *args)
    assert r.returncode != 0
    assert r.stdout == ""
    assert r.stderr.startswith(f"kvmpy: {message}") and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("landlock", [[], ["--landlock", "on", "--landlock-rw", "{tmp}"]],
                         ids=["seccomp", "seccomp+landlock"])
def test_a_snapshot_with_a_disk_over_qmp_is_not_killed(guest_dir: Path, tmp_path: Path,
                                                       landlock: list[str]) -> None:
    """Saving writes RAM, device state and a copy of the disk (FICLONE, or
    copy_file_range) from the QMP thread, all after set-up: on the lists (and, with
    Landlock, in the directory given for it)."""
    from tests.qmp_kit import close, connect

    disk, sock, snap = tmp_path / "disk.img", tmp_path / "qmp.sock", tmp_path / "snap"
    disk.write_bytes(os.urandom(1 << 20))
    run = subprocess.Popen(
        [sys.executable, "-m", "kvmpy", "run", "--flat", str(guest_dir / "counter_cpl3.bin"),
         "--mode", "long", "--cpl", "3", "--disk", str(disk), "--qmp", f"unix:{sock}",
         *(a.replace("{tmp}", str(tmp_path)) for a in landlock)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        qmp = connect(sock)
        qmp.cmd("stop")
        reply = qmp.cmd("x-kvmpy-snapshot-save", path=str(snap))
        assert reply["path"] == str(snap)
        qmp.cmd("cont")
        assert qmp.cmd("quit") == {}
        _, err = run.communicate(timeout=30)
        close(qmp)
    finally:
        run.kill()
    assert run.returncode == 0, err
    assert (snap / "disk0.img").read_bytes() == disk.read_bytes()
