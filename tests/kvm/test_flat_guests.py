"""The test guests, run by `kvmpy run --flat` on this machine's /dev/kvm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm


def kvmpy(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmpy", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_hello_in_real_mode(guest_dir: Path) -> None:
    r = kvmpy("run", "--flat", str(guest_dir / "hello_real.bin"), "--mode", "real")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello from real mode\n"
    assert r.stderr == ""


def test_guest_climbs_from_real_to_long_mode(guest_dir: Path) -> None:
    r = kvmpy("run", "--flat", str(guest_dir / "modes.bin"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "real mode\nprotected mode\nlong mode\n"


def test_started_in_protected_mode(guest_dir: Path) -> None:
    r = kvmpy("run", "--flat", str(guest_dir / "hello_protected.bin"), "--mode", "protected")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello from protected mode\n"


def test_started_in_long_mode_with_kvmpys_page_tables(guest_dir: Path) -> None:
    r = kvmpy("run", "--flat", str(guest_dir / "hello_long.bin"), "--mode", "long")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello from long mode\n"


def test_mmio_echo_device(guest_dir: Path) -> None:
    r = kvmpy("run", "--flat", str(guest_dir / "mmio_echo.bin"), "--mode", "long", "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "mmio ok\n"
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    by_reason = stats["vcpus"][0]["by_reason"]
    # 1 identity read, 3 writes, 3 read-backs
    assert by_reason["MMIO"] == 7
    assert stats["vcpus"][0]["by_address"]["mmio:0xe0000000"] == 7


def test_cpl3_compute_loop(guest_dir: Path) -> None:
    r = kvmpy("run", "--flat", str(guest_dir / "cpl3_loop.bin"), "--mode", "long", "--cpl", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"sum=0x{sum(range(1, 10_000_001)):016x}\n"


def test_triple_fault_is_diagnosed(guest_dir: Path) -> None:
    r = kvmpy("run", "--flat", str(guest_dir / "triple_fault.bin"), "--mode", "long")
    assert r.returncode == 4
    assert "triple fault" in r.stderr
    assert "64-bit long mode" in r.stderr
    assert "RAX 0x0000000000001234" in r.stderr
    assert "code at 0x10007: 0f 0b" in r.stderr  # the ud2 that started it
    assert "Traceback" not in r.stderr


def test_stats_json_counts_exits_by_port(guest_dir: Path) -> None:
    r = kvmpy("run", "--flat", str(guest_dir / "hello_real.bin"), "--stats")
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    vcpu = stats["vcpus"][0]
    n = len("Hello from real mode\n")
    assert vcpu["by_address"]["pio:0x3f8"] == n
    assert vcpu["by_address"]["pio:0x3fd"] >= n  # one LSR poll per character at least
    assert vcpu["by_reason"]["HLT"] == 1
    assert vcpu["mean_exit_us"] > 0 and stats["process_s"] > 0


@pytest.mark.parametrize("args,message", [
    (["--flat", "/nonexistent.bin"], "--flat image /nonexistent.bin: No such file"),
    (["--flat", "/dev/null"], "not a regular file"),
    (["--flat", "{big}"], "must end below"),
    (["--flat", "x.bin", "--mem", "12Q"], "bad size"),
    (["--flat", "x.bin", "--mem", "1000"], "multiple of 4 KiB"),
    (["--flat", "{small}", "--mode", "real", "--cpl", "3"], "--cpl 3 needs --mode long"),
    (["--flat", "{small}", "--qmp", "unix:{long}"], "AF_UNIX path too long"),
])
def test_bad_input_is_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(bytes(1 << 20))
    (tmp_path / "small").write_bytes(b"\xf4")
    args = [a.format(big=tmp_path / "big", small=tmp_path / "small",
                     long=tmp_path / ("q" * 120)) for a in args]
    r = kvmpy("run", *args)
    assert r.returncode != 0
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_device_that_raises_stops_the_vm_in_one_line(
        guest_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:
    """A bug in a legacy device (here the UART's write raising) on a single-vCPU flat
    guest, which runs on the main thread: one line saying what and where, status 1, and
    the machine closed (no fd left behind), not a traceback."""
    import os

    from kvmpy.cli import main
    from kvmpy.devices.serial import Serial

    def broken(self: Serial, offset: int, data: bytes) -> None:
        raise ValueError("planted device bug")

    monkeypatch.setattr(Serial, "write", broken)
    before = set(os.listdir("/proc/self/fd"))
    # (--seccomp off: a filter is for the life of the process, and this one is pytest's)
    status = main(["run", "--flat", str(guest_dir / "hello_real.bin"), "--seccomp", "off"])
    err = capfd.readouterr().err
    assert status == 1
    assert err.count("\n") == 1, err
    assert err.startswith("kvmpy: vCPU 0: ValueError: planted device bug (kvmpy/"), err
    assert set(os.listdir("/proc/self/fd")) == before
