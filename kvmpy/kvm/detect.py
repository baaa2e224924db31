"""What kind of /dev/kvm this machine has, and whether Linux can boot on it: the one probe.

Linux needs hardware virtualization under KVM: the vendor module (`kvm_intel` or
`kvm_amd`) loaded and the CPU flag (`vmx` or `svm`) in /proc/cpuinfo. PVM (the
`kvm_pvm` module) offers the same ioctls without it: small test guests work, but
KVM's instruction emulator cannot run a Linux kernel (see the shared ENVIRONMENT
notes), so "a /dev/kvm exists" is not the question to ask. Users need to know that
before they wait for a boot that will never come.

This module only inspects the machine (files under /dev, /sys and /proc); it
opens nothing and starts nothing.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import NamedTuple

from kvmpy.errors import KvmUnavailable

KVM_PATH = "/dev/kvm"
VENDOR_MODULES = {"kvm_intel": "vmx", "kvm_amd": "svm"}


class KvmKind(enum.Enum):
    MISSING = "missing"
    NO_ACCESS = "no-access"
    PVM = "pvm"
    HARDWARE = "hardware"  # kvm_intel or kvm_amd with its CPU flag: VT-x / AMD-V
    OTHER = "other"  # usable, but neither PVM nor a vendor module with its CPU flag


class KvmStatus(NamedTuple):
    kind: KvmKind
    why: str  # one line for the user

    @property
    def can_boot_linux(self) -> bool:
        return self.kind is KvmKind.HARDWARE


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


def probe(dev: str | Path = KVM_PATH, cpuinfo: Path = Path("/proc/cpuinfo"),
          sys_module: Path = Path("/sys/module")) -> KvmStatus:
    """What `dev` is, and why that matters for a Linux guest."""
    if not os.path.exists(dev):
        return KvmStatus(KvmKind.MISSING, f"{dev} does not exist")
    if not os.access(dev, os.R_OK | os.W_OK):
        return KvmStatus(KvmKind.NO_ACCESS, f"{dev} is not readable and writable by this user")
    if (sys_module / "kvm_pvm").exists():
        return KvmStatus(KvmKind.PVM, f"{dev} is PVM (kvm_pvm): no hardware virtualization, "
                         "Linux cannot boot")
    flags = _cpu_flags(cpuinfo)
    for module, flag in VENDOR_MODULES.items():
        if (sys_module / module).exists():
            if flag in flags:
                return KvmStatus(KvmKind.HARDWARE,
                                 f"{dev} is {module} with {flag}: Linux guests boot here")
            return KvmStatus(KvmKind.OTHER, f"{module} is loaded but the CPU has no {flag} flag")
    return KvmStatus(KvmKind.OTHER, f"{dev} is provided by neither kvm_intel nor kvm_amd")


def kvm_kind(path: str = KVM_PATH, sys_module: Path = Path("/sys/module")) -> KvmKind:
    return probe(path, sys_module=sys_module).kind


def linux_kvm_status(dev: Path = Path(KVM_PATH), cpuinfo: Path = Path("/proc/cpuinfo"),
                     sys_module: Path = Path("/sys/module")) -> tuple[bool, str]:
    """(True, why) when Linux guests can boot on `dev` here, else (False, why not)."""
    status = probe(dev, cpuinfo, sys_module)
    return status.can_boot_linux, status.why


def can_boot_linux() -> bool:
    """Whether this machine's /dev/kvm has real VT-x/AMD-V (what a Linux guest needs)."""
    return probe().can_boot_linux


def describe(kind: KvmKind, path: str = KVM_PATH) -> str:
    """One line for the user: what this /dev/kvm is and what it means."""
    return {
        KvmKind.MISSING: f"{path} does not exist: load kvm_intel/kvm_amd, or use `kvmpy lab`",
        KvmKind.NO_ACCESS: f"{path} is not accessible: join the kvm group or run as root",
        KvmKind.PVM: f"{path} is PVM (no hardware virtualization): small test guests run, "
        "Linux cannot boot here; `kvmpy lab` gives a nested VM where it can",
        KvmKind.HARDWARE: f"{path} has hardware virtualization: Linux guests boot here",
        KvmKind.OTHER: f"{path} is neither PVM nor kvm_intel/kvm_amd with VT-x/AMD-V: small "
        "test guests may run; Linux may not boot",
    }[kind]


def require_linux_kvm() -> None:
    """Refuse to build a Linux guest on a /dev/kvm that cannot run one (PVM, none)."""
    status = probe()
    if not status.can_boot_linux:
        raise KvmUnavailable(f"cannot boot Linux here: {status.why} (`make run` boots it in "
                             "the lab)")
