"""Bad options end in one line and a non-zero status, before any VM exists (kvmpy.checks).

Each case runs `python -m kvmpy run ...` as a user would and needs no /dev/kvm: every
one of them must be refused before kvmpy opens it, on any machine. The Linux cases use
a synthetic bzImage (kvmpy.boot.synthetic), so they are checked on this machine, whose
/dev/kvm could never boot them, ahead of "cannot boot Linux here".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.boot.synthetic import make_bzimage
from kvmpy.checks import check_config, host_ram
from kvmpy.errors import ConfigError
from kvmpy.machine import DiskConfig, FlatConfig, LinuxConfig, MachineConfig, NetConfig


def kvmpy(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmpy", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "guest").write_bytes(b"\xf4")
    (tmp_path / "bzImage").write_bytes(make_bzimage())
    (tmp_path / "initrd").write_bytes(b"070701" + bytes(200))
    (tmp_path / "disk").write_bytes(bytes(1 << 20))
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "text").write_text("#!/bin/sh\necho not a kernel\n")
    os.mkfifo(tmp_path / "fifo")
    return {p.name: str(p) for p in tmp_path.iterdir()}


CASES = [
    # guest RAM: bounded by the host, named in the message
    (["--flat", "{guest}", "--mem", "4096G"], "--mem 4096G: more than this host's RAM"),
    (["--flat", "{guest}", "--mem", "0x4000000000000000"], "more than this host's RAM"),
    (["--flat", "{guest}", "--mem", "4K"], "--mem 4K: a flat guest"),
    (["--flat", "{guest}", "--mem", "1000"], "--mem 1000: guest RAM must be a positive"),
    (["--kernel", "{bzImage}", "--mem", "8M"], "--mem 8M: a Linux guest needs at least 32M"),
    (["--flat", "{guest}", "--mem", "12Q"], "bad size '12Q'"),
    # entries a mode cannot reach, or outside RAM
    (["--flat", "{guest}", "--mode", "long", "--entry", "0x10000000000000000"],
     "--entry 0x10000000000000000: a long-mode entry must be in guest RAM below 4 GiB"),
    (["--flat", "{guest}", "--mode", "long", "--entry", "0x20000000", "--mem", "16M"],
     "see --mem"),
    (["--flat", "{guest}", "--mode", "protected", "--entry", "0xd0000000"],
     "a protected-mode entry must be in guest RAM"),
    (["--flat", "{guest}", "--mode", "real", "--entry", "0x100000"], "below 1 MiB"),
    (["--flat", "{guest}", "--cpl", "3"], "--cpl 3 needs --mode long"),
    # flat images that are not regular files are never read
    (["--flat", "/dev/zero"], "--flat image /dev/zero: not a regular file"),
    (["--flat", "{fifo}"], "not a regular file"),
    (["--flat", "{empty}"], "the file is empty"),
    (["--flat", "/nonexistent.bin"], "--flat image /nonexistent.bin: No such file"),
    # options of the other kind of guest are refused, not ignored
    (["--flat", "{guest}", "--kernel", "{bzImage}"], "--kernel: for Linux guests"),
    (["--flat", "{guest}", "--append", "quiet"], "--append: for Linux guests"),
    (["--flat", "{guest}", "--initrd", "{initrd}", "--acpi", "on"],
     "--initrd, --acpi: for Linux guests"),
    (["--kernel", "{bzImage}", "--mode", "long"], "--mode: for --flat images"),
    # vCPUs
    (["--flat", "{guest}", "--cpus", "0"], "--cpus 0: kvmpy supports 1 to 32"),
    (["--kernel", "{bzImage}", "--cpus", "99"], "--cpus 99"),
    # kernel, initrd, command line
    (["--kernel", "/nonexistent"], "kernel /nonexistent: No such file"),
    (["--kernel", "{text}"], "not a kernel: a script"),
    (["--kernel", "{empty}"], "not a kernel: an empty file"),
    (["--kernel", "{fifo}"], "kernel {fifo}: not a regular file"),
    (["--kernel", "{bzImage}", "--initrd", "/nonexistent"], "initrd /nonexistent: No such"),
    (["--kernel", "{bzImage}", "--initrd", "{empty}"], "the file is empty"),
    (["--kernel", "{bzImage}", "--append", "x" * 3000], "--append is 3000 bytes"),
    (["--kernel", "{bzImage}", "--modules", "/nonexistent"], "/nonexistent"),
    # devices
    (["--kernel", "{bzImage}", *["--disk", "{disk}"] * 40],
     "40 virtio devices asked for (40 --disk"),
    (["--kernel", "{bzImage}", "--disk", "/nonexistent.img"], "--disk /nonexistent.img: No"),
    (["--kernel", "{bzImage}", "--disk", "{empty}"], "less than one 512-byte sector"),
    (["--kernel", "{bzImage}", "--disk", "/dev/zero"], "not a regular file or block device"),
    (["--kernel", "{bzImage}", "--disk", "{disk},rw"], "the options are ro, bw=MB/s and iops=N"),
    (["--kernel", "{bzImage}", "--disk", "{disk},bw=0"], "bw=0: a positive number (MB/s)"),
    (["--kernel", "{bzImage}", "--disk", "{disk},iops=x"], "iops=x: a positive number"),
    (["--kernel", "{bzImage}", "--net", "tap=t0,bw=-3"], "bw=-3: a positive number (MB/s)"),
    (["--kernel", "{bzImage}", "--net", "tap=a-name-far-too-long"], "not an interface name"),
    (["--kernel", "{bzImage}", "--net", "tap=t0,mac=01:00:00:00:00:01"], "is multicast"),
    (["--kernel", "{bzImage}", "--net", "tap=t0,mac=zz"], "is not six hex bytes"),
    (["--kernel", "{bzImage}", "--net", "bridge=br0"], "unknown option 'bridge'"),
]


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_option_is_one_line(args: list[str], message: str, files: dict[str, str]) -> None:
    args = [a.format(**files) for a in args]
    r = kvmpy("run", *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmpy: "), r.stderr
    assert message.format(**files) in lines[0], lines[0]
    assert "cannot boot Linux here" not in lines[0]


def test_the_api_gets_the_same_checks(files: dict[str, str]) -> None:
    """Machine() runs check_config first: kvmpy.api.Guest users see the same one line."""
    linux = LinuxConfig(kernel=Path(files["bzImage"]))
    with pytest.raises(ConfigError, match="--mem 4096G"):
        check_config(MachineConfig(mem_size=4096 << 30, linux=linux))
    with pytest.raises(ConfigError, match="not an interface name"):
        check_config(MachineConfig(linux=linux, nets=[NetConfig(tap="x/y")]))
    with pytest.raises(ConfigError, match="19 virtio devices"):
        check_config(MachineConfig(linux=linux, rng=True,
                                   disks=[DiskConfig(Path(files["disk"]))] * 18))
    flat = FlatConfig(Path(files["guest"]))
    check_config(MachineConfig(mem_size=host_ram() // 2 // 4096 * 4096, flat=flat))
    with pytest.raises(ConfigError, match="not both"):
        check_config(MachineConfig(flat=flat, linux=linux))


def test_virtio_devices_are_honoured_for_flat_guests(files: dict[str, str]) -> None:
    """A flat guest may drive virtio devices itself (tutorial chapter 6): --disk with
    --flat is checked like any disk, not dropped."""
    flat = FlatConfig(Path(files["guest"]))
    check_config(MachineConfig(flat=flat, disks=[DiskConfig(Path(files["disk"]))]))
    with pytest.raises(ConfigError, match="--disk /nonexistent"):
        check_config(MachineConfig(flat=flat, disks=[DiskConfig(Path("/nonexistent"))]))
