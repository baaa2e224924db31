"""What kind of /dev/kvm this machine has, said in one line.

PVM (the `kvm_pvm` module) runs guests without hardware virtualization: small
test guests work, but KVM's instruction emulator cannot run a Linux kernel.
Users need to know that before they wait for a boot that will never come.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

KVM_PATH = "/dev/kvm"


class KvmKind(enum.Enum):
    MISSING = "missing"
    NO_ACCESS = "no-access"
    PVM = "pvm"
    HARDWARE = "hardware"  # kvm_intel or kvm_amd: VT-x / AMD-V


def kvm_kind(path: str = KVM_PATH, sys_module: Path = Path("/sys/module")) -> KvmKind:
    if not os.path.exists(path):
        return KvmKind.MISSING
    if not os.access(path, os.R_OK | os.W_OK):
        return KvmKind.NO_ACCESS
    if (sys_module / "kvm_pvm").exists():
        return KvmKind.PVM
    return KvmKind.HARDWARE


def describe(kind: KvmKind, path: str = KVM_PATH) -> str:
    """One line for the user: what this /dev/kvm is and what it means."""
    return {
        KvmKind.MISSING: f"{path} does not exist: load kvm_intel/kvm_amd, or use `kvmpy lab`",
        KvmKind.NO_ACCESS: f"{path} is not accessible: join the kvm group or run as root",
        KvmKind.PVM: f"{path} is PVM (no hardware virtualization): small test guests run, "
        "Linux cannot boot here; `kvmpy lab` gives a nested VM where it can",
        KvmKind.HARDWARE: f"{path} has hardware virtualization: Linux guests boot here",
    }[kind]


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


def linux_kvm_status(dev: Path = Path(KVM_PATH), cpuinfo: Path = Path("/proc/cpuinfo"),
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


def require_linux_kvm() -> None:
    """Refuse to build a Linux guest on a /dev/kvm that cannot run one (PVM, none)."""
    from kvmpy.errors import KvmUnavailable

    can_boot, why = linux_kvm_status()
    if not can_boot:
        raise KvmUnavailable(f"cannot boot Linux here: {why} (`make run` boots it in the lab)")
