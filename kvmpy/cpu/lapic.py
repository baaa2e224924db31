"""The local APIC's registers, named once: offsets into its 4 KiB page as KVM_GET_LAPIC
returns it (struct kvm_lapic_state), and the bits kvmpy sets or reads.

Intel SDM Vol. 3A Table 11-1 (register addresses), §11.5.1 (LVT), §11.8.4 (ISR, IRR).
"""

from __future__ import annotations

TPR = 0x080  # task priority
ISR = 0x100  # in service: eight 32-bit registers, 16 bytes apart
IRR = 0x200  # requested: the same shape
LVT_LINT0 = 0x350
LVT_LINT1 = 0x360
LVT_DELIVERY_MODE = 0x700  # bits 10:8 of an LVT entry
DM_NMI = 0x400
DM_EXTINT = 0x700


def read_u32(page: bytes | bytearray, reg: int) -> int:
    return int.from_bytes(page[reg : reg + 4], "little")


def write_u32(page: bytearray, reg: int, value: int) -> None:
    page[reg : reg + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")


def vectors(page: bytes | bytearray, reg: int) -> list[int]:
    """The vectors whose bit is set in a 256-bit register (ISR, IRR, TMR)."""
    return [32 * i + bit for i in range(8)
            for bit in range(32) if read_u32(page, reg + 16 * i) >> bit & 1]
