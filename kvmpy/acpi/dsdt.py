"""The Differentiated System Description Table (ACPI 6.5 §5.2.11.1): kvmpy's devices in AML.

What it is: `dsdt(...)` returns the DSDT, a definition block whose AML is,
in ASL:

    DefinitionBlock ("", "DSDT", 2, "KVMPY ", "KVMPDSDT", 1) {
        Name (\\_S5, Package () { 5, 5, 0, 0 })        // poweroff: SLP_TYP for acpi_pm
        Scope (\\_SB) {
            Device (C000) { Name (_HID, "ACPI0007") Name (_UID, 0) }    // one per vCPU
            Device (COM1) { Name (_HID, EisaId ("PNP0501")) Name (_UID, 0)
                            Name (_CRS, ResourceTemplate () {
                                IO (Decode16, 0x3F8, 0x3F8, 1, 8)  Interrupt (...) { 4 } }) }
            Device (PS2K) { ... PNP0303, IO 0x60, IO 0x64, Interrupt { 1 } }
            Device (RTC_) { ... PNP0B00, IO 0x70 (2 ports), no interrupt }
            Device (V000) { Name (_HID, "LNRO0005") Name (_UID, 0)       // one per
                            Name (_CRS, ResourceTemplate () {               // virtio-mmio
                                Memory32Fixed (ReadWrite, base, size)       // window
                                Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }
                            }) }
        }
    }

Why each part: Linux's virtio_mmio driver matches "LNRO0005" and takes its
window and interrupt from _CRS, which is how a kernel without
virtio_mmio.device= finds the devices. On a hardware-reduced platform Linux
maps no ISA IRQ by itself (no legacy PIC), so legacy devices reach their
interrupts only through the _CRS of a PNP device: COM1 needs its PNP0501
entry for ttyS0 to get IRQ 4, the keyboard its PNP0303 for IRQ 1. The RTC
raises no interrupt in kvmpy, so its PNP0B00 has none and rtc_cmos runs
without alarms. Processor devices (ACPI0007, _UID = the MADT's ACPI
Processor UID) let the ACPI processor driver bind each CPU.

With `power_button`, also a power button and the Generic Event Device that presses it
(kvmpy.devices.ged):

            Device (GED_) { Name (_HID, "ACPI0013") Name (_UID, 0)
                            Name (_CRS, ResourceTemplate () { Interrupt (...) { 3 } })
                            OperationRegion (EREG, SystemIO, 0x604, 4)
                            Field (EREG, DWordAcc, NoLock, WriteAsZeros) { ESEL, 32 }
                            Method (_EVT, 1, Serialized) {
                                Local0 = ESEL
                                If (Local0 & 1) { Notify (PWRB, 0x80) } } }
            Device (PWRB) { Name (_HID, EisaId ("PNP0C0C")) Name (_UID, 0) }

What it is not: PCI, hotplug, or any method with more logic than _EVT's.
"""

from __future__ import annotations

from typing import NamedTuple

from kvmpy import layout
from kvmpy.acpi import aml
from kvmpy.acpi.sdt import sdt
from kvmpy.devices import acpi_pm, ged

# Revision 2 and above: AML integers are 64-bit (§5.2.11.1, §19.6.29)
REVISION = 2

COM1_IO_LEN = 8
I8042_DATA_PORT = layout.I8042_PORT
I8042_COMMAND_PORT = layout.I8042_PORT + 4
I8042_KBD_IRQ = 1  # ISA IRQ 1, which KVM's default routing sends to GSI 1
RTC_IO_LEN = 2


class VirtioMmio(NamedTuple):
    """One virtio-mmio window: where it is and which GSI it raises."""

    gpa: int
    size: int
    gsi: int


def virtio_mmio_device(index: int, dev: VirtioMmio, edge: bool = True) -> bytes:
    """Device (V<index>) with _HID "LNRO0005", the form Linux's virtio_mmio matches."""
    return aml.device(
        f"V{index:03d}",
        aml.hid("LNRO0005"),
        aml.uid(index),
        aml.crs(aml.memory32_fixed(dev.gpa, dev.size),
                aml.interrupt(dev.gsi, edge=edge)),
    )


def com1_device() -> bytes:
    return aml.device(
        "COM1",
        aml.hid("PNP0501"),  # 16550A-compatible UART
        aml.uid(0),
        aml.crs(aml.io(layout.COM1_PORT, layout.COM1_PORT, 1, COM1_IO_LEN),
                aml.interrupt(layout.COM1_IRQ)),
    )


def i8042_device() -> bytes:
    return aml.device(
        "PS2K",
        aml.hid("PNP0303"),  # IBM enhanced (101/102-key) keyboard controller
        aml.uid(0),
        aml.crs(aml.io(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1),
                aml.io(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1),
                aml.interrupt(I8042_KBD_IRQ)),
    )


def rtc_device() -> bytes:
    return aml.device(
        "RTC",
        aml.hid("PNP0B00"),  # AT real-time clock
        aml.uid(0),
        aml.crs(aml.io(layout.RTC_PORT, layout.RTC_PORT, 1, RTC_IO_LEN)),
    )


def ged_device() -> bytes:
    """The Generic Event Device (ACPI 6.5 §5.6.9): its _EVT reads the event selector
    (reading clears it) and turns each bit into a Notify."""
    return aml.device(
        "GED",
        aml.hid("ACPI0013"),
        aml.uid(0),
        aml.crs(aml.interrupt(layout.GED_GSI)),
        aml.operation_region("EREG", aml.SYSTEM_IO, layout.GED_PORT, ged.REGISTER_SIZE),
        aml.field("EREG", ("ESEL", 8 * ged.REGISTER_SIZE)),
        aml.method("_EVT", 1,
                   aml.store(aml.ref("ESEL"), aml.LOCAL0),
                   aml.if_(aml.and_(aml.LOCAL0, ged.POWER_BUTTON),
                           aml.notify("PWRB", POWER_BUTTON_PRESSED)),
                   serialized=True),
    )


POWER_BUTTON_PRESSED = 0x80  # the power button's Notify value (§4.8.3.1.1)


def power_button_device() -> bytes:
    """A control-method power button (PNP0C0C), pressed by the GED's Notify."""
    return aml.device("PWRB", aml.hid("PNP0C0C"), aml.uid(0))


def processor_device(uid: int) -> bytes:
    """Device (Cnnn) with _HID "ACPI0007" (§8.4): the namespace half of a MADT entry."""
    return aml.device(f"C{uid:03X}", aml.hid("ACPI0007"), aml.uid(uid))


def s5_object() -> bytes:
    """\\_S5: the SLP_TYP that `kvmpy.devices.acpi_pm` turns into poweroff (§7.4.2.6)."""
    return aml.sleep_state(5, acpi_pm.SLP_TYP_S5, acpi_pm.SLP_TYP_S5)


def dsdt_aml(n_cpus: int, virtio_devices: list[VirtioMmio], uart: bool = True,
             i8042: bool = True, rtc: bool = True, virtio_edge: bool = True,
             power_button: bool = False) -> bytes:
    """The DSDT's AML (no header): \\_S5 then \\_SB with every device."""
    devices = [processor_device(i) for i in range(n_cpus)]
    if power_button:
        devices += [ged_device(), power_button_device()]
    if uart:
        devices.append(com1_device())
    if i8042:
        devices.append(i8042_device())
    if rtc:
        devices.append(rtc_device())
    devices += [virtio_mmio_device(i, d, edge=virtio_edge) for i, d in enumerate(virtio_devices)]
    # Root-level names are relative ("_SB", not "\\_SB"): the same object, and
    # the bytes `iasl` emits for it, so the two compare equal.
    return s5_object() + aml.scope("_SB", *devices)


def dsdt(n_cpus: int, virtio_devices: list[VirtioMmio], uart: bool = True, i8042: bool = True,
         rtc: bool = True, virtio_edge: bool = True, power_button: bool = False) -> bytes:
    return sdt(b"DSDT", REVISION, dsdt_aml(n_cpus, virtio_devices, uart, i8042, rtc,
                                           virtio_edge, power_button))
