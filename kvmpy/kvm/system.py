"""The KVM system file descriptor (/dev/kvm): capabilities and VM creation."""

from __future__ import annotations

import os

from kvmpy.errors import KvmUnavailable
from kvmpy.kvm.detect import KVM_PATH, KvmKind, describe
from kvmpy.kvm.ioctl import ffi, ioctl, ioctl_val, lib
from kvmpy.kvm.vcpu import MAX_CPUID_ENTRIES
from kvmpy.kvm.vm import Vm

KVM_API_VERSION = 12


class Kvm:
    """An open /dev/kvm. One per process is enough; VMs keep their own fds."""

    def __init__(self, path: str = KVM_PATH) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(describe(KvmKind.MISSING, path)) from None
        except PermissionError:
            raise KvmUnavailable(describe(KvmKind.NO_ACCESS, path)) from None
        version = self.api_version()
        if version != KVM_API_VERSION:
            raise KvmUnavailable(
                f"{path}: KVM API version {version}, kvmpy needs {KVM_API_VERSION}")
        self._extensions: dict[int, int] = {}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def api_version(self) -> int:
        return ioctl_val(self.fd, "KVM_GET_API_VERSION")

    def check_extension(self, cap: str | int) -> int:
        """KVM_CHECK_EXTENSION; `cap` is a KVM_CAP_* name or number. 0 = absent.
        Asked once per capability: /dev/kvm's answers do not change, and a fast reset
        (kvmpy.state.reset) would otherwise ask one on every put-back of the clock."""
        number = getattr(lib, cap) if isinstance(cap, str) else cap
        known = self._extensions.get(number)
        if known is None:
            known = self._extensions[number] = ioctl_val(self.fd, "KVM_CHECK_EXTENSION", number)
        return known

    def vcpu_mmap_size(self) -> int:
        return ioctl_val(self.fd, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """KVM_GET_SUPPORTED_CPUID as (function, index, flags, eax, ebx, ecx, edx)."""
        # the flexible array needs room behind the header
        buf = ffi.new(
            "char[]", ffi.sizeof("struct kvm_cpuid2")
            + MAX_CPUID_ENTRIES * ffi.sizeof("struct kvm_cpuid_entry2")
        )
        cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
        cpuid.nent = MAX_CPUID_ENTRIES
        ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", cpuid)
        return [
            (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (cpuid.entries[i] for i in range(cpuid.nent))
        ]

    def msr_index_list(self) -> list[int]:
        n = 1024
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_msr_list") + 4 * n)
        lst = ffi.cast("struct kvm_msr_list *", buf)
        lst.nmsrs = n
        ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", lst)
        return [lst.indices[i] for i in range(lst.nmsrs)]

    def create_vm(self) -> Vm:
        return Vm(self, ioctl_val(self.fd, "KVM_CREATE_VM", 0))
