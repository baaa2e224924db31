"""The KVM layer: one Python type per file descriptor (system, VM, vCPU).

Only this package imports the cffi shim `kvmpy._kvm`. Each ioctl has one
method; a failing ioctl raises `KvmIoctlError` with its name and errno.

Learned from rust-vmm kvm-ioctls (src/ioctls/system.rs, vm.rs, vcpu.rs).
"""

from kvmpy.kvm.exits import ExitReason
from kvmpy.kvm.system import Kvm
from kvmpy.kvm.vcpu import Vcpu
from kvmpy.kvm.vm import Vm

__all__ = ["ExitReason", "Kvm", "Vcpu", "Vm"]
