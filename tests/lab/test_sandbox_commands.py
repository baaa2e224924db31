"""`kvmpy sandbox` where Linux boots: exit status, output streams, cwd, env, shares.

Each test is one `python -m kvmpy sandbox` process (a boot each), checking several
things per boot. tests/lab/test_sandbox_from_host.py runs it from a machine whose
/dev/kvm cannot boot Linux, through the lab.

Marked `lab`: runs where /dev/kvm boots Linux, else inside the one lab session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]


def sandbox(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "kvmpy", "sandbox", *args], cwd=cwd,
                          env=env, capture_output=True, timeout=timeout)


def test_the_exit_status_is_the_commands() -> None:
    done = sandbox("--", "sh", "-c", "exit 7")
    assert done.returncode == 7, done.stderr.decode()
    assert done.stdout == b""


def test_python3_prints_2() -> None:
    done = sandbox("--", "python3", "-c", "print(1+1)")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"2\n"


def test_streams_cwd_env_shares_and_a_status_the_command_cannot_fake(tmp_path: Path) -> None:
    out, data = tmp_path / "out", tmp_path / "in"
    out.mkdir()
    data.mkdir()
    (data / "input").write_text("from the host\n")
    script = (
        "echo out-line; echo err-line >&2; pwd; echo \"$KVMPY_TEST_VALUE\"\n"
        "printf 'a\\nb\\r\\n\\0binary' > out/bytes\n"
        "echo written-in-the-guest > out/result\n"
        "echo lost > scratch\n"  # outside the shares: the overlay, thrown away
        "cat in/input\n"
        "echo x >> in/input || echo refused-read-only\n"
        "echo 'status 0'; echo 'error: not really' >&2\n"  # the command's own 'status'
        "exit 3\n")
    env = dict(os.environ, KVMPY_TEST_VALUE="it's a \"value\" with $ and \\")
    done = sandbox("--share", str(out), "--share", f"{data},ro", "--", "sh", "-c", script,
                   cwd=tmp_path, env=env)
    assert done.returncode == 3, done.stderr.decode()
    assert done.stdout.decode().splitlines() == [
        "out-line", str(tmp_path), env["KVMPY_TEST_VALUE"], "from the host",
        "refused-read-only", "status 0"]
    assert b"\r" not in done.stdout  # hvc0 in raw mode: no \n -> \r\n
    assert done.stderr.decode().splitlines()[0] == "err-line"
    assert "error: not really" in done.stderr.decode()
    assert "Read-only file system" in done.stderr.decode()
    assert (out / "result").read_text() == "written-in-the-guest\n"
    assert (out / "bytes").read_bytes() == b"a\nb\r\n\0binary"  # no tty translation
    assert not (tmp_path / "scratch").exists()
    assert (data / "input").read_text() == "from the host\n"


def test_bad_options_fail_before_anything_boots(tmp_path: Path) -> None:
    for args, message in ((["--share", str(tmp_path / "missing"), "--", "true"], "not a dir"),
                          (["--vsock", "2,uds=/tmp/x.sock", "--", "true"], "CID 2"),
                          (["--"], "give a command")):
        done = sandbox(*args, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr.decode() and b"Traceback" not in done.stderr
