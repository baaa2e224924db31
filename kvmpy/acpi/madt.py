"""The Multiple APIC Description Table (ACPI 6.5 §5.2.12): CPUs and interrupt controllers.

What it is: `madt(n_cpus, ...)` returns the MADT ("APIC") describing the
local APIC address, one enabled Processor Local APIC per vCPU (§5.2.12.2),
the IO-APIC (§5.2.12.3), any Interrupt Source Overrides (§5.2.12.5) and a
Local APIC NMI on LINT1 for every processor (§5.2.12.7). Entry builders are
public so tests and other tables can use them.

vCPU i has APIC ID i (KVM_CREATE_VCPU's id is the initial APIC ID) and ACPI
Processor UID i, which the DSDT's processor devices repeat as _UID.

Interrupt source overrides: none by default. KVM's default GSI routing maps
ISA IRQ n to IO-APIC pin n, and a hardware-reduced Linux never starts the
PIT timer on IRQ 0 anyway, so the PC convention "IRQ0 -> GSI2" would be
false here. A VMM that installs QEMU-style routing passes
`overrides=[(0, 2, 0)]`.

What it is not: x2APIC entries (APIC IDs above 254), or anything for more
than one IO-APIC.
"""

from __future__ import annotations

import struct

from kvmpy import layout
from kvmpy.acpi.sdt import sdt

REVISION = 5  # ACPI 6.2-6.4 MADT revision; the entries used here are unchanged since 1.0
PCAT_COMPAT = 1 << 0  # a dual 8259 exists too (KVM's in-kernel PIC); §5.2.12 Table 5.20

# Interrupt Controller Structure types (Table 5.21)
TYPE_LOCAL_APIC = 0
TYPE_IO_APIC = 1
TYPE_INTERRUPT_SOURCE_OVERRIDE = 2
TYPE_LOCAL_APIC_NMI = 4

LOCAL_APIC_ENABLED = 1 << 0  # Table 5.23
ALL_PROCESSORS = 0xFF  # ACPI Processor UID meaning "every processor" (§5.2.12.7)
MAX_CPUS = 255  # 8-bit APIC IDs 0..254; 0xFF is the broadcast ID

# MPS INTI flags (Table 5.26): polarity bits 0-1, trigger mode bits 2-3
INTI_CONFORMS = 0
INTI_ACTIVE_HIGH = 0b01
INTI_ACTIVE_LOW = 0b11
INTI_EDGE = 0b01 << 2
INTI_LEVEL = 0b11 << 2

IOAPIC_ID = 0  # IO-APIC and local APIC IDs are separate name spaces since the xAPIC


def local_apic(processor_uid: int, apic_id: int, enabled: bool = True) -> bytes:
    return struct.pack("<BBBBI", TYPE_LOCAL_APIC, 8, processor_uid, apic_id,
                       LOCAL_APIC_ENABLED if enabled else 0)


def io_apic(ioapic_id: int, address: int, gsi_base: int) -> bytes:
    return struct.pack("<BBBBII", TYPE_IO_APIC, 12, ioapic_id, 0, address, gsi_base)


def interrupt_source_override(source_irq: int, gsi: int, flags: int = INTI_CONFORMS) -> bytes:
    """ISA IRQ `source_irq` arrives on `gsi` (bus 0 is ISA)."""
    return struct.pack("<BBBBIH", TYPE_INTERRUPT_SOURCE_OVERRIDE, 10, 0, source_irq, gsi, flags)


def local_apic_nmi(processor_uid: int = ALL_PROCESSORS, lint: int = 1,
                   flags: int = INTI_CONFORMS) -> bytes:
    """NMI arrives on local APIC pin LINT`lint` (LINT1 on a PC)."""
    return struct.pack("<BBBHB", TYPE_LOCAL_APIC_NMI, 6, processor_uid, flags, lint)


def madt(n_cpus: int, overrides: list[tuple[int, int, int]] | None = None) -> bytes:
    """The MADT for `n_cpus` vCPUs; `overrides` are (ISA IRQ, GSI, INTI flags)."""
    if not 1 <= n_cpus <= MAX_CPUS:
        raise ValueError(f"the MADT describes 1 to {MAX_CPUS} CPUs, not {n_cpus}")
    entries = [local_apic(i, i) for i in range(n_cpus)]
    entries.append(io_apic(IOAPIC_ID, layout.IOAPIC, 0))
    entries += [interrupt_source_override(irq, gsi, flags) for irq, gsi, flags in overrides or []]
    entries.append(local_apic_nmi())
    body = struct.pack("<II", layout.LAPIC, PCAT_COMPAT) + b"".join(entries)
    return sdt(b"APIC", REVISION, body)
