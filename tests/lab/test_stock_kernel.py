"""Debian's cloud kernel, as Debian ships it, boots on kvmpy with its own modules.

That kernel has no MP-table parser and no virtio_mmio.device=, and virtio_mmio is a
module: it sees a second CPU only in the MADT and the virtio devices only as the
DSDT's LNRO0005 devices, after the initramfs kvmpy builds from its /lib/modules tree
has loaded virtio_mmio and the device drivers. The guest's own output is the
evidence: nproc, each virtio device's sysfs path and device ID, data read from the
virtio disk, a shell on the virtio console, and how kvmpy ended (poweroff through
the ACPI sleep registers: status 0; reboot: status 5). The kernel log must carry no
ACPI complaint. Marked `lab`: runs where /dev/kvm has hardware virtualization.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy import assets, initramfs
from kvmpy.acpi.choice import choose_acpi
from kvmpy.acpi.linuxlog import acpi_complaints
from kvmpy.api import Guest
from kvmpy.cachedir import cache_dir
from kvmpy.machine import DiskConfig
from kvmpy.stop import StopKind
from tests.lab.distress import assert_calm

pytestmark = pytest.mark.lab

DISK_MARKER = b"kvmpy-stock-disk-marker"
# virtio 1.2 §5: device IDs
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

# What /init runs after `--`. The kernel hands init arguments over split at spaces
# and honours only double quotes, so the script is one double-quoted argument.
REPORT = ('-- sh -c "echo cpus=$(nproc); for d in /sys/bus/virtio/devices/*; do '
          'echo virtio=$(readlink -f $d),$(cat $d/device); done; '
          f'echo disk=$(head -c {len(DISK_MARKER)} /dev/vda); head -c 16 /dev/hwrng | wc -c"')


@pytest.fixture(scope="module")
def stock() -> assets.StockKernel:
    try:
        return assets.stock_kernel_path()
    except assets.AssetError as e:
        pytest.fail(f"{e} (fetch it on the host first: `make stock-kernel`)")


@pytest.fixture(scope="module")
def initrd(stock: assets.StockKernel) -> Path:
    return initramfs.modules_guest_initramfs_path(stock.modules, cache_dir() / "initramfs")


def test_auto_chooses_acpi_for_the_stock_kernel(stock: assets.StockKernel) -> None:
    assert choose_acpi("auto", stock.vmlinuz).acpi  # from its config: no X86_MPPARSE
    assert choose_acpi("auto", stock.vmlinuz, stock.modules).acpi


def test_stock_kernel_two_cpus_virtio_devices_and_poweroff(stock, initrd: Path,
                                                           tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(DISK_MARKER.ljust(1 << 20, b"\0"))
    with Guest(stock.vmlinuz, initrd, append=REPORT, acpi="on", cpus=2, rng=True,
               disks=[DiskConfig(disk, read_only=True)]) as g:
        g.expect(r"kvmpy-guest: exit status 0", 180)
        stop = g.wait(60)
        log = g.output
        requests = g.machine.pm.requests
    assert stop is not None and stop.kind is StopKind.POWEROFF, (stop, log[-3000:])
    assert stop.exit_status == 0 and requests == ["S5"]  # the ACPI sleep control register
    assert "Linux version 6.1" in log and "cloud-amd64" in log
    assert "cpus=2" in log
    assert "smp: Brought up 1 node, 2 CPUs" in log
    found = dict(re.findall(r"virtio=/sys/devices/platform/(LNRO0005:\d+)/virtio\d+,(0x\w+)",
                            log))
    assert found == {"LNRO0005:00": f"{VIRTIO_ID_BLOCK:#06x}",
                     "LNRO0005:01": f"{VIRTIO_ID_RNG:#06x}"}, log[-3000:]
    assert f"disk={DISK_MARKER.decode()}" in log
    assert re.search(r"^16\r?$", log, re.M)  # 16 bytes from virtio-rng's /dev/hwrng
    assert "insmod" not in log  # no "init: insmod X failed"
    assert "reboot: Power down" in log
    assert acpi_complaints(log) == []


def test_stock_kernel_shell_on_the_virtio_console(stock, initrd: Path) -> None:
    """hvc0 is a module here: the init reopens /dev/console once virtio_console is in."""
    with Guest(stock.vmlinuz, initrd, acpi="on", cpus=2, console="virtio") as g:
        g.expect(r"/ # ", 180)
        g.send("nproc; cat /proc/consoles\n")
        g.expect(r"\r?\n2\r?\n", 30)
        g.expect(r"hvc0", 30)
        g.send("exit\n")
        stop = g.wait(60)
        log = g.output
    assert stop is not None and stop.kind is StopKind.POWEROFF, (stop, log[-3000:])
    assert acpi_complaints(log) == []


def test_kvmpy_run_stock_kernel_with_modules_reboots_with_status_5(stock) -> None:
    """The command line: --modules builds the initramfs and --acpi auto picks ACPI."""
    argv = [sys.executable, "-m", "kvmpy", "-v", "run", "--kernel", str(stock.vmlinuz),
            "--modules", str(stock.modules.parent), "--cpus", "2",
            "--append", '-- sh -c "echo cpus=$(nproc); reboot -f"']
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=300)
    # one string, not a tuple: pytest would cut a tuple's repr, and with it the
    # diagnostic (vCPU, registers) of a guest that died
    assert done.returncode == StopKind.REBOOT.value, (
        f"{done.stderr}\n--- end of the console ---\n{done.stdout[-3000:]}")
    assert "ACPI tables: a modular kernel (--modules)" in done.stderr
    assert "cpus=2" in done.stdout
    assert acpi_complaints(done.stdout) == []
    assert_calm(done.stdout)
