"""--share and --vsock, for `kvmpy run` and `kvmpy sandbox`: bad ones are one line and a
non-zero status before anything is built (and before "cannot boot Linux here")."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.boot.synthetic import make_bzimage
from kvmpy.checks import check_config
from kvmpy.errors import ConfigError
from kvmpy.machine import LinuxConfig, MachineConfig, ShareConfig, VsockConfig
from kvmpy.options import linux_machine, share_config, vsock_config


def kvmpy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmpy", *args], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "bzImage").write_bytes(make_bzimage())
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    return {p.name: str(p) for p in tmp_path.iterdir()} | {"tmp": str(tmp_path)}


CASES = [
    (["--share", "{dir}"], "give the tag the guest mounts it by"),
    (["--share", "{dir},tag=a b"], "9p tag 'a b': 1 to 31 characters"),
    (["--share", "{dir},tag=" + "t" * 32], "1 to 31 characters"),
    (["--share", "{dir},tag=t,rw"], "unknown option 'rw'"),
    (["--share", "{file},tag=t"], "not a directory"),
    (["--share", "/nonexistent,tag=t"], "/nonexistent: not a directory"),
    (["--share", "{dir},tag=t", "--share", "{tmp},tag=t"], "tag 't' given twice"),
    (["--vsock", "3"], "use CID,uds=PATH"),
    (["--vsock", "2,uds={tmp}/v.sock"], "vsock CID 2: must be 3"),
    (["--vsock", "4294967295,uds={tmp}/v.sock"], "must be 3..4294967294"),
    (["--vsock", "3,uds=/nonexistent/v.sock"], "/nonexistent is not a directory"),
    (["--vsock", "3,uds={file}"], "exists and is not a socket"),
    (["--vsock", "3,uds={tmp}/" + "x" * 100], "must fit in 107 bytes"),
]


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(a)[:50] for a, _ in CASES])
@pytest.mark.parametrize("command", ["run", "sandbox"])
def test_bad_share_and_vsock_options_are_one_line(command: str, args: list[str], message: str,
                                                  files: dict[str, str]) -> None:
    if command == "sandbox" and "give the tag" in message:
        args, message = ["--share", "{dir},tag=bad tag"], "9p tag 'bad tag'"
    args = [a.format(**files) for a in args]
    tail = ["--kernel", files["bzImage"]] if command == "run" else ["--", "true"]
    r = kvmpy(command, *args, *tail)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmpy: "), r.stderr
    assert message.format(**files) in lines[0], lines[0]


def test_too_many_shares_for_the_virtio_slots(files: dict[str, str]) -> None:
    shares = [a for i in range(19) for a in ("--share", f"{files['dir']},tag=t{i}")]
    r = kvmpy("run", *shares, "--kernel", files["bzImage"])
    assert r.returncode == 2 and "19 virtio devices asked for" in r.stderr, r.stderr


def test_share_and_vsock_syntax(files: dict[str, str], tmp_path: Path) -> None:
    assert share_config(f"{tmp_path},tag=src,ro") == ShareConfig(tmp_path, "src", True)
    assert share_config(f"{tmp_path}", default_tag="x") == ShareConfig(tmp_path, "x", False)
    assert vsock_config(f"7,uds={tmp_path}/v") == VsockConfig(7, tmp_path / "v")
    # the API takes the same strings as the command line
    config = linux_machine(files["bzImage"], shares=[f"{tmp_path},tag=t"],
                           vsock=f"9,uds={tmp_path}/v")
    assert config.shares == [ShareConfig(tmp_path, "t")] and config.vsock == VsockConfig(
        9, tmp_path / "v")


def test_the_api_gets_the_same_checks(files: dict[str, str], tmp_path: Path) -> None:
    linux = LinuxConfig(kernel=Path(files["bzImage"]))
    with pytest.raises(ConfigError, match="not a directory"):
        check_config(MachineConfig(linux=linux, shares=[ShareConfig(Path(files["file"]), "t")]))
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "live.sock"))
    check_config(MachineConfig(linux=linux, vsock=VsockConfig(3, tmp_path / "live.sock")))
    with pytest.raises(ConfigError, match="must be 3"):
        check_config(MachineConfig(linux=linux, vsock=VsockConfig(1, tmp_path / "v.sock")))
    live.close()


def test_sandbox_refuses_its_own_tag(files: dict[str, str]) -> None:
    r = kvmpy("sandbox", "--share", f"{files['dir']},tag=kvmpyroot", "--", "true")
    assert r.returncode == 2 and "the sandbox's own" in r.stderr
    r = kvmpy("sandbox", "--")
    assert r.returncode == 2 and "give a command after --" in r.stderr
