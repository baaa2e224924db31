"""Segment descriptors: the same segment written to the GDT and to KVM_SET_SREGS.

In protected and long mode the CPU caches each segment register's descriptor;
KVM_SET_SREGS loads that cache directly, but the GDT in guest memory must say
the same thing, because the guest reloads selectors (and an interrupt or a
far jump reads the GDT). So one `Segment` value produces both.

Intel SDM Vol. 3A §3.4.5 (segment descriptors), §7.2.3 (64-bit TSS descriptor).
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

# Descriptor type field (SDM Table 3-1) for code/data (S=1) and system (S=0) segments.
TYPE_DATA_RW = 0x3  # read/write, accessed
TYPE_CODE_RX = 0xB  # execute/read, accessed
TYPE_TSS_BUSY = 0xB  # 32/64-bit TSS (busy), S=0
TYPE_LDT = 0x2


class Segment(NamedTuple):
    selector: int
    base: int = 0
    limit: int = 0xFFFFFFFF  # in bytes; encoded with G=1 when larger than 1 MiB
    type: int = TYPE_DATA_RW
    s: int = 1  # 1 = code/data, 0 = system (TSS, LDT)
    dpl: int = 0
    present: int = 1
    db: int = 1  # 32-bit default operand size (must be 0 for a 64-bit code segment)
    l: int = 0  # 64-bit code segment  # noqa: E741 (the SDM's name)
    avl: int = 0

    @property
    def g(self) -> int:
        return 1 if self.limit > 0xFFFFF else 0

    def descriptor(self) -> bytes:
        """The 8-byte GDT entry (16 bytes for a 64-bit system segment)."""
        limit = self.limit >> 12 if self.g else self.limit
        access = self.type | (self.s << 4) | (self.dpl << 5) | (self.present << 7)
        flags = (self.avl) | (self.l << 1) | (self.db << 2) | (self.g << 3)
        low = (
            (limit & 0xFFFF)
            | ((self.base & 0xFFFFFF) << 16)
            | (access << 40)
            | (((limit >> 16) & 0xF) << 48)
            | (flags << 52)
            | (((self.base >> 24) & 0xFF) << 56)
        )
        if self.s == 0:  # 64-bit TSS/LDT descriptors carry base[63:32] in a second qword
            return struct.pack("<QQ", low, self.base >> 32)
        return struct.pack("<Q", low)

    def load_into(self, kvm_segment: Any) -> None:
        """Fill a `struct kvm_segment` (the vCPU's descriptor cache) from this segment."""
        kvm_segment.base = self.base
        kvm_segment.limit = self.limit
        kvm_segment.selector = self.selector
        kvm_segment.type = self.type
        kvm_segment.present = self.present
        kvm_segment.dpl = self.dpl
        kvm_segment.db = self.db
        kvm_segment.s = self.s
        kvm_segment.l = self.l
        kvm_segment.g = self.g
        kvm_segment.avl = self.avl
        kvm_segment.unusable = 0


def build_gdt(segments: list[Segment]) -> bytes:
    """A GDT with a null descriptor and each segment at its selector's index."""
    table = bytearray(8)
    for seg in sorted(segments, key=lambda s: s.selector):
        index = seg.selector & ~7
        if index < len(table):
            raise ValueError(f"selector {seg.selector:#x} overlaps an earlier descriptor")
        table.extend(bytes(index - len(table)))
        table.extend(seg.descriptor())
    return bytes(table)


def parse_descriptor(raw: bytes) -> Segment:
    """Decode an 8-byte code/data descriptor (for tests and diagnostics)."""
    (low,) = struct.unpack("<Q", raw[:8])
    limit = (low & 0xFFFF) | (((low >> 48) & 0xF) << 16)
    base = ((low >> 16) & 0xFFFFFF) | (((low >> 56) & 0xFF) << 24)
    access = (low >> 40) & 0xFF
    flags = (low >> 52) & 0xF
    if flags & 0x8:
        limit = (limit << 12) | 0xFFF
    return Segment(
        selector=0, base=base, limit=limit, type=access & 0xF, s=(access >> 4) & 1,
        dpl=(access >> 5) & 3, present=access >> 7, db=(flags >> 2) & 1, l=(flags >> 1) & 1,
        avl=flags & 1,
    )
