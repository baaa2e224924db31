"""Breakpoints and watchpoints in the x86 debug registers, as KVM_SET_GUEST_DEBUG takes them.

What it is: four slots (DR0-DR3) holding a linear address each, and DR7
built from them: a local-enable bit per slot, the condition (execute, write,
read/write) and the length (Intel SDM Vol. 3B §18.2.4, Figure 18-1). KVM
loads these into the vCPU for us with KVM_GUESTDBG_USE_HW_BP, without the
guest seeing them (Documentation/virt/kvm/api.rst, KVM_SET_GUEST_DEBUG), and
reports a hit as KVM_EXIT_DEBUG with DR6 saying which slot (B0-B3, §18.2.3)
or that it was a single step (BS).

Why gdb's software breakpoints (Z0) live here too: this machine's /dev/kvm
(PVM) emulates CPL0 code, and its emulator does not run `int3` in long mode
(KVM_EXIT_INTERNAL_ERROR) and hangs on it in real mode, so patching int3
into the guest cannot work here. A debug register matches a linear address
before any page table exists for it, which is also what breaking on
`start_kernel` needs while the kernel is still building its page tables.
The cost: at most four breakpoints and watchpoints together. With hardware
virtualization Z0 is patched into memory instead (swbreak.py): the debug
registers do not fire under QEMU TCG's nested SVM (the lab).
"""

from __future__ import annotations

from dataclasses import dataclass

# condition field values (R/W0..3), SDM Vol. 3B §18.2.4
EXECUTE, WRITE, ACCESS = 0b00, 0b01, 0b11
# length field values (LEN0..3); 8 bytes only in 64-bit mode
LENGTHS = {1: 0b00, 2: 0b01, 8: 0b10, 4: 0b11}
DR7_GE = 1 << 9  # "exact breakpoint" bits: recommended set when data breakpoints are used
DR7_LE = 1 << 8
DR7_RESERVED_ONE = 1 << 10
DR6_BS = 1 << 14  # single step
SLOTS = 4


@dataclass(frozen=True)
class HwPoint:
    kind: str  # "sw" (gdb Z0), "hw" (Z1), "write" (Z2), "access" (Z4)
    addr: int
    length: int = 1

    @property
    def condition(self) -> int:
        return {"sw": EXECUTE, "hw": EXECUTE, "write": WRITE, "access": ACCESS}[self.kind]

    @property
    def is_watch(self) -> bool:
        return self.kind in ("write", "access")


class NoSlot(Exception):
    """All four debug registers are in use."""


class DebugRegisters:
    def __init__(self) -> None:
        self.slots: list[HwPoint | None] = [None] * SLOTS

    def insert(self, point: HwPoint) -> None:
        """Add a breakpoint/watchpoint; idempotent; raises NoSlot or ValueError."""
        if point.length not in LENGTHS:
            raise ValueError(f"length {point.length} is not 1, 2, 4 or 8")
        if point.addr % point.length:
            raise ValueError(f"address {point.addr:#x} is not aligned to {point.length}")
        if point in self.slots:
            return
        for i, slot in enumerate(self.slots):
            if slot is None:
                self.slots[i] = point
                return
        raise NoSlot(f"all {SLOTS} debug registers are in use")

    def remove(self, point: HwPoint) -> bool:
        for i, slot in enumerate(self.slots):
            if slot == point:
                self.slots[i] = None
                return True
        return False

    def clear(self) -> None:
        self.slots = [None] * SLOTS

    @property
    def active(self) -> bool:
        return any(self.slots)

    def executes_at(self, addr: int) -> bool:
        return any(s is not None and not s.is_watch and s.addr == addr for s in self.slots)

    def dr7(self) -> int:
        value = DR7_RESERVED_ONE
        for i, slot in enumerate(self.slots):
            if slot is None:
                continue
            value |= 1 << (2 * i)  # L0..L3
            length = 0 if slot.condition == EXECUTE else LENGTHS[slot.length]
            value |= (slot.condition | length << 2) << (16 + 4 * i)
            if slot.is_watch:
                value |= DR7_LE | DR7_GE
        return value

    def debugreg(self) -> list[int]:
        """kvm_guest_debug.arch.debugreg: DR0-DR3, two unused, DR6, DR7."""
        addrs = [s.addr if s is not None else 0 for s in self.slots]
        return [*addrs, 0, 0, 0, self.dr7()]

    def hit(self, dr6: int) -> HwPoint | None:
        """The slot DR6 says triggered (B0-B3), if any."""
        for i, slot in enumerate(self.slots):
            if dr6 >> i & 1 and slot is not None:
                return slot
        return None
