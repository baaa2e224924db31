"""Intel MultiProcessor Specification 1.4 tables, so a kernel without ACPI sees every vCPU.

What it is: the MP floating pointer structure and the MP configuration table,
written at `layout.EBDA` (the last KiB of base memory, one of the places the
spec §4 and Linux's smp_scan_config search). The table lists:

- one processor entry per vCPU: local APIC id = vCPU index, enabled, BSP on 0;
- one bus entry: bus 0, "ISA";
- one I/O APIC entry: id = number of vCPUs (the first id no CPU uses), at `layout.IOAPIC`;
- an I/O interrupt assignment per IRQ: ISA bus IRQ n -> I/O APIC pin n for the
  ISA IRQs 0-15 and the extra GSIs (up to 23) that virtio-mmio devices use.
  This matches KVM's default routing (kvm_setup_default_irq_routing: GSI n is
  pin n); Linux maps a listed pin above 15 to the same IRQ number;
- local interrupt assignments: ExtINT on LINT0 of the BSP, NMI on LINT1 of all.

Both checksums make their structure's bytes sum to zero (spec §4.1, §4.2).

What it is not: ACPI (MADT) is separate; a kernel with ACPI tables prefers them.

Sources: Intel MP Spec 1.4 §4 (Table 4-1 floating pointer, 4-2 header, 4-4..4-8
entries, 4-10/4-11 interrupt types); Linux arch/x86/include/asm/mpspec_def.h.
Learned from Firecracker's arch/x86_64/mptable.rs.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from kvmpy import layout
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory

MP_FLOATING_SIGNATURE = b"_MP_"
MP_CONFIG_SIGNATURE = b"PCMP"
MP_SPEC_REV = 4  # 1.4
OEM_ID = b"KVMPY   "  # 8 bytes
PRODUCT_ID = b"MICROVM     "  # 12 bytes

# floating pointer: signature, physptr, length (16-byte units), spec_rev, checksum,
# feature1 (0: a config table is present), feature2 (bit 7 IMCRP: 0 = virtual wire),
# feature3-5
MPF = struct.Struct("<4sIBBBBB3s")
# config table header: signature, base length, spec_rev, checksum, oem id, product id,
# oem table ptr, oem table size, entry count, local APIC address, ext length, ext checksum,
# reserved
MPC_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")
MPC_CPU = struct.Struct("<BBBBII8x")  # type, apic id, apic version, flags, signature, features
MPC_BUS = struct.Struct("<BB6s")  # type, bus id, bus type string
MPC_IOAPIC = struct.Struct("<BBBBI")  # type, id, version, flags, address
MPC_INTSRC = struct.Struct("<BBHBBBB")  # type, irq type, flags, src bus, src irq, dst id, dst pin

# entry types (spec Table 4-3)
MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3  # I/O interrupt assignment
MP_LINTSRC = 4  # local interrupt assignment

CPU_ENABLED = 1 << 0
CPU_BOOTPROCESSOR = 1 << 1
MPC_APIC_USABLE = 1 << 0

# interrupt types (spec Table 4-10)
MP_INT = 0
MP_NMI = 1
MP_SMI = 2
MP_EXTINT = 3
MP_IRQPOL_DEFAULT = 0  # polarity and trigger "conform to the bus" (ISA: edge, active high)

LAPIC_VERSION = 0x14  # KVM's local APIC version register (lapic.c APIC_VERSION)
IOAPIC_VERSION = 0x11  # KVM's I/O APIC (ioapic.h IOAPIC_VERSION_ID)
CPU_SIGNATURE = 0x600  # family 6, as Firecracker; Linux reads the real one from CPUID
CPU_FEATURE_FPU = 1 << 0
CPU_FEATURE_APIC = 1 << 9
ALL_LAPICS = 0xFF
MAX_CPUS = 254  # APIC id 255 is broadcast, and the I/O APIC takes id n_cpus

DEFAULT_IRQS: tuple[int, ...] = tuple(range(layout.IOAPIC_PINS))


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` plus itself sum to zero mod 256."""
    return -sum(data) & 0xFF


def mptable_size(n_cpus: int, n_irqs: int = len(DEFAULT_IRQS)) -> int:
    return (
        MPF.size
        + MPC_HEADER.size
        + n_cpus * MPC_CPU.size
        + MPC_BUS.size
        + MPC_IOAPIC.size
        + (n_irqs + 2) * MPC_INTSRC.size
    )


def build_mptable(
    n_cpus: int,
    *,
    gpa: int = layout.EBDA,
    irqs: Sequence[int] = DEFAULT_IRQS,
    cpu_signature: int = CPU_SIGNATURE,
) -> bytes:
    """The floating pointer followed by the configuration table, for placement at `gpa`."""
    if not 1 <= n_cpus <= MAX_CPUS:
        raise ConfigError(f"{n_cpus} vCPUs: the MP table describes 1 to {MAX_CPUS}")
    if any(not 0 <= irq < layout.IOAPIC_PINS for irq in irqs):
        raise ConfigError(f"MP table IRQs must be I/O APIC pins 0..{layout.IOAPIC_PINS - 1}")
    ioapic_id = n_cpus
    entries = []
    for cpu in range(n_cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries.append(
            MPC_CPU.pack(
                MP_PROCESSOR, cpu, LAPIC_VERSION, flags, cpu_signature,
                CPU_FEATURE_FPU | CPU_FEATURE_APIC,
            )
        )
    entries.append(MPC_BUS.pack(MP_BUS, 0, b"ISA   "))
    entries.append(MPC_IOAPIC.pack(MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE,
                                   layout.IOAPIC))
    for irq in irqs:
        entries.append(MPC_INTSRC.pack(MP_INTSRC, MP_INT, MP_IRQPOL_DEFAULT, 0, irq,
                                       ioapic_id, irq))
    entries.append(MPC_INTSRC.pack(MP_LINTSRC, MP_EXTINT, MP_IRQPOL_DEFAULT, 0, 0, 0, 0))
    entries.append(MPC_INTSRC.pack(MP_LINTSRC, MP_NMI, MP_IRQPOL_DEFAULT, 0, 0, ALL_LAPICS, 1))
    body = b"".join(entries)

    def header(csum: int) -> bytes:
        return MPC_HEADER.pack(
            MP_CONFIG_SIGNATURE, MPC_HEADER.size + len(body), MP_SPEC_REV, csum, OEM_ID,
            PRODUCT_ID, 0, 0, len(entries), layout.LAPIC, 0, 0, 0,
        )

    table = header(checksum(header(0) + body)) + body

    def floating(csum: int) -> bytes:
        return MPF.pack(MP_FLOATING_SIGNATURE, gpa + MPF.size, 1, MP_SPEC_REV, csum, 0, 0,
                        b"\0\0\0")

    return floating(checksum(floating(0))) + table


def write_mptable(
    memory: GuestMemory,
    n_cpus: int,
    *,
    gpa: int = layout.EBDA,
    limit: int = layout.EBDA_END,
    irqs: Sequence[int] = DEFAULT_IRQS,
    cpu_signature: int = CPU_SIGNATURE,
) -> int:
    """Write the MP tables at `gpa`; they must end by `limit`. Returns their size in bytes."""
    data = build_mptable(n_cpus, gpa=gpa, irqs=irqs, cpu_signature=cpu_signature)
    if gpa + len(data) > limit:
        raise ConfigError(
            f"MP table for {n_cpus} vCPUs is {len(data)} bytes, "
            f"only {limit - gpa} fit at {gpa:#x}"
        )
    memory.write(gpa, data)
    return len(data)
