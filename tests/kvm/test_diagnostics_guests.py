"""Guests built to fail (guests/tests/fail_*.S), and the diagnostic kvmpy prints for each.

Measured on this machine's PVM /dev/kvm (see kvmpy/diagnostics.py and the notes here):
- an invalid entry state is reported as KVM_EXIT_SHUTDOWN before the first
  instruction, never as KVM_EXIT_FAIL_ENTRY (which VMX gives);
- `int3` (and `int n`) in long mode at CPL0 is an emulation failure, not #BP;
- a real-mode exception never triple-faults: KVM's emulator reads the IVT
  without checking the IDT limit, so these guests fail in protected or long mode.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.cpu.modes import Mode
from kvmpy.kvm.detect import KvmKind, kvm_kind
from kvmpy.kvm.exits import SHUTDOWN
from kvmpy.machine import FlatConfig, Machine, MachineConfig

pytestmark = pytest.mark.kvm


def kvmpy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmpy", "run", *args], capture_output=True,
                          text=True, timeout=60)


def fails(guest_dir: Path, name: str, mode: str) -> str:
    r = kvmpy("--flat", str(guest_dir / f"{name}.bin"), "--mode", mode)
    assert r.returncode == 4, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


def test_divide_by_zero_with_no_idt(guest_dir: Path) -> None:
    err = fails(guest_dir, "fail_divide", "long")
    assert "kvmpy: triple fault (KVM_EXIT_SHUTDOWN)" in err
    assert ("most likely cause: #DE (divide error): `div ecx` at 0x10007 divides by ECX = 0; "
            "IDT limit is 0: the first exception triple-faults") in err
    assert "=> 0x00010007  f7 f1" in err and "div ecx" in err
    assert "RFLAGS" in err and "[PE MP ET NE WP PG]" in err and "stack at 0x9f000:" in err


def test_unhandled_exception_with_a_gate_not_present(guest_dir: Path) -> None:
    err = fails(guest_dir, "fail_no_gate", "long")
    assert ("most likely cause: #UD (invalid opcode) from `ud2` at 0x10008; IDT entry 6 (#UD) "
            "is not present") in err
    assert "IDT 0x10020 limit 0xfff" in err


def test_exception_with_no_stack_to_push_on(guest_dir: Path) -> None:
    err = fails(guest_dir, "fail_stack", "long")
    assert ("; the stack pointer 0x200000000 is not mapped: the CPU cannot push the exception "
            "frame") in err
    assert "RSP 0x0000000200000000" in err
    assert "stack at 0x200000000: not mapped or outside guest RAM" in err


def test_long_mode_without_pae(guest_dir: Path) -> None:
    err = fails(guest_dir, "fail_no_pae", "protected")
    assert ("most likely cause: long mode requested but CR4.PAE is clear: `mov cr0, eax` at "
            "0x1001e sets CR0.PG with EFER.LME = 1, which raises #GP") in err
    assert "32-bit protected mode, paging off, CPL 0" in err
    assert "EFER 0x100 [LME]" in err


def test_jump_outside_guest_ram(guest_dir: Path) -> None:
    err = fails(guest_dir, "fail_rip", "long")
    assert "KVM internal error: emulation" in err
    assert "most likely cause: RIP points outside guest RAM (0x40000000 is guest-physical " \
        "0x40000000)" in err
    assert "code at RIP: gpa 0x40000000, not in guest RAM" in err


def test_int3_in_long_mode(guest_dir: Path) -> None:
    err = fails(guest_dir, "fail_int3", "long")
    if kvm_kind() is KvmKind.PVM:
        assert "KVM internal error: emulation" in err
        assert ("most likely cause: KVM's instruction emulator cannot execute `int3` at "
                "0x10005 (on PVM every CPL0 instruction is emulated)") in err
    else:
        assert "most likely cause: #BP (breakpoint) from `int3` at 0x10005" in err


def test_invalid_entry_state(guest_dir: Path) -> None:
    """SS.DPL 3 under CS.DPL 0: VMX refuses the entry; PVM triple-faults at once.

    Measured on PVM: most entry checks are not made at all (CPL0 code is emulated, and
    the emulator only trips over a bad segment when it uses it): CS.L+CS.D, an unusable
    TR or a GDT limit of 0 run this guest to its `hlt`. SS.DPL != CS.DPL and a CR3
    outside RAM do fail, as a triple fault before the first instruction.
    """
    flat = FlatConfig(guest_dir / "fail_entry.bin", Mode.LONG)
    machine = Machine(MachineConfig(mem_size=16 << 20, flat=flat))
    try:
        vcpu = machine.vcpus[0]
        sregs = vcpu.get_sregs()
        sregs.ss.dpl = 3
        vcpu.set_sregs(sregs)
        stop = machine.run()
    finally:
        machine.close()
    assert stop.exit_status == 4
    if kvm_kind() is KvmKind.PVM:
        assert stop.reason.startswith("triple fault")
    else:
        assert stop.reason.startswith(("VM entry failed", "triple fault"))
    assert "most likely cause: SS.DPL (3) differs from the CPL in CS (0)" in stop.details
    assert "RIP 0x0000000000010000" in stop.details  # nothing ran


def test_the_diagnostic_reads_the_exit_from_the_run_page(guest_dir: Path) -> None:
    """The same report is available from Python after any fatal stop."""
    from kvmpy.diagnostics import snapshot

    flat = FlatConfig(guest_dir / "fail_divide.bin", Mode.LONG)
    machine = Machine(MachineConfig(mem_size=16 << 20, flat=flat))
    try:
        machine.run()
        snap = snapshot(machine.vcpus[0])
    finally:
        machine.close()
    assert snap.exit == SHUTDOWN and snap.regs.rip == 0x10007
