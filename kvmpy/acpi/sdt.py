"""The parts every ACPI table shares: the SDT header, the checksum, the Generic Address.

What it is: pure functions from field values to bytes. `sdt()` wraps a table
body in the 36-byte System Description Table header (ACPI 6.5 §5.2.6) and
sets the checksum so the whole table sums to zero; `xsdt()` builds the
Extended System Description Table (§5.2.8) from table addresses;
`generic_address()` packs a Generic Address Structure (§5.2.3.2).

What it is not: placement. Nothing here knows where a table lands in guest
memory; `kvmpy.acpi.tables` decides that.
"""

from __future__ import annotations

import struct

# Identify kvmpy as the OEM and creator of every table (§5.2.6: OEMID is 6
# bytes, OEM Table ID 8, Creator ID 4). The OEM Table ID is "KVMP" plus the
# table's signature, so each table is told apart in a dump.
OEM_ID = b"KVMPY "
OEM_TABLE_PREFIX = b"KVMP"
OEM_REVISION = 1
CREATOR_ID = b"KVMP"
CREATOR_REVISION = 1

# Signature, Length, Revision, Checksum, OEMID, OEM Table ID, OEM Revision,
# Creator ID, Creator Revision (Table 5.4).
SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")
SDT_HEADER_SIZE = SDT_HEADER.size  # 36
CHECKSUM_OFFSET = 9
LENGTH_OFFSET = 4


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` (with that byte as zero) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A complete table: header (length and checksum filled in) followed by `body`."""
    if len(signature) != 4:
        raise ValueError(f"ACPI signature {signature!r} must be 4 bytes")
    header = SDT_HEADER.pack(signature, SDT_HEADER_SIZE + len(body), revision, 0, OEM_ID,
                             OEM_TABLE_PREFIX + signature, OEM_REVISION, CREATOR_ID,
                             CREATOR_REVISION)
    table = bytearray(header + body)
    table[CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


# --- Generic Address Structure (§5.2.3.2, Table 5.1) ---------------------------
GAS = struct.Struct("<BBBBQ")  # Address Space ID, Bit Width, Bit Offset, Access Size, Address
GAS_SIZE = GAS.size  # 12
ADDRESS_SPACE_SYSTEM_MEMORY = 0
ADDRESS_SPACE_SYSTEM_IO = 1
ACCESS_SIZE_BYTE = 1
ACCESS_SIZE_WORD = 2
ACCESS_SIZE_DWORD = 3
ACCESS_SIZE_QWORD = 4
NO_ADDRESS = bytes(GAS_SIZE)  # all zeros: "register not present"


def generic_address(space_id: int, bit_width: int, address: int, bit_offset: int = 0,
                    access_size: int = 0) -> bytes:
    return GAS.pack(space_id, bit_width, bit_offset, access_size, address)


def io_port_register(port: int) -> bytes:
    """An 8-bit register in I/O space, accessed a byte at a time."""
    return generic_address(ADDRESS_SPACE_SYSTEM_IO, 8, port, access_size=ACCESS_SIZE_BYTE)


# --- XSDT (§5.2.8) --------------------------------------------------------------
XSDT_REVISION = 1


def xsdt(table_gpas: list[int]) -> bytes:
    """The XSDT: 64-bit physical addresses of every table except the DSDT and FACS."""
    return sdt(b"XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in table_gpas))
