"""Can this machine run the lab, and with what: QEMU, busybox, the lab VM's size.

Whether Linux can boot on this machine's own /dev/kvm (so that no lab is needed) is
the KVM layer's question (`kvmpy.kvm.detect.probe`), which the machine asks without
knowing the lab; its answers are re-exported here for the lab's callers. This module
only inspects the machine; it starts nothing.
"""

from __future__ import annotations

from pathlib import Path

from kvmpy.kvm.detect import can_boot_linux, linux_kvm_status

QEMU = "qemu-system-x86_64"
DEFAULT_MEM = 2048 << 20  # the lab VM's RAM, which also bounds its writable overlay
# One CPU: TCG's multi-threaded emulation of SVM kills about one nested guest in 100-250
# with two lab CPUs and none in the soak with one (docs/lab.md, "The soak"); a host with
# more cores runs more labs side by side instead (tests/lab_plugin.py).
DEFAULT_CPUS = 1


def lab_status() -> tuple[bool, str]:
    """(True, "") if the lab can be started here, else (False, the one-line reason)."""
    import shutil  # here: `kvmpy run` imports this module, and shutil costs start-up

    if shutil.which(QEMU) is None:
        return False, f"{QEMU} not found: install qemu-system-x86 (`make deps`)"
    if not Path("/bin/busybox").exists():
        return False, "/bin/busybox not found: install busybox-static (`make deps`)"
    return True, ""


__all__ = ["DEFAULT_CPUS", "DEFAULT_MEM", "QEMU", "can_boot_linux", "lab_status",
           "linux_kvm_status"]
