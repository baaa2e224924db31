"""Can this machine boot Linux on its own /dev/kvm, and if not, can it run the lab?

Linux needs hardware virtualization under KVM: the vendor module (`kvm_intel` or
`kvm_amd`) loaded and the CPU flag (`vmx` or `svm`) in /proc/cpuinfo. PVM (`kvm_pvm`)
offers the same ioctls without it and cannot run a kernel (see the shared ENVIRONMENT
notes), so "a /dev/kvm exists" is not the question to ask. Inside the lab both
conditions hold (TCG's `-cpu max` has `svm`, and the lab loads `kvm_amd`).

This module only inspects the machine; it starts nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

QEMU = "qemu-system-x86_64"
DEFAULT_MEM = 2048 << 20  # the lab VM's RAM, which also bounds its writable overlay
DEFAULT_CPUS = 2
VENDOR_MODULES = {"kvm_intel": "vmx", "kvm_amd": "svm"}


def _cpu_flags(cpuinfo: Path) -> set[str]:
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def linux_kvm_status(dev: Path = Path("/dev/kvm"), cpuinfo: Path = Path("/proc/cpuinfo"),
                     sys_module: Path = Path("/sys/module")) -> tuple[bool, str]:
    """(True, why) when Linux guests can boot on `dev` here, else (False, why not)."""
    if not dev.exists():
        return False, f"{dev} does not exist"
    if not os.access(dev, os.R_OK | os.W_OK):
        return False, f"{dev} is not readable and writable by this user"
    if (sys_module / "kvm_pvm").exists():
        return False, f"{dev} is PVM (kvm_pvm): no hardware virtualization, Linux cannot boot"
    flags = _cpu_flags(cpuinfo)
    for module, flag in VENDOR_MODULES.items():
        if (sys_module / module).exists():
            if flag in flags:
                return True, f"{dev} is {module} with {flag}: Linux guests boot here"
            return False, f"{module} is loaded but the CPU has no {flag} flag"
    return False, f"{dev} is provided by neither kvm_intel nor kvm_amd"


def can_boot_linux() -> bool:
    """Whether this machine's /dev/kvm has real VT-x/AMD-V (what a Linux guest needs)."""
    return linux_kvm_status()[0]


def lab_status() -> tuple[bool, str]:
    """(True, "") if the lab can be started here, else (False, the one-line reason)."""
    import shutil

    if shutil.which(QEMU) is None:
        return False, f"{QEMU} not found: install qemu-system-x86 (`make deps`)"
    if not Path("/bin/busybox").exists():
        return False, "/bin/busybox not found: install busybox-static (`make deps`)"
    return True, ""
