"""`kvmpy lab` itself, driven from the host: exit status, /dev/kvm, cwd, env and --rw.

Marked `labhost`: each test boots the lab (seconds each), so there are only a few,
and they check several things per boot. Not run inside the lab (no lab within the lab).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.labhost

ROOT = Path(__file__).resolve().parents[2]


def kvmpy_lab(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmpy.lab.command", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def test_failing_command_fails_kvmpy_lab_with_its_status() -> None:
    done = kvmpy_lab("--", "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3")
    assert done.returncode == 3, done.stderr
    assert done.stdout == "to-stdout\n"
    assert done.stderr == "to-stderr\n"


def test_dev_kvm_cwd_env_and_rw_share(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    env = dict(os.environ, KVMPY_TEST_VALUE="it's a \"value\"\nwith a newline")
    script = (
        "import os, pathlib\n"
        "print(os.path.exists('/dev/kvm'))\n"
        "print(os.getcwd())\n"
        "print(repr(os.environ['KVMPY_TEST_VALUE']))\n"
        f"pathlib.Path({str(shared / 'result')!r}).write_text('from the lab')\n"
        # outside --rw: writable, but thrown away
        f"pathlib.Path({str(tmp_path / 'scratch')!r}).write_text('lost')\n"
        "pathlib.Path(os.environ['HOME'], '.kvmpy-lab-test').write_text('x')\n"
        # kvmpy.lab.static_keys: one process holds a VM with a LAPIC and one without
        "vms = [os.readlink(f'/proc/{p}/fd/{fd}') for p in os.listdir('/proc')\n"
        "       if p.isdigit() and p != str(os.getpid())  # this script names it too\n"
        "       and b'kvmpy.lab.static_keys' in pathlib.Path(f'/proc/{p}/cmdline').read_bytes()\n"
        "       for fd in os.listdir(f'/proc/{p}/fd')]\n"
        "print(vms.count('anon_inode:kvm-vm'))\n"
    )
    done = kvmpy_lab("--rw", str(shared), "--", sys.executable, "-c", script, cwd=tmp_path,
                     env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "True", str(tmp_path), repr(env["KVMPY_TEST_VALUE"]), "2"]
    assert (shared / "result").read_text() == "from the lab"
    assert not (tmp_path / "scratch").exists()
    assert not Path(os.environ["HOME"], ".kvmpy-lab-test").exists()


def test_a_lab_whose_heartbeat_stops_is_a_stall_noticed_in_seconds() -> None:
    """The lab's heartbeat loops are stopped from inside (SIGSTOP), as a stalled lab's
    CPUs would stop them: the host says so within its timeout and shows the CPUs."""
    from kvmpy.lab.runner import LabStalled, LabStats, run_in_lab

    stop_heartbeat = ("for p in /proc/[0-9]*; do grep -qs beat.fifo $p/cmdline "
                      "&& kill -STOP ${p#/proc/}; done; echo stopped; sleep 600")
    stats = LabStats()
    with pytest.raises(LabStalled) as e:
        # two lab CPUs (the default is one): the report names each
        run_in_lab(["sh", "-c", stop_heartbeat], cpus=2, heartbeat_timeout=5, timeout=300,
                   stats=stats)
    message = str(e.value)
    assert re.match(r"the lab stalled: lab CPU [01] sent no heartbeat for [56] s; "
                    r"the lab's CPUs: cpu0 rip=", message), message
    assert "cpu1 rip=" in e.value.cpus
    # the lab kernel's symbols name where its CPUs were (idle, most likely)
    assert re.search(r"rip=ffffffff[0-9a-f]{8} \(\S+\+0x[0-9a-f]+\) cpl=0", message), message
    assert stats.boot_s is not None and 5 <= stats.lab_s - stats.boot_s < 240
