"""The Python API and the threaded runner, with small guests on this machine's /dev/kvm."""

import os
import re
from pathlib import Path

import pytest

from kvmpy.api import ExpectTimeout, Guest
from kvmpy.stop import StopKind

pytestmark = pytest.mark.kvm


def test_guest_runs_in_the_background_and_is_expected(guest_dir: Path) -> None:
    with Guest.flat(guest_dir / "modes.bin") as g:
        g.expect(r"protected mode\n", 30)
        g.expect(r"long mode\n", 30)
        stop = g.wait(30)
    assert stop is not None and stop.kind is StopKind.POWEROFF
    assert g.output == "real mode\nprotected mode\nlong mode\n"


def test_expect_reports_what_the_console_showed(guest_dir: Path) -> None:
    with Guest.flat(guest_dir / "hello_real.bin") as g:
        with pytest.raises(ExpectTimeout, match="Hello from real mode"):
            g.expect(r"never printed", 2)


def test_debug_exit_status_comes_back(guest_dir: Path) -> None:
    with Guest.flat(guest_dir / "cpl3_loop.bin", mode="long", cpl=3) as g:
        stop = g.wait(60)
    assert stop is not None and stop.kind is StopKind.DEBUG_EXIT and stop.exit_status == 0
    assert g.output.startswith("sum=0x")


def test_a_guest_halted_with_interrupts_off_ends_its_run(guest_dir: Path) -> None:
    # with the irqchip its `hlt` never leaves KVM_RUN: only the supervisor's kicks see it
    with Guest.flat(guest_dir / "hello_real.bin", irqchip=True) as g:
        stop = g.wait(30)
    assert stop is not None and stop.kind is StopKind.HALTED, stop
    assert "every vCPU halted with interrupts disabled" in stop.reason
    assert g.output == "Hello from real mode\n"


def test_a_quiet_guest_is_reported_where_it_spins(guest_dir: Path) -> None:
    # irqchip: the vCPU runs on its own thread, as a Linux guest's do
    with Guest.flat(guest_dir / "spin.bin", irqchip=True) as g:
        with pytest.raises(ExpectTimeout) as e:
            g.expect(r"never printed", 1)
        assert g.running()  # looking did not stop it
        again = g.machine.describe_vcpus()
    report = str(e.value)
    assert "vCPUs now:" in report and "vCPU 0: real mode" in report, report
    assert "interrupts off, runnable" in report, report
    assert "RAX 0x0000000000005157" in report, report
    # the code lines show the loop, RIP on one of its two instructions
    assert re.search(r"=> 0x0000000(4  f3 90 +pause|6  eb fc +jmp 4)", report), report
    assert re.search(r"0x00000004  f3 90 +pause", report), report
    assert "RAX 0x0000000000005157" in again


def test_closing_a_guest_closes_every_fd_it_opened(guest_dir: Path) -> None:
    # a test process runs dozens of guests: /dev/kvm, VM, vCPU, ioeventfd and irqfd fds
    # must not pile up (each virtio device wires one eventfd per queue and one irqfd)
    def fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    before = fds()
    for _ in range(2):
        with Guest.flat(guest_dir / "spin.bin", irqchip=True, console="virtio",
                        rng=True) as g:
            opened = len(fds() - before)
            assert g.running()
    assert opened >= 8  # /dev/kvm, VM, vCPU, 3 ioeventfds, 2 irqfds, the I/O thread's
    assert fds() - before == set()
