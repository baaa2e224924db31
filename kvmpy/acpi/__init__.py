"""ACPI tables for a hardware-reduced x86 platform, built in Python.

What it is: a small AML encoder (`aml`), pure table builders (`rsdp`, `sdt`
with the XSDT, `fadt`, `madt`, `dsdt`) and their placement in the BIOS area
(`tables.build_acpi`). A kernel that has no MP-table parser or no
virtio_mmio.device= support (Debian's cloud kernel) finds the vCPUs, the
IO-APIC, COM1 and the virtio-mmio windows here, and powers off and resets
through `kvmpy.devices.acpi_pm`.

What it is not: firmware. No FACS, no PCI, no SCI, no methods with logic.
"""

from __future__ import annotations

from kvmpy.lazy import lazy_exports

# `kvmpy.acpi.choice` runs on every Linux boot, the table builders only when the
# machine is described with ACPI
__all__ = ["AcpiTables", "build_acpi"]
__getattr__ = lazy_exports(__name__, {name: "kvmpy.acpi.tables" for name in __all__})
