"""kvmpy sandbox's parts that need no VM: its init, its job directory, its status line.

The whole sandbox (a boot, a command, its status) is tests/lab/test_sandbox_commands.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kvmpy.errors import ConfigError
from kvmpy.initramfs import read_newc
from kvmpy.machine import ShareConfig
from kvmpy.sandbox import SANDBOX_INIT, StatusChannel, sandbox_initrd, write_job


def test_the_init_is_valid_sh() -> None:
    sh = shutil.which("busybox")
    assert sh is not None
    done = subprocess.run([sh, "sh", "-n", "-c", SANDBOX_INIT], capture_output=True)
    assert done.returncode == 0, done.stderr


def test_the_initrd_is_built_once_and_holds_the_init(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMPY_CACHE", str(tmp_path))
    first = sandbox_initrd()
    assert first.parent == tmp_path / "initramfs" and first.suffix == ".cpio"
    mtime = first.stat().st_mtime_ns
    assert sandbox_initrd() == first and first.stat().st_mtime_ns == mtime  # cached
    entries = {e.name: e for e in read_newc(first.read_bytes())}
    assert entries["init"].data.decode() == SANDBOX_INIT
    assert "bin/busybox" in entries and "dev/console" in entries


def test_the_job_directory(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    outer, inner = tmp_path / "a", tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    shares = [ShareConfig(inner, "inner", True), ShareConfig(outer, "outer")]
    ordered = write_job(job, ["printf", "%s\\n", "it's"], cwd=str(tmp_path),
                        env={"A": "1", "WEIRD": "x y'z"}, shares=shares)
    assert [s.tag for s in ordered] == ["outer", "inner"]  # parents first
    assert (job / "shares").read_text() == f"outer rw {outer}\ninner ro {inner}\n"
    done = subprocess.run(["sh", str(job / "cmd.sh")], capture_output=True, text=True)
    assert done.stdout == "it's\n", (job / "cmd.sh").read_text()
    write_job(job, ["env"], cwd=str(tmp_path), env={"A": "1", "WEIRD": "x y'z"})
    env = subprocess.run(["sh", str(job / "cmd.sh")], capture_output=True, text=True)
    assert sorted(env.stdout.splitlines()) == ["A=1", "KVMPY_IN_SANDBOX=1", "WEIRD=x y'z"]
    write_job(job, ["pwd"], cwd=str(tmp_path / "missing"))
    done = subprocess.run(["sh", str(job / "cmd.sh")], capture_output=True, text=True)
    assert done.returncode == 125 and "kvmpy sandbox: cannot enter" in done.stderr


def test_a_job_directory_with_a_space_is_refused(tmp_path: Path) -> None:
    job = tmp_path / "with space"
    job.mkdir()
    with pytest.raises(ConfigError, match="space"):
        write_job(job, ["true"])


def test_the_status_line() -> None:
    ends = []
    channel = StatusChannel()
    channel.on_done = lambda: ends.append(True)
    channel.feed(b"noise\r\nstat")
    assert channel.status is None and not ends
    channel.feed(b"us 42\r\nstatus 3\n")
    assert channel.status == 42 and ends == [True]  # the first line ends the run
    failed = StatusChannel()
    failed.feed(b"error: cannot mount the host's root over 9p\n")
    assert failed.error == "cannot mount the host's root over 9p" and failed.status is None
