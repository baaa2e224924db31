"""Can this machine boot Linux on its own /dev/kvm, and if not, can it run the lab?

Linux needs hardware virtualization under KVM: the vendor module (`kvm_intel` or
`kvm_amd`) loaded and the CPU flag (`vmx` or `svm`) in /proc/cpuinfo. PVM (`kvm_pvm`)
offers the same ioctls without it and cannot run a kernel (see the shared ENVIRONMENT
notes), so "a /dev/kvm exists" is not the question to ask. Inside the lab both
conditions hold (TCG's `-cpu max` has `svm`, and the lab loads `kvm_amd`).

The probe itself lives with the KVM layer (`kvmpy.kvm.detect`), which the machine uses
without knowing the lab; it is re-exported here for the lab's callers. This module only
inspects the machine; it starts nothing.
"""

from __future__ import annotations

from pathlib import Path

from kvmpy.kvm.detect import can_boot_linux, linux_kvm_status

QEMU = "qemu-system-x86_64"
DEFAULT_MEM = 2048 << 20  # the lab VM's RAM, which also bounds its writable overlay
DEFAULT_CPUS = 2
def lab_status() -> tuple[bool, str]:
    """(True, "") if the lab can be started here, else (False, the one-line reason)."""
    import shutil

    if shutil.which(QEMU) is None:
        return False, f"{QEMU} not found: install qemu-system-x86 (`make deps`)"
    if not Path("/bin/busybox").exists():
        return False, "/bin/busybox not found: install busybox-static (`make deps`)"
    return True, ""


__all__ = ["DEFAULT_CPUS", "DEFAULT_MEM", "QEMU", "can_boot_linux", "lab_status",
           "linux_kvm_status"]
