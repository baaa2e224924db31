"""kvmpy.lab.static_keys on this machine's /dev/kvm: the VMs that hold KVM's static keys on."""

import pytest

from kvmpy.kvm.vcpu import Vcpu
from kvmpy.kvm.vm import Vm
from kvmpy.lab.static_keys import APIC_BASE_DISABLED, MSR_IA32_APICBASE, hold_static_keys

pytestmark = pytest.mark.kvm


def test_one_vm_with_a_disabled_lapic_and_one_without_a_lapic() -> None:
    kvm, with_lapic, vcpu, without_lapic, plain_vcpu = held = hold_static_keys()
    try:
        assert isinstance(with_lapic, Vm) and isinstance(without_lapic, Vm)
        assert isinstance(vcpu, Vcpu) and isinstance(plain_vcpu, Vcpu)
        assert with_lapic.irqchip and not without_lapic.irqchip
        # KVM took the disabled APIC base: apic_hw_disabled is held too
        assert vcpu.get_msrs([MSR_IA32_APICBASE]) == {MSR_IA32_APICBASE: APIC_BASE_DISABLED}
    finally:
        for thing in reversed(held):
            thing.close()
