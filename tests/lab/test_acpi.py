"""kvmpy's minimal kernel boots from kvmpy's ACPI tables instead of the MP table.

What the guest reports is the evidence: how many CPUs it brought up (MADT), that the
virtio-rng window was found as an LNRO0005 device of the DSDT (no virtio_mmio.device=
on the command line with ACPI), that `poweroff -f` ended kvmpy through the sleep
control register (status 0, where without ACPI the guest only halts), that `reboot -f`
ends it with the reboot status, and that the kernel log has no ACPI complaint.
Marked `lab`: runs where /dev/kvm has hardware virtualization.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmpy.acpi.linuxlog import acpi_complaints
from kvmpy.api import Guest
from kvmpy.initramfs import INIT_MARKER
from kvmpy.stop import StopKind

pytestmark = pytest.mark.lab

# What /init runs after `--`: the CPU count, then where each virtio device came from
# (its sysfs path names the platform device the DSDT created: LNRO0005:00). The
# kernel splits init arguments at spaces and honours only double quotes.
REPORT = ('-- sh -c "echo cpus=$(nproc); '
          'for d in /sys/bus/virtio/devices/*; do echo virtio=$(readlink -f $d); done"')


@pytest.mark.parametrize(("image", "cpus"), [("bzimage", 1), ("bzimage", 2), ("vmlinux", 2)])
def test_acpi_boot_finds_cpus_and_devices_and_powers_off(kernel, initrd: Path, image: str,
                                                         cpus: int) -> None:
    path = kernel.bzimage if image == "bzimage" else kernel.vmlinux  # vmlinux: PVH entry
    with Guest(path, initrd, append=REPORT, acpi="on", cpus=cpus, rng=True) as g:
        g.expect(INIT_MARKER, 120)
        g.expect(r"kvmpy-guest: exit status 0", 60)
        stop = g.wait(60)
        log = g.output
        requests = g.machine.pm.requests
    assert stop is not None and stop.kind is StopKind.POWEROFF, (stop, log[-2000:])
    assert stop.exit_status == 0
    assert requests == ["S5"]  # through the FADT's sleep control register
    cmdline = re.search(r"Kernel command line: (.*)", log)
    assert cmdline and "acpi=off" not in cmdline.group(1)
    assert "virtio_mmio.device=" not in cmdline.group(1)  # the DSDT lists the devices
    assert "ACPI: Using IOAPIC for interrupt routing" in log
    assert f"cpus={cpus}" in log
    if cpus > 1:
        assert f"smp: Brought up 1 node, {cpus} CPUs" in log
    assert re.search(r"virtio=/sys/devices/platform/LNRO0005:00/virtio0\b", log), log[-2000:]
    assert acpi_complaints(log) == []


def test_acpi_shell_exit_powers_off(kernel, initrd: Path) -> None:
    """The interactive guest: `exit` at the prompt -> /init's poweroff -f -> status 0."""
    with Guest(kernel.bzimage, initrd, acpi="on", cpus=2) as g:
        g.expect(r"/ # ", 120)
        g.send("nproc\n")
        g.expect(r"\r?\n2\r?\n", 30)
        g.send("exit\n")
        stop = g.wait(60)
        log = g.output
        requests = g.machine.pm.requests
    assert stop is not None and stop.kind is StopKind.POWEROFF, (stop, log[-2000:])
    assert "reboot: Power down" in log and requests == ["S5"]
    assert acpi_complaints(log) == []


@pytest.mark.parametrize("how", ["k", "acpi"])
def test_acpi_reboot_ends_with_the_reboot_status(kernel, initrd: Path, how: str) -> None:
    """reboot=k pulses the i8042's reset line; reboot=acpi writes the FADT's RESET_REG."""
    with Guest(kernel.bzimage, initrd, append=f"reboot={how} -- reboot -f", acpi="on",
               cpus=2) as g:
        stop = g.wait(120)
        log = g.output
        requests = g.machine.pm.requests
    assert stop is not None and stop.kind is StopKind.REBOOT, (stop, log[-2000:])
    assert stop.exit_status == 5
    assert requests == (["reset"] if how == "acpi" else [])  # else the i8042's reset line
    assert acpi_complaints(log) == []
