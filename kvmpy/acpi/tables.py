"""Lay the ACPI tables out in guest memory: RSDP -> XSDT -> FADT (-> DSDT), MADT.

What it is: `build_acpi()` builds every table with the pure builders of this
package and writes them, in one pass, to the PC BIOS area
[layout.BIOS_START, layout.BIOS_END):

    BIOS_START  RSDP   (16-byte aligned; a kernel scanning 0xE0000-0xFFFFF finds it)
                DSDT   (AML: \\_S5, CPUs, COM1, i8042, RTC, virtio-mmio windows)
                FADT   (hardware-reduced; X_DSDT -> DSDT; sleep/reset registers)
                MADT   (local APICs, IO-APIC, NMI)
                XSDT   (-> FADT, MADT)

Each table starts on a 16-byte boundary. The result says where the RSDP is
(for boot_params.acpi_rsdp_addr or PVH's start_info.rsdp_paddr) and which
range the tables occupy (for an E820_TYPE_ACPI entry).

What it is not: boot-protocol code. It writes no boot_params, e820 map or
command line; the loader does, with what this returns.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from kvmpy import layout
from kvmpy.acpi import dsdt as dsdt_mod
from kvmpy.acpi.dsdt import VirtioMmio
from kvmpy.acpi.fadt import fadt
from kvmpy.acpi.madt import MAX_CPUS, madt
from kvmpy.acpi.rsdp import ALIGNMENT, rsdp
from kvmpy.acpi.sdt import xsdt
from kvmpy.errors import ConfigError


class MemoryWriter(Protocol):
    """What placement needs from guest memory (`kvmpy.memory.GuestMemory` is one)."""

    def write(self, gpa: int, data: bytes) -> None: ...


# NamedTuples, not dataclasses: `dataclasses` (with inspect, ast, dis) is most of this
# package's import time, which a boot with ACPI pays at start-up (docs/performance.md).
class AcpiTables(NamedTuple):
    """Where `build_acpi` put the tables."""

    rsdp_gpa: int
    start: int  # [start, end): every byte written; reserve it as ACPI data in the e820 map
    end: int
    tables: dict[str, int]  # signature -> gpa, for logs and tests


def _align(value: int, alignment: int = ALIGNMENT) -> int:
    return (value + alignment - 1) // alignment * alignment


def build_acpi(memory: MemoryWriter, n_cpus: int,
               virtio_devices: list[tuple[int, int, int]], uart: bool = True, *,
               i8042: bool = True, rtc: bool = True, virtio_edge: bool = True,
               power_button: bool = False,
               isa_overrides: list[tuple[int, int, int]] | None = None,
               base: int = layout.BIOS_START, limit: int = layout.BIOS_END) -> AcpiTables:
    """Write RSDP, XSDT, FADT, MADT and DSDT into [base, limit) of guest memory.

    `virtio_devices` are (gpa, size, gsi) per virtio-mmio window, in the order
    their _UIDs are numbered. `uart`, `i8042` and `rtc` say which legacy
    devices exist (COM1 at 0x3F8/IRQ 4, the keyboard controller at 0x60/0x64
    with IRQ 1, the CMOS RTC at 0x70); `power_button`, a Generic Event Device and the
    power button it presses (kvmpy.devices.ged). `isa_overrides` are MADT Interrupt
    Source Overrides as (ISA IRQ, GSI, INTI flags); see kvmpy.acpi.madt.
    """
    if not 1 <= n_cpus <= MAX_CPUS:
        raise ConfigError(f"ACPI tables describe 1 to {MAX_CPUS} vCPUs, not {n_cpus}")
    if base % ALIGNMENT:
        raise ConfigError(f"the RSDP must be {ALIGNMENT}-byte aligned, not at {base:#x}")
    windows = [VirtioMmio(gpa, size, gsi) for gpa, size, gsi in virtio_devices]
    _check_interrupts(windows, uart, i8042, power_button)

    # Pure tables first; every address they hold follows from the lengths.
    dsdt_table = dsdt_mod.dsdt(n_cpus, windows, uart, i8042, rtc, virtio_edge, power_button)
    madt_table = madt(n_cpus, isa_overrides)
    rsdp_gpa = base
    dsdt_gpa = _align(rsdp_gpa + len(rsdp(0)))
    fadt_gpa = _align(dsdt_gpa + len(dsdt_table))
    fadt_table = fadt(dsdt_gpa, uart=uart, i8042=i8042, rtc=rtc)
    madt_gpa = _align(fadt_gpa + len(fadt_table))
    xsdt_gpa = _align(madt_gpa + len(madt_table))
    xsdt_table = xsdt([fadt_gpa, madt_gpa])
    end = _align(xsdt_gpa + len(xsdt_table))
    if end > limit:
        raise ConfigError(f"ACPI tables need {end - base:#x} bytes, more than the "
                          f"{limit - base:#x} between {base:#x} and {limit:#x}")

    placed = [(rsdp_gpa, rsdp(xsdt_gpa)), (dsdt_gpa, dsdt_table), (fadt_gpa, fadt_table),
              (madt_gpa, madt_table), (xsdt_gpa, xsdt_table)]
    for gpa, table in placed:
        memory.write(gpa, table)
    return AcpiTables(rsdp_gpa, base, end, {"RSDP": rsdp_gpa, "DSDT": dsdt_gpa,
                                            "FACP": fadt_gpa, "APIC": madt_gpa,
                                            "XSDT": xsdt_gpa})


def _check_interrupts(windows: list[VirtioMmio], uart: bool, i8042: bool,
                      power_button: bool = False) -> None:
    """Every interrupt is declared Exclusive, so no two devices may share a GSI."""
    owners: dict[int, str] = {}
    if power_button:
        owners[layout.GED_GSI] = "GED"
    if uart:
        owners[layout.COM1_IRQ] = "COM1"
    if i8042:
        owners[dsdt_mod.I8042_KBD_IRQ] = "i8042"
    for i, w in enumerate(windows):
        if not 0 <= w.gsi < layout.IOAPIC_PINS:
            raise ConfigError(f"virtio-mmio window {i} at {w.gpa:#x}: GSI {w.gsi} is not an "
                              f"IO-APIC pin (0..{layout.IOAPIC_PINS - 1})")
        if w.gsi in owners:
            raise ConfigError(f"virtio-mmio window {i} at {w.gpa:#x}: GSI {w.gsi} is already "
                              f"used by {owners[w.gsi]}")
        if not (0 <= w.gpa and w.size > 0 and w.gpa + w.size <= 1 << 32):
            raise ConfigError(f"virtio-mmio window {i} at {w.gpa:#x}+{w.size:#x} is not "
                              "below 4 GiB (Memory32Fixed)")
        owners[w.gsi] = f"virtio-mmio window {i}"
