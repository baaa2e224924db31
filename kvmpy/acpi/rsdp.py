"""The Root System Description Pointer (ACPI 6.5 §5.2.5.3): where the OS starts.

What it is: `rsdp(xsdt_gpa)` returns the 36-byte revision-2 RSDP pointing at
the XSDT, with both checksums: the ACPI 1.0 one over the first 20 bytes and
the extended one over all 36. The RSDT address is zero: every OS that reads
revision 2 uses the XSDT, and kvmpy builds no RSDT.

What it is not: placement. On a PC the OS finds the RSDP by scanning the
first KiB of the EBDA and 0xE0000-0xFFFFF for "RSD PTR " on a 16-byte
boundary (§5.2.5.1), or is told its address (boot_params.acpi_rsdp_addr,
PVH start_info.rsdp_paddr); `kvmpy.acpi.tables` puts it there.
"""

from __future__ import annotations

import struct

from kvmpy.acpi.sdt import OEM_ID, checksum

SIGNATURE = b"RSD PTR "
REVISION = 2  # ACPI 2.0 and later: XsdtAddress and the extended checksum exist
# Signature, Checksum, OEMID, Revision, RsdtAddress, Length, XsdtAddress,
# Extended Checksum, Reserved (Table 5.3).
RSDP = struct.Struct("<8sB6sBIIQB3s")
RSDP_SIZE = RSDP.size  # 36
V1_SIZE = 20  # the part the first checksum covers
CHECKSUM_OFFSET = 8
EXTENDED_CHECKSUM_OFFSET = 32
ALIGNMENT = 16  # the OS only looks on 16-byte boundaries


def rsdp(xsdt_gpa: int) -> bytes:
    raw = bytearray(RSDP.pack(SIGNATURE, 0, OEM_ID, REVISION, 0, RSDP_SIZE, xsdt_gpa, 0,
                              bytes(3)))
    raw[CHECKSUM_OFFSET] = checksum(raw[:V1_SIZE])
    raw[EXTENDED_CHECKSUM_OFFSET] = checksum(raw)
    return bytes(raw)
