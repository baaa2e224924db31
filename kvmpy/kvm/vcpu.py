"""A vCPU file descriptor, its shared kvm_run page, and one method per ioctl.

Register sets come back as cffi structs (`regs.rip`, `sregs.cs.base`): read
them, change fields, hand them back. `run()` enters the guest and returns why
it came back, as a typed exit (`kvmpy.kvm.exits`).
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kvmpy.errors import KvmIoctlError
from kvmpy.kvm.exits import INTERRUPTED, RUN_IMMEDIATE_EXIT, VcpuExit, decode
from kvmpy.kvm.ioctl import ffi, ioctl, ioctl_val, lib

if TYPE_CHECKING:
    from kvmpy.kvm.vm import Vm

_run = lib.kvmpy_run
_EAGAIN, _EINTR = -errno.EAGAIN, -errno.EINTR
MAX_CPUID_ENTRIES = 256  # more than any CPU KVM supports has


class MpState(enum.IntEnum):
    """KVM_MP_STATE_* (Documentation/virt/kvm/api.rst, KVM_GET_MP_STATE)."""

    RUNNABLE = lib.KVM_MP_STATE_RUNNABLE
    UNINITIALIZED = lib.KVM_MP_STATE_UNINITIALIZED
    INIT_RECEIVED = lib.KVM_MP_STATE_INIT_RECEIVED
    HALTED = lib.KVM_MP_STATE_HALTED
    SIPI_RECEIVED = lib.KVM_MP_STATE_SIPI_RECEIVED


class Vcpu:
    def __init__(self, vm: Vm, index: int, fd: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self._mmap = mmap.mmap(fd, vm.run_size, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_page = memoryview(self._mmap)
        # the entries last given to KVM_SET_CPUID2 (KVM_GET_CPUID2 answers with some bits
        # changed at run time from registers, e.g. OSXSAVE from CR4)
        self.cpuid: list[tuple[int, int, int, int, int, int, int]] | None = None

    def close(self) -> None:
        self.run_page.release()
        self._mmap.close()
        os.close(self.fd)

    # -- running ----------------------------------------------------------
    def run(self) -> VcpuExit:
        """KVM_RUN: enter the guest (GIL released) until the next exit; returns that exit.

        EINTR (a signal, or `immediate_exit`) returns `Interrupted`.
        """
        r = _run(self.fd)
        while r == _EAGAIN:  # an AP just left wait-for-SIPI; KVM asks us to enter again
            r = _run(self.fd)
        if r < 0:
            if r == _EINTR:
                return INTERRUPTED
            raise KvmIoctlError("KVM_RUN", -r)
        return decode(self.run_page)

    def set_immediate_exit(self, value: bool) -> None:
        """Ask the next (or current, after a signal) KVM_RUN to return at once."""
        self.run_page[RUN_IMMEDIATE_EXIT] = int(value)

    # -- registers --------------------------------------------------------
    def get_regs(self) -> Any:
        regs = ffi.new("struct kvm_regs *")
        ioctl(self.fd, "KVM_GET_REGS", regs)
        return regs

    def set_regs(self, regs: Any) -> None:
        ioctl(self.fd, "KVM_SET_REGS", regs)

    def get_sregs(self) -> Any:
        sregs = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, "KVM_GET_SREGS", sregs)
        return sregs

    def set_sregs(self, sregs: Any) -> None:
        ioctl(self.fd, "KVM_SET_SREGS", sregs)

    def get_sregs2(self) -> Any:
        """KVM_GET_SREGS2 (KVM_CAP_SREGS2): sregs plus the PAE PDPTRs, no interrupt bitmap."""
        sregs = ffi.new("struct kvm_sregs2 *")
        ioctl(self.fd, "KVM_GET_SREGS2", sregs)
        return sregs

    def set_sregs2(self, sregs: Any) -> None:
        ioctl(self.fd, "KVM_SET_SREGS2", sregs)

    def get_fpu(self) -> Any:
        fpu = ffi.new("struct kvm_fpu *")
        ioctl(self.fd, "KVM_GET_FPU", fpu)
        return fpu

    def set_fpu(self, fpu: Any) -> None:
        ioctl(self.fd, "KVM_SET_FPU", fpu)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        msrs, _keep = _msrs([(i, 0) for i in indices])
        n = ioctl(self.fd, "KVM_GET_MSRS", msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(n)}

    def set_msrs(self, values: list[tuple[int, int]]) -> None:
        self.msrs_setter(values)()

    def msrs_setter(self, values: list[tuple[int, int]]) -> Callable[[], None]:
        """What sets these MSRs, as often as asked: the struct KVM reads is built once
        (a fast reset puts the same MSRs back after every input)."""
        struct = _msrs(values)  # (the struct and its buffer: the closure keeps both)

        def put() -> None:
            n = ioctl(self.fd, "KVM_SET_MSRS", struct[0])
            if n != len(values):
                bad = values[n][0]
                raise KvmIoctlError(f"KVM_SET_MSRS (MSR {bad:#x} refused)", 22)

        return put

    def set_msrs_upto(self, values: list[tuple[int, int]]) -> int:
        """KVM_SET_MSRS: KVM sets them in order up to the first it refuses; how many."""
        msrs, _keep = _msrs(values)
        return int(ioctl(self.fd, "KVM_SET_MSRS", msrs))

    def set_cpuid2(self, entries: Sequence[tuple[int, int, int, int, int, int, int]]) -> None:
        """Entries are (function, index, flags, eax, ebx, ecx, edx)."""
        entry_size = ffi.sizeof("struct kvm_cpuid_entry2")
        size = ffi.sizeof("struct kvm_cpuid2") + len(entries) * entry_size
        buf = ffi.new("char[]", size)
        cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
        cpuid.nent = len(entries)
        for i, (function, index, flags, eax, ebx, ecx, edx) in enumerate(entries):
            e = cpuid.entries[i]
            e.function, e.index, e.flags = function, index, flags
            e.eax, e.ebx, e.ecx, e.edx = eax, ebx, ecx, edx
        ioctl(self.fd, "KVM_SET_CPUID2", cpuid)
        self.cpuid = [tuple(e) for e in entries]  # type: ignore[misc]

    def get_cpuid2(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """KVM_GET_CPUID2: the entries this vCPU has, as `set_cpuid2` takes them."""
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2")
                      + MAX_CPUID_ENTRIES * ffi.sizeof("struct kvm_cpuid_entry2"))
        cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
        cpuid.nent = MAX_CPUID_ENTRIES
        ioctl(self.fd, "KVM_GET_CPUID2", cpuid)
        return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (cpuid.entries[i] for i in range(cpuid.nent))]

    def get_xsave(self) -> bytes:
        """The FPU, SSE, AVX... state in XSAVE layout: KVM_GET_XSAVE2 when the VM has
        KVM_CAP_XSAVE2 (its size may pass 4 KiB, e.g. with AMX), else KVM_GET_XSAVE."""
        size = self.vm.xsave_size
        buf = ffi.new("char[]", size)
        ioctl(self.fd, "KVM_GET_XSAVE2" if self.vm.xsave2 else "KVM_GET_XSAVE", buf)
        return bytes(ffi.buffer(buf))

    def set_xsave(self, state: bytes) -> None:
        """KVM_SET_XSAVE (which takes KVM_CAP_XSAVE2's size when the VM has it)."""
        if len(state) != self.vm.xsave_size:
            raise ValueError(f"XSAVE area of {len(state)} bytes; this VM's is "
                             f"{self.vm.xsave_size}")
        buf = ffi.new("char[]", state)
        ioctl(self.fd, "KVM_SET_XSAVE", buf)

    def get_debugregs(self) -> Any:
        regs = ffi.new("struct kvm_debugregs *")
        ioctl(self.fd, "KVM_GET_DEBUGREGS", regs)
        return regs

    def set_debugregs(self, regs: Any) -> None:
        ioctl(self.fd, "KVM_SET_DEBUGREGS", regs)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest TSC's frequency."""
        return ioctl_val(self.fd, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ (KVM_CAP_TSC_CONTROL): scale the guest TSC to `khz`."""
        ioctl_val(self.fd, "KVM_SET_TSC_KHZ", khz)

    def kvmclock_ctrl(self) -> None:
        """KVM_KVMCLOCK_CTRL: tell the guest's kvmclock it was paused by the host, so its
        soft-lockup watchdog does not count the pause. EINVAL when the guest never
        enabled kvmclock (a flat guest), which is not an error."""
        ioctl_val(self.fd, "KVM_KVMCLOCK_CTRL")

    def get_lapic(self) -> bytes:
        lapic = ffi.new("struct kvm_lapic_state *")
        ioctl(self.fd, "KVM_GET_LAPIC", lapic)
        return bytes(ffi.buffer(lapic))

    def set_lapic(self, state: bytes) -> None:
        lapic = ffi.new("struct kvm_lapic_state *")
        ffi.buffer(lapic)[:] = state
        ioctl(self.fd, "KVM_SET_LAPIC", lapic)

    def get_xcrs(self) -> Any:
        xcrs = ffi.new("struct kvm_xcrs *")
        ioctl(self.fd, "KVM_GET_XCRS", xcrs)
        return xcrs

    def set_xcrs(self, xcrs: Any) -> None:
        ioctl(self.fd, "KVM_SET_XCRS", xcrs)

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: an `MpState` (or a number kvmpy has no name for)."""
        state = ffi.new("struct kvm_mp_state *")
        ioctl(self.fd, "KVM_GET_MP_STATE", state)
        return int(state.mp_state)

    def set_mp_state(self, value: int) -> None:
        ioctl(self.fd, "KVM_SET_MP_STATE", ffi.new("struct kvm_mp_state *", {"mp_state": value}))

    def get_vcpu_events(self) -> bytes:
        events = ffi.new("struct kvm_vcpu_events *")
        ioctl(self.fd, "KVM_GET_VCPU_EVENTS", events)
        return bytes(ffi.buffer(events))

    def set_vcpu_events(self, state: bytes) -> None:
        events = ffi.new("struct kvm_vcpu_events *")
        ffi.buffer(events)[:] = state
        ioctl(self.fd, "KVM_SET_VCPU_EVENTS", events)

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        """KVM_SET_GUEST_DEBUG; control is a mask of KVM_GUESTDBG_* from `lib`."""
        dbg = ffi.new("struct kvm_guest_debug *", {"control": control})
        for i, value in enumerate(debugreg or []):
            dbg.arch.debugreg[i] = value
        ioctl(self.fd, "KVM_SET_GUEST_DEBUG", dbg)

    def translate(self, gva: int) -> int | None:
        """KVM_TRANSLATE: guest-virtual to guest-physical with the vCPU's page tables."""
        tr = ffi.new("struct kvm_translation *", {"linear_address": gva})
        ioctl(self.fd, "KVM_TRANSLATE", tr)
        return int(tr.physical_address) if tr.valid else None


def _msrs(values: list[tuple[int, int]]) -> tuple[Any, Any]:
    """A struct kvm_msrs and the buffer behind it (keep both alive for the call)."""
    size = ffi.sizeof("struct kvm_msrs") + len(values) * ffi.sizeof("struct kvm_msr_entry")
    buf = ffi.new("char[]", size)
    msrs = ffi.cast("struct kvm_msrs *", buf)
    msrs.nmsrs = len(values)
    for i, (index, data) in enumerate(values):
        msrs.entries[i].index = index
        msrs.entries[i].data = data
    return msrs, buf
