"""QEMU boots kvmpy's minimal kernel and default initramfs on a hardware-virtualization /dev/kvm.

Proves the three parts kvmpy's own Linux boot will rely on, before kvmpy can boot Linux
itself: the lab gives a /dev/kvm Linux runs on, the kernel built from guests/linux/
boots on `-M microvm` (no PCI, no firmware tables it needs), and the initramfs runs /init.
Marked `lab`: runs here on real VT-x/AMD-V, else inside the one lab session.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kvmpy.assets import AssetError, initramfs_path, kernel_path
from kvmpy.initramfs import INIT_MARKER
from kvmpy.lab import linux_kvm_status
from tests.lab.distress import assert_calm

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def assets() -> tuple[Path, Path]:
    ok, why = linux_kvm_status()
    assert ok, f"lab tests must run where Linux can boot on /dev/kvm: {why}"
    try:
        kernel = kernel_path().bzimage
        initrd = initramfs_path()
    except AssetError as e:
        pytest.fail(f"{e} (`make test` builds it)")
    return kernel, initrd


def run_microvm(kernel: Path, initrd: Path, append: str, timeout: float = 120) -> str:
    """QEMU microvm with KVM: 8250 console on stdout, exits when the guest powers off.

    `rtc=on`: without a CMOS RTC, rtc_cmos polls the update-in-progress bit for 1 s
    (mc146818_does_rtc_work), several seconds when nested. ACPI S5 powers off.
    """
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "qemu-system-x86_64 is not installed"
    argv = [qemu, "-M", "microvm,rtc=on", "-enable-kvm", "-cpu", "host", "-m", "256", "-smp", "2",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-serial", "stdio"]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, f"QEMU exited {done.returncode}: {done.stderr.decode()}\n{out}"
    assert_calm(out, what="QEMU's guest")
    return out


def test_microvm_runs_init_of_the_default_initramfs(assets: tuple[Path, Path]) -> None:
    kernel, initrd = assets
    out = run_microvm(kernel, initrd, "console=ttyS0 -- uname -sm")
    assert "Linux version 6.1" in out  # our kernel's banner on the 8250
    assert INIT_MARKER in out
    assert "Linux x86_64" in out  # the command given to /init after `--` ran...
    assert "kvmpy-guest: exit status 0" in out  # ...and /init went on to power off


def test_microvm_guest_sees_two_cpus_and_the_mounts(assets: tuple[Path, Path]) -> None:
    kernel, initrd = assets
    out = run_microvm(kernel, initrd,
                      'console=ttyS0 loglevel=5 -- sh -c "nproc; cat /proc/mounts"')
    lines = out.splitlines()
    assert "2" in [ln.strip() for ln in lines]  # SMP from microvm's MP/ACPI tables
    mounts = " ".join(lines)
    for fs in ("proc /proc", "sysfs /sys", "devtmpfs /dev", "tmpfs /tmp"):
        assert fs in mounts
