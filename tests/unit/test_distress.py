"""kvmpy.distress and the lab tests' check (tests/lab/distress.py): distress is found,
a calm boot passes, and a guest whose log has a `WARNING:` line fails its test."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy.distress import GuestInDistress, check_calm, distress
from tests.lab.distress import ConsoleWatch, assert_calm

# A calm boot of kvmpy's minimal kernel on kvmpy (2 vCPUs), abridged: nothing to report.
CALM = """\
[    0.000000] Linux version 6.1.192 (root@kvmpy) #1 SMP PREEMPT_DYNAMIC
[    0.000000] Command line: console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux i8042.nokbd
[    0.000000] BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable
[    0.012000] clocksource: hpet: mask: 0xffffffff max_cycles: 0xffffffff, max_idle_ns: 1 ns
[    0.104000] smp: Brought up 1 node, 2 CPUs
[    0.236000] virtio_blk virtio0: [vda] 131072 512-byte logical blocks (67.1 MB/64.0 MiB)
[    0.240000] serial8250: ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A
[    0.280000] NMI watchdog: Perf NMI watchdog permanently disabled
[    0.300000] Run /init as init process
kvmpy-guest: init running
kvmpy-guest: exit status 0
[    0.520000] reboot: System halted
"""

WARN = """\
[    2.913437] ------------[ cut here ]------------
[    2.913440] WARNING: CPU: 1 PID: 0 at kernel/time/tick-sched.c:1105 tick_nohz_idle_exit+0x9e/0xb0
[    2.913460] Modules linked in:
[    2.913470] Call Trace:
[    2.913471]  <TASK>
[    2.913480]  do_idle+0x1f6/0x2a0
"""

# One real line (as Linux 6.1 prints it) for each kind of distress.
SAMPLES = {
    "panic": "Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b",
    "bug": "[    4.1] BUG: kernel NULL pointer dereference, address: 0000000000000008",
    "warning": "[    2.9] WARNING: CPU: 0 PID: 1 at drivers/virtio/virtio_ring.c:2470 x+0x1",
    "call trace": "[    2.9] Call Trace:",
    "oops": "[    3.0] general protection fault, probably for non-canonical address 0xdead",
    "rcu stall": "[   60.1] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
    "hung task": "[  245.0] INFO: task kworker/0:1:23 blocked for more than 120 seconds.",
    "lockup": "[   52.0] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [swapper/1:0]",
    "irq": "[   12.0] irq 10: nobody cared (try booting with the \"irqpoll\" option)",
    "netdev watchdog": "[   35.1] NETDEV WATCHDOG: eth0 (virtio_net): transmit queue 0 timed out",
    "i/o error": "[    8.2] I/O error, dev vda, sector 2048 op 0x1:(WRITE) flags 0x800 phys_seg 1",
    "fs error": "[    9.0] EXT4-fs error (device vda): ext4_find_entry:1658: inode #2: comm sh",
    "timeout": "[   40.0] virtio_blk virtio0: [vda] request timed out",
    "virtqueue": "[    5.0] virtio_net virtio1: output.0:id 7 is not a head!",
    "msr": "[    0.1] unchecked MSR access error: RDMSR from 0xc0011029 at rIP: 0xffffffff81",
    "segfault": "[    6.0] sh[71]: segfault at 0 ip 00000000004a1f2c sp 00007ffc error 4",
    "oom": "[    7.0] sh invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE)",
    "acpi": "[    0.2] ACPI BIOS Error (bug): Could not resolve symbol [\\_SB.VR00], AE_NOT_FOUND",
}


def test_a_calm_boot_shows_no_distress() -> None:
    assert distress(CALM) == []
    check_calm(CALM)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_each_kind_of_distress_is_found(kind: str) -> None:
    found = distress(CALM + SAMPLES[kind] + "\n")
    assert [d.kind for d in found] == [kind] and found[0].line == SAMPLES[kind]


def test_a_warning_fails_the_guest_with_its_lines_and_what_follows() -> None:
    with pytest.raises(GuestInDistress) as e:
        check_calm(CALM + WARN, what="kvmpy's guest")
    text = str(e.value)
    assert text.startswith("kvmpy's guest's kernel log shows distress (2 line(s))")
    assert "warning: [    2.913440] WARNING: CPU: 1 PID: 0 at kernel/time/tick-sched.c" in text
    assert "call trace: [    2.913470] Call Trace:" in text
    assert "do_idle+0x1f6/0x2a0" in text  # the trace after the first line is quoted


def test_allowed_lines_are_exempt_and_only_they() -> None:
    log = CALM + SAMPLES["i/o error"] + "\n" + SAMPLES["warning"] + "\n"
    assert [d.kind for d in distress(log, allow=[r"I/O error, dev vda"])] == ["warning"]


def test_an_allowed_warning_takes_its_call_trace_with_it_and_no_more() -> None:
    log = CALM + WARN + SAMPLES["warning"] + "\n[    3.0] Call Trace:\n"
    assert [d.kind for d in distress(log, allow=[r"tick-sched\.c:1105"])] == [
        "warning", "call trace"]


STOCK_IN_THE_LAB = """[    3.154759] XSAVE consistency problem: size 2696 != kernel_size 576
[    3.154759] WARNING: CPU: 0 PID: 0 at arch/x86/kernel/fpu/xstate.c:606 \
fpu__init_system_xstate+0x85a/0xb19
[    3.154759] Call Trace:
"""


def test_the_labs_own_quirks_are_allowed_in_the_lab_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMPY_IN_LAB", "1")
    assert_calm(CALM + STOCK_IN_THE_LAB)
    with pytest.raises(AssertionError, match="WARNING: CPU: 1"):
        assert_calm(CALM + STOCK_IN_THE_LAB + WARN)
    monkeypatch.delenv("KVMPY_IN_LAB")
    with pytest.raises(AssertionError, match="xstate.c:606"):
        assert_calm(CALM + STOCK_IN_THE_LAB)


def test_console_line_endings_and_nuls_are_ignored() -> None:
    assert distress("\x00\x00[ 1.0] WARNING: CPU: 0 PID: 1 at x\r\n") == [
        ("warning", "[ 1.0] WARNING: CPU: 0 PID: 1 at x")]


@given(st.text())
def test_any_text_is_read_without_error(text: str) -> None:
    for found in distress(text):
        assert found.line and found.line in text


class _Guest:
    """Stands for kvmpy.api.Guest: made during a test, has an `.output` transcript."""

    def __init__(self, output: str) -> None:
        self.output = output


def test_a_watched_guest_whose_log_has_a_warning_fails_the_test(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What tests/lab/conftest.py does for every lab test's Guest and KvmpyProcess."""
    watch = ConsoleWatch()
    watch.watch(monkeypatch, _Guest)
    _Guest(CALM)
    _Guest(CALM + WARN)
    with pytest.raises(AssertionError, match=r"_Guest #2 of this test's kernel log shows "
                                             r"distress[^\n]*\n  warning: .*WARNING: CPU: 1"):
        watch.check()
    watch.check(allow=[r"WARNING: CPU: 1 PID: 0 at kernel/time", r"Call Trace"])


def test_a_guest_made_by_from_config_is_watched_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guest.from_config skips __init__: the lab conftest watches Guest._start."""
    from kvmpy import api

    class Machine:  # stands for kvmpy.machine.Machine: its guest prints a WARNING
        def __init__(self, config: Any, snapshot: Any = None) -> None:
            self.config = config

        def unpack_for_next_boot(self) -> None:
            return None

        def start(self) -> None:
            self.config.console.write(WARN.encode())

    monkeypatch.setattr(api, "Machine", Machine)
    watch = ConsoleWatch()
    watch.watch(monkeypatch, api.Guest, "_start")
    api.Guest.from_config(namedtuple("Config", "console")(None))  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="Guest #1 of this test's kernel log"):
        watch.check()


def test_assert_calm_fails_a_test_on_a_warning() -> None:
    with pytest.raises(AssertionError, match="WARNING: CPU: 1"):
        assert_calm(CALM + WARN)
    assert_calm(CALM)
