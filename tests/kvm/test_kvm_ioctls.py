"""The KVM layer's state ioctls answer on this /dev/kvm, and what is read can be written back.

These wrappers are what VM state (save, restore, migration) is made of; here each one
is called for real, on a VM with one vCPU that has not run.
"""

import pytest

from kvmpy.kvm import Kvm
from kvmpy.kvm.vcpu import MpState
from kvmpy.memory import GuestMemory

pytestmark = pytest.mark.kvm


@pytest.fixture
def vm_and_vcpu():  # type: ignore[no-untyped-def]
    kvm = Kvm()
    vm = kvm.create_vm()
    memory = GuestMemory.anonymous(1 << 20)
    vm.map_memory(memory, log_dirty=True)
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    yield kvm, vm, vcpu, memory
    vcpu.close()
    vm.close()
    kvm.close()
    memory.close()


def test_register_sets_round_trip(vm_and_vcpu) -> None:  # type: ignore[no-untyped-def]
    _, _, vcpu, _ = vm_and_vcpu
    regs = vcpu.get_regs()
    regs.rax = 0x1234
    vcpu.set_regs(regs)
    assert vcpu.get_regs().rax == 0x1234
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x37F
    vcpu.set_fpu(fpu)
    assert vcpu.get_fpu().fcw == 0x37F
    xcrs = vcpu.get_xcrs()
    vcpu.set_xcrs(xcrs)
    assert vcpu.get_xcrs().nr_xcrs == xcrs.nr_xcrs
    events = vcpu.get_vcpu_events()
    vcpu.set_vcpu_events(events)
    lapic = vcpu.get_lapic()
    vcpu.set_lapic(lapic)
    assert vcpu.get_lapic() == lapic


def test_mp_state_and_msrs(vm_and_vcpu) -> None:  # type: ignore[no-untyped-def]
    kvm, _, vcpu, _ = vm_and_vcpu
    assert vcpu.get_mp_state() == MpState.RUNNABLE  # the BSP
    vcpu.set_mp_state(MpState.RUNNABLE)
    indices = kvm.msr_index_list()  # the MSRs KVM saves for a vCPU (not EFER: it is in sregs)
    assert 0x10 in indices and 0xC0000081 in indices  # the TSC, STAR
    star = vcpu.get_msrs([0xC0000081])
    vcpu.set_msrs([(0xC0000081, 0x0023001000000000)])
    assert vcpu.get_msrs([0xC0000081]) == {0xC0000081: 0x0023001000000000} != star


def test_clock_and_dirty_log(vm_and_vcpu) -> None:  # type: ignore[no-untyped-def]
    _, vm, _, memory = vm_and_vcpu
    clock = vm.get_clock().clock
    vm.set_clock(clock + 1_000_000)
    assert vm.get_clock().clock >= clock + 1_000_000
    pages = memory.regions[0].size // 4096
    bitmap = vm.dirty_log(0, pages)
    assert len(bitmap) == (pages + 63) // 64 * 8
