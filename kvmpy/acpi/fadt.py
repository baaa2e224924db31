"""The Fixed ACPI Description Table (ACPI 6.5 §5.2.9) for a hardware-reduced platform.

What it is: `fadt(dsdt_gpa, ...)` returns the 276-byte revision-6 FADT. It
sets HW_REDUCED_ACPI (§4.1): there are no PM1 event/control blocks, PM timer,
GPE blocks, SCI or FACS, so every field ACPI marks "ignored when
HW_REDUCED_ACPI" stays zero. What the OS still needs comes from:

  X_DSDT               the DSDT (the 32-bit DSDT field stays zero, as §5.2.9 asks
                       when X_DSDT is used)
  SLEEP_CONTROL_REG    8-bit I/O registers of `kvmpy.devices.acpi_pm` at
  SLEEP_STATUS_REG     layout.PM_PORT_BASE: `poweroff` writes \\_S5's SLP_TYP and
                       SLP_EN there (Linux only offers ACPI poweroff on a
                       hardware-reduced platform when both registers exist)
  RESET_REG            with RESET_REG_SUP and RESET_VALUE: `reboot` (reboot=acpi)
  IAPC_BOOT_ARCH       what legacy PC hardware exists (§5.2.9.3)
  CENTURY              the CMOS index of the RTC's century byte, when there is an
                       RTC (Linux's mc146818_get_time() reads it from here)

What it is not: a FADT for a full-hardware platform with PM1 registers and an SCI.

Learned from Firecracker src/acpi-tables/src/fadt.rs and Cloud Hypervisor's
FADT (the same sleep/reset register approach).
"""

from __future__ import annotations

import struct

from kvmpy import layout
from kvmpy.acpi.sdt import SDT_HEADER_SIZE, io_port_register, sdt
from kvmpy.devices import acpi_pm
from kvmpy.devices import rtc as rtc_device

REVISION = 6  # ACPI 6.x FADT (Major Version)
MINOR_REVISION = 5  # FADT Minor Version: ACPI 6.5
HYPERVISOR_VENDOR_IDENTITY = b"KVMPY\x00\x00\x00"  # §5.2.9: 8 bytes, ACPI 6.0+

# Fixed ACPI Description Table Fixed Feature Flags (Table 5.10)
WBINVD = 1 << 0  # required of every processor in an ACPI 2.0+ system
PROC_C1 = 1 << 2  # C1 (hlt) works on all processors
PWR_BUTTON = 1 << 4  # 1: no fixed-feature power button
SLP_BUTTON = 1 << 5  # 1: no fixed-feature sleep button
RESET_REG_SUP = 1 << 10
HW_REDUCED_ACPI = 1 << 20

# IA-PC Boot Architecture Flags (§5.2.9.3, Table 5.11)
LEGACY_DEVICES = 1 << 0  # user-visible ISA/LPC devices exist (COM1)
I8042 = 1 << 1  # a keyboard controller at ports 0x60/0x64
VGA_NOT_PRESENT = 1 << 2
MSI_NOT_SUPPORTED = 1 << 3
PCIE_ASPM_CONTROLS = 1 << 4  # 1: OSPM must not enable ASPM
CMOS_RTC_NOT_PRESENT = 1 << 5

# Table 5.9 in order: (field, struct format). Offsets follow from the
# formats ("12s" is a Generic Address Structure); the 36-byte header comes first.
FIELDS: list[tuple[str, str]] = [
    ("FIRMWARE_CTRL", "I"),
    ("DSDT", "I"),
    ("Reserved0", "B"),
    ("Preferred_PM_Profile", "B"),
    ("SCI_INT", "H"),
    ("SMI_CMD", "I"),
    ("ACPI_ENABLE", "B"),
    ("ACPI_DISABLE", "B"),
    ("S4BIOS_REQ", "B"),
    ("PSTATE_CNT", "B"),
    ("PM1a_EVT_BLK", "I"),
    ("PM1b_EVT_BLK", "I"),
    ("PM1a_CNT_BLK", "I"),
    ("PM1b_CNT_BLK", "I"),
    ("PM2_CNT_BLK", "I"),
    ("PM_TMR_BLK", "I"),
    ("GPE0_BLK", "I"),
    ("GPE1_BLK", "I"),
    ("PM1_EVT_LEN", "B"),
    ("PM1_CNT_LEN", "B"),
    ("PM2_CNT_LEN", "B"),
    ("PM_TMR_LEN", "B"),
    ("GPE0_BLK_LEN", "B"),
    ("GPE1_BLK_LEN", "B"),
    ("GPE1_BASE", "B"),
    ("CST_CNT", "B"),
    ("P_LVL2_LAT", "H"),
    ("P_LVL3_LAT", "H"),
    ("FLUSH_SIZE", "H"),
    ("FLUSH_STRIDE", "H"),
    ("DUTY_OFFSET", "B"),
    ("DUTY_WIDTH", "B"),
    ("DAY_ALRM", "B"),
    ("MON_ALRM", "B"),
    ("CENTURY", "B"),
    ("IAPC_BOOT_ARCH", "H"),
    ("Reserved1", "B"),
    ("Flags", "I"),
    ("RESET_REG", "12s"),
    ("RESET_VALUE", "B"),
    ("ARM_BOOT_ARCH", "H"),
    ("FADT_Minor_Version", "B"),
    ("X_FIRMWARE_CTRL", "Q"),
    ("X_DSDT", "Q"),
    ("X_PM1a_EVT_BLK", "12s"),
    ("X_PM1b_EVT_BLK", "12s"),
    ("X_PM1a_CNT_BLK", "12s"),
    ("X_PM1b_CNT_BLK", "12s"),
    ("X_PM2_CNT_BLK", "12s"),
    ("X_PM_TMR_BLK", "12s"),
    ("X_GPE0_BLK", "12s"),
    ("X_GPE1_BLK", "12s"),
    ("SLEEP_CONTROL_REG", "12s"),
    ("SLEEP_STATUS_REG", "12s"),
    ("Hypervisor_Vendor_Identity", "8s"),
]
BODY = struct.Struct("<" + "".join(fmt for _, fmt in FIELDS))
FADT_SIZE = SDT_HEADER_SIZE + BODY.size  # 276

SLEEP_CONTROL_PORT = layout.PM_PORT_BASE + acpi_pm.SLEEP_CONTROL
SLEEP_STATUS_PORT = layout.PM_PORT_BASE + acpi_pm.SLEEP_STATUS
RESET_PORT = layout.PM_PORT_BASE + acpi_pm.RESET


def iapc_boot_arch(uart: bool, i8042: bool, rtc: bool) -> int:
    """The IA-PC boot flags for the legacy devices kvmpy emulates; never VGA, MSI or ASPM."""
    flags = VGA_NOT_PRESENT | MSI_NOT_SUPPORTED | PCIE_ASPM_CONTROLS
    if uart or i8042:
        flags |= LEGACY_DEVICES
    if i8042:
        flags |= I8042
    if not rtc:
        flags |= CMOS_RTC_NOT_PRESENT
    return flags


def fadt(dsdt_gpa: int, *, uart: bool = True, i8042: bool = True, rtc: bool = True) -> bytes:
    values: dict[str, int | bytes] = {
        "IAPC_BOOT_ARCH": iapc_boot_arch(uart, i8042, rtc),
        "CENTURY": rtc_device.REG_CENTURY if rtc else 0,
        "Flags": WBINVD | PROC_C1 | PWR_BUTTON | SLP_BUTTON | RESET_REG_SUP | HW_REDUCED_ACPI,
        "RESET_REG": io_port_register(RESET_PORT),
        "RESET_VALUE": acpi_pm.RESET_VALUE,
        "FADT_Minor_Version": MINOR_REVISION,
        "X_DSDT": dsdt_gpa,
        "SLEEP_CONTROL_REG": io_port_register(SLEEP_CONTROL_PORT),
        "SLEEP_STATUS_REG": io_port_register(SLEEP_STATUS_PORT),
        "Hypervisor_Vendor_Identity": HYPERVISOR_VENDOR_IDENTITY,
    }
    # Everything not named above is zero: absent registers are all-zero GAS (§5.2.3.2).
    fields = [values.get(f, b"" if fmt.endswith("s") else 0) for f, fmt in FIELDS]
    return sdt(b"FACP", REVISION, BODY.pack(*fields))


def field_offset(field: str) -> int:
    """Byte offset of `field` in the table (header included), as Table 5.9 lists it."""
    fmt = "<"
    for f, field_fmt in FIELDS:
        if f == field:
            return SDT_HEADER_SIZE + struct.calcsize(fmt)
        fmt += field_fmt
    raise KeyError(field)
