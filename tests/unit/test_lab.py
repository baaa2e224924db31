"""kvmpy.lab without booting it: QEMU argv, Debian versions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvmpy.assets.debian import deb_version, version_key
from kvmpy.lab import command
from kvmpy.lab.errors import LabError
from kvmpy.lab.image import LabImage
from kvmpy.lab.monitor import describe
from kvmpy.lab.runner import (
    ICOUNT_INSTRUCTIONS,
    KERNEL_CMDLINE,
    ZERO_FREED_PAGES,
    LabBroke,
    LabDied,
    _failure_reason,
    _lab_failure,
    qemu_argv,
    run_in_lab,
)


def test_qemu_argv_shares_root_read_only_and_rw_dirs_read_write(tmp_path: Path) -> None:
    image = LabImage(tmp_path, tmp_path / "vmlinux", tmp_path / "initrd", "6.1",
                     tmp_path / "kallsyms")
    argv = qemu_argv(image, tmp_path / "job", [Path("/a"), Path("/a/b")], 1 << 30, 2,
                     {"console": 7, "out": 8, "err": 9})
    joined = " ".join(argv)
    assert "-cpu max" in joined and "-m 1024M" in joined and "-smp 2" in joined
    assert "local,path=/,mount_tag=hostroot,security_model=none,readonly=on" in joined
    assert "path=/a,mount_tag=kvmpyrw0" in joined and "path=/a/b,mount_tag=kvmpyrw1" in joined
    assert "file,id=out,path=/proc/self/fd/8,append=on" in joined
    assert "virtserialport,bus=vser.0,chardev=err,name=kvmpy.stderr" in joined
    assert "virtserialport,bus=vser.0,chardev=beat,name=kvmpy.heartbeat" in joined
    assert f"pipe,id=kick,path={tmp_path / 'job' / 'kick'}" in joined  # runner._Kick
    assert "virtserialport,bus=vser.0,chardev=kick,name=kvmpy.kick" in joined
    assert argv[argv.index("-append") + 1] == KERNEL_CMDLINE
    assert "-icount" not in argv


def test_qemu_argv_adds_kernel_args_to_the_labs_command_line(tmp_path: Path) -> None:
    image = LabImage(tmp_path, tmp_path / "vmlinux", tmp_path / "initrd", "6.1",
                     tmp_path / "kallsyms")
    argv = qemu_argv(image, tmp_path / "job", [], 1 << 30, 2, {},
                     kernel_args=[ZERO_FREED_PAGES, "loglevel=4"])
    assert argv[argv.index("-append") + 1] == f"{KERNEL_CMDLINE} init_on_free=1 loglevel=4"


def test_qemu_argv_takes_the_accelerator_and_cpu_model(tmp_path: Path) -> None:
    image = LabImage(tmp_path, tmp_path / "vmlinux", tmp_path / "initrd", "6.1",
                     tmp_path / "kallsyms")
    argv = qemu_argv(image, tmp_path / "job", [], 1 << 30, 1, {},
                     accel="tcg,thread=single", cpu_model="max,-x2apic")
    assert argv[argv.index("-accel") + 1] == "tcg,thread=single"
    assert argv[argv.index("-cpu") + 1] == "max,-x2apic"
    assert argv[argv.index("-smp") + 1] == "1"


def test_qemu_argv_puts_the_lab_on_the_instruction_clock(tmp_path: Path) -> None:
    image = LabImage(tmp_path, tmp_path / "vmlinux", tmp_path / "initrd", "6.1",
                     tmp_path / "kallsyms")
    argv = qemu_argv(image, tmp_path / "job", [], 1 << 30, 1, {}, icount=ICOUNT_INSTRUCTIONS)
    assert argv[argv.index("-icount") + 1] == "shift=2,align=off,sleep=off"


def test_the_instruction_clock_refuses_another_accelerator() -> None:
    # checked before anything else: this machine may have no lab at all
    with pytest.raises(LabError, match="instruction clock needs -accel tcg,thread=single, "
                                       "not tcg,thread=multi"):
        run_in_lab(["true"], instruction_clock=True, accel="tcg,thread=multi")


def test_failure_reason_prefers_the_labs_own_words(tmp_path: Path) -> None:
    console = ["[    1.0] something", "kvmpy-lab-error: cannot mount the host root", ""]
    assert _failure_reason(tmp_path, 0, console) == (
        "the lab could not run the command: cannot mount the host root")
    (tmp_path / "qemu.log").write_text("qemu-system-x86_64: cannot set up guest memory\n")
    assert "cannot set up guest memory" in _failure_reason(tmp_path, 1, ["boot"])
    (tmp_path / "error").write_text("no /dev/kvm in the lab\n")
    assert _failure_reason(tmp_path, 0, []).endswith("no /dev/kvm in the lab")


def test_a_lab_that_goes_down_under_the_command_died(tmp_path: Path) -> None:
    last = "[  148.7] kvm [263]: vcpu0, guest rIP: 0xffffffff81002f19 Unhandled WRMSR(0xc0010007)"
    died = _lab_failure(tmp_path, 0, ["[ 1.0] booting", last])
    assert isinstance(died, LabDied) and str(died).endswith(last)
    assert isinstance(_lab_failure(tmp_path, 0, ["Kernel panic - not syncing: x"]), LabDied)
    (tmp_path / "qemu.log").write_text("qemu-system-x86_64: -cpu nosuch: unknown CPU model\n")
    refused = _lab_failure(tmp_path, 1, [])
    assert not isinstance(refused, LabBroke) and "unknown CPU model" in str(refused)


def test_debian_version_order() -> None:
    versions = ["6.1.99-1", "6.1.192-2", "6.1.176-1", "6.1.192-10"]
    assert sorted(versions, key=version_key) == ["6.1.99-1", "6.1.176-1", "6.1.192-2",
                                                  "6.1.192-10"]
    assert deb_version(Path("linux-source-6.1_6.1.192-2_all.deb")) == "6.1.192-2"


def test_cli_without_a_command_says_how(capsys: pytest.CaptureFixture[str]) -> None:
    assert command.main(["--"]) == 2
    assert "give a command after --" in capsys.readouterr().err


def test_cli_reports_a_lab_that_cannot_start_in_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert command.main(["--", "true"]) == 125
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "qemu-system-x86" in err


def test_rw_must_be_a_directory(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86 not installed")
    with pytest.raises(LabError, match="not a directory"):
        run_in_lab(["true"], rw=[tmp_path / "nope"])


# What QEMU 7.2's monitor answered in a stalled lab on 2026-11-26 (abridged).
_REGISTERS = """
CPU#0
RAX=ffffffff82a1b998 RBX=ffff88807da31c40 RCX=0000000000000000 RDX=00000013ed11a4f4
RIP=ffffffff81a592eb RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CPU#1
RIP=ffffffff81a5267b RFL=00000046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0
"""
_LAPIC0 = """dumping local APIC state for CPU 0 \n
LVTT\t 0x000000ec active-hi edge                 one-shot     Fixed  (vec 236)
ISR\t (none)
IRR\t 236 251 \n"""
_LAPIC1 = "dumping local APIC state for CPU 1 \n\nISR\t (none)\nIRR\t (none)\n"


def test_monitor_answers_become_one_line_per_cpu() -> None:
    assert describe(_REGISTERS, [_LAPIC0, _LAPIC1]) == (
        "cpu0 rip=ffffffff81a592eb cpl=0 halted if=1 irr=236 251; "
        "cpu1 rip=ffffffff81a5267b cpl=0 running if=0 irr=(none)")
    assert describe("", []) == "no CPU state from QEMU"
