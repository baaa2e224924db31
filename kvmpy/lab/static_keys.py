"""Hold the lab kernel's KVM static keys on, so no kernel text is patched as VMs come and go.

Why: KVM turns four static keys on and off as VMs and vCPUs are created and destroyed
(Linux 6.1):

- `preempt_notifier_key`: on while any VM exists (kvm_create_vm/kvm_destroy_vm);
- `apic_sw_disabled`: on while any in-kernel LAPIC is software-disabled, as every new
  vCPU's is until its guest enables it;
- `apic_hw_disabled`: on while any LAPIC is disabled in its APIC base MSR;
- `kvm_has_noapic_vcpu`: on while any vCPU has no in-kernel LAPIC (flat test guests).

Each time a key's count goes between zero and one, the kernel rewrites the jump at every
place that tests it, on a live SMP kernel (text_poke_bp: an int3, IPIs, the new bytes).
Under the multi-threaded TCG of QEMU 7.2 that emulates the lab, this now and then
livelocks the lab: seen on 2026-11-26, both lab CPUs looping between the int3 handler and
the preempt-notifier jump in __schedule with interrupts off, and every process in the lab
(`timeout` included) stopped for good. A key whose count never falls to zero is never
patched again, so one process that keeps a VM of each kind open for the lab's lifetime
turns every later create and destroy into a counter update. Static keys only choose fast
paths: KVM behaves the same with them on.

`python -m kvmpy.lab.static_keys` opens the VMs, forks a child that keeps them, and
returns: the lab's command script runs it before the command.
"""

from __future__ import annotations

import os
import signal
import sys

from kvmpy.errors import KvmpyError
from kvmpy.kvm.system import Kvm
from kvmpy.kvm.vcpu import Vcpu
from kvmpy.kvm.vm import Vm

MSR_IA32_APICBASE = 0x1B
# the default base with the BSP bit and without the enable bit (11): a disabled LAPIC
APIC_BASE_DISABLED = 0xFEE00000 | 1 << 8


def hold_static_keys() -> tuple[Kvm, Vm, Vcpu, Vm, Vcpu]:
    """Open the VMs that keep all four keys on; the caller keeps what is returned."""
    kvm = Kvm()
    with_lapic = kvm.create_vm()
    with_lapic.create_irqchip()
    vcpu = with_lapic.create_vcpu(0)  # its LAPIC is software-disabled until a guest enables it
    vcpu.set_msrs([(MSR_IA32_APICBASE, APIC_BASE_DISABLED)])
    without_lapic = kvm.create_vm()
    plain_vcpu = without_lapic.create_vcpu(0)  # no irqchip: a vCPU with no in-kernel LAPIC
    return kvm, with_lapic, vcpu, without_lapic, plain_vcpu


def main() -> int:
    try:
        held = hold_static_keys()
    except (KvmpyError, OSError) as e:
        print(f"kvmpy lab: cannot hold KVM's static keys on ({e}); "
              "creating and destroying VMs may hang the lab", file=sys.stderr)
        return 0
    if os.fork():
        return 0  # the command starts now; the child keeps the VMs open
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    while held:  # until the lab powers off
        signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
