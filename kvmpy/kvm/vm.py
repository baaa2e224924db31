"""A VM file descriptor: memory slots, vCPUs, the in-kernel irqchip and eventfds."""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from kvmpy.kvm.ioctl import ffi, ioctl, ioctl_val, lib
from kvmpy.kvm.vcpu import Vcpu

if TYPE_CHECKING:
    from kvmpy.kvm.system import Kvm
    from kvmpy.memory import GuestMemory


class Vm:
    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.run_size = kvm.vcpu_mmap_size()
        self._slots = 0
        self.memory_slots: list[tuple[int, int, int, int]] = []  # slot, gpa, size, host address
        self.irqchip = False
        self.pit = False
        self._msrs_to_save: list[int] | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- memory -----------------------------------------------------------
    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, host_address: int, flags: int = 0
    ) -> None:
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": gpa,
                "memory_size": size,
                "userspace_addr": host_address,
            },
        )
        ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", region)

    def map_memory(self, memory: GuestMemory, log_dirty: bool = False) -> None:
        """Register every region of `memory` as a KVM memory slot."""
        flags = lib.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        for region in memory:
            self.set_user_memory_region(self._slots, region.gpa, region.size,
                                        region.host_address, flags)
            self.memory_slots.append((self._slots, region.gpa, region.size, region.host_address))
            self._slots += 1

    def log_dirty_pages(self, on: bool = True) -> None:
        """Turn KVM's dirty-page log on or off for every slot `map_memory` made
        (KVM_SET_USER_MEMORY_REGION again, with only the flag changed)."""
        flags = lib.KVM_MEM_LOG_DIRTY_PAGES if on else 0
        for slot, gpa, size, address in self.memory_slots:
            self.set_user_memory_region(slot, gpa, size, address, flags)

    def dirty_log(self, slot: int, pages: int) -> bytes:
        """KVM_GET_DIRTY_LOG: one bit per page of the slot, cleared by the read."""
        bitmap = ffi.new("uint64_t[]", (pages + 63) // 64)
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot, "dirty_bitmap": bitmap})
        ioctl(self.fd, "KVM_GET_DIRTY_LOG", log)
        return bytes(ffi.buffer(bitmap))

    # -- x86 platform -----------------------------------------------------
    def set_tss_addr(self, gpa: int) -> None:
        ioctl_val(self.fd, "KVM_SET_TSS_ADDR", gpa)

    def set_identity_map_addr(self, gpa: int) -> None:
        addr = ffi.new("uint64_t *", gpa)
        ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", addr)

    def create_irqchip(self) -> None:
        """In-kernel PIC, IO-APIC and per-vCPU LAPICs (before creating vCPUs)."""
        ioctl(self.fd, "KVM_CREATE_IRQCHIP")
        self.irqchip = True

    def create_pit2(self) -> None:
        config = ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY})
        ioctl(self.fd, "KVM_CREATE_PIT2", config)
        self.pit = True

    def irq_line(self, gsi: int, level: bool) -> None:
        irq = ffi.new("struct kvm_irq_level *", {"irq": gsi, "level": int(level)})
        ioctl(self.fd, "KVM_IRQ_LINE", irq)

    def get_pit2(self) -> bytes:
        """KVM_GET_PIT2: the in-kernel PIT's three channels and flags (struct kvm_pit_state2)."""
        state = ffi.new("struct kvm_pit_state2 *")
        ioctl(self.fd, "KVM_GET_PIT2", state)
        return bytes(ffi.buffer(state))

    def set_pit2(self, state: bytes) -> None:
        pit = ffi.new("struct kvm_pit_state2 *")
        ffi.buffer(pit)[:] = state
        ioctl(self.fd, "KVM_SET_PIT2", pit)

    def get_irqchip(self, chip_id: int) -> bytes:
        """KVM_GET_IRQCHIP for one chip (lib.KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE, _IOAPIC):
        the whole struct kvm_irqchip, its chip_id first."""
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        ioctl(self.fd, "KVM_GET_IRQCHIP", chip)
        return bytes(ffi.buffer(chip))

    def set_irqchip(self, state: bytes) -> None:
        """KVM_SET_IRQCHIP: the chip named by the struct's own chip_id."""
        chip = ffi.new("struct kvm_irqchip *")
        ffi.buffer(chip)[:] = state
        ioctl(self.fd, "KVM_SET_IRQCHIP", chip)

    def get_clock(self) -> Any:
        """KVM_GET_CLOCK: kvmclock's nanoseconds, with `flags` saying which of
        `realtime` (host CLOCK_REALTIME) and `host_tsc` came with it."""
        data = ffi.new("struct kvm_clock_data *")
        ioctl(self.fd, "KVM_GET_CLOCK", data)
        return data

    def set_clock(self, clock_ns: int, flags: int = 0, realtime: int = 0) -> None:
        """KVM_SET_CLOCK. With lib.KVM_CLOCK_REALTIME, KVM adds the host time elapsed
        since `realtime` (a migration keeping guest time in step with the host)."""
        data = ffi.new("struct kvm_clock_data *",
                       {"clock": clock_ns, "flags": flags, "realtime": realtime})
        ioctl(self.fd, "KVM_SET_CLOCK", data)

    # -- what a vCPU's state holds --------------------------------------------------------
    @functools.cached_property
    def xsave2(self) -> bool:
        return self.kvm.check_extension("KVM_CAP_XSAVE2") > 0

    @functools.cached_property
    def xsave_size(self) -> int:
        """Bytes of a vCPU's XSAVE area: KVM_CAP_XSAVE2's answer, or struct kvm_xsave's."""
        return max(self.kvm.check_extension("KVM_CAP_XSAVE2"), ffi.sizeof("struct kvm_xsave"))

    def msrs_to_save(self, vcpu: Vcpu) -> list[int]:
        """The MSRs of KVM_GET_MSR_INDEX_LIST that KVM_GET_MSRS can read on `vcpu`.

        KVM_GET_MSRS stops at the first MSR it cannot read and says how many it
        read; that one is dropped and the rest asked again. Found once per VM.
        """
        if self._msrs_to_save is None:
            wanted = self.kvm.msr_index_list()
            readable: list[int] = []
            while wanted:
                read = vcpu.get_msrs(wanted)
                n = len(read)
                readable += wanted[:n]
                wanted = wanted[n + 1:]  # the one at n could not be read
            self._msrs_to_save = readable
        return list(self._msrs_to_save)

    # -- eventfds ---------------------------------------------------------
    def ioeventfd(self, addr: int, length: int, fd: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        """Make a guest write to `addr` signal eventfd `fd` inside KVM, with no exit."""
        flags = 0
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd, "flags": flags,
        })
        ioctl(self.fd, "KVM_IOEVENTFD", arg)

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        """Make a write to eventfd `fd` inject interrupt `gsi` (edge) without a syscall to us."""
        flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        arg = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi, "flags": flags})
        ioctl(self.fd, "KVM_IRQFD", arg)

    # -- vCPUs ------------------------------------------------------------
    def create_vcpu(self, index: int) -> Vcpu:
        return Vcpu(self, index, ioctl_val(self.fd, "KVM_CREATE_VCPU", index))
