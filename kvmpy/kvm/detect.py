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
