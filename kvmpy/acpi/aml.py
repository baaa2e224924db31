"""A small AML encoder: the bytes a DSDT needs to describe kvmpy's devices.

What it is: one function per AML construct kvmpy uses, each returning the
encoded bytes of that term, so that a definition block reads like the ASL it
stands for:

    device("COM1",
           hid("PNP0501"),
           uid(0),
           crs(io(0x3F8, 0x3F8, 1, 8), interrupt(4)))

encodes what `iasl` compiles from

    Device (COM1) { Name (_HID, EisaId ("PNP0501")) Name (_UID, Zero)
                    Name (_CRS, ResourceTemplate () {
                        IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08)
                        Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 4 } }) }

Integers take the smallest encoding (Zero, One, Byte/Word/DWord/QWord const),
as `iasl` does, so our bytes and the compiler's compare equal.

What it is not: an ASL compiler or an AML interpreter. Of operators and control
flow there are only the few the Generic Event Device's _EVT method needs (Store,
And, If, Notify, Local0, one operation region and its field); nothing here
evaluates anything. Invalid arguments (a bad name segment, an integer out of
range) raise `ValueError`: they are bugs in kvmpy, not guest input.

References: ACPI 6.5 §20.2 (AML grammar: §20.2.2 names, §20.2.3 data objects,
§20.2.4 PkgLength, §20.2.5 terms) and §6.4 (resource data types).
Learned from rust-vmm acpi_tables / Firecracker src/acpi-tables (aml.rs).
"""

from __future__ import annotations

import struct

Term = bytes
"""An encoded AML term (or data object); every function here returns one."""

# --- opcodes (ACPI 6.5 §20.3, AML byte stream byte values) ------------------
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX_CHAR = 0x5E  # '^'
RETURN_OP = 0xA4
OP_REGION_OP = 0x80  # after EXT_OP_PREFIX
FIELD_OP = 0x81  # after EXT_OP_PREFIX
STORE_OP = 0x70
AND_OP = 0x7B
NOTIFY_OP = 0x86
IF_OP = 0xA0
LOCAL0_OP = 0x60
NULL_NAME = 0x00

ZERO: Term = bytes([ZERO_OP])
ONE: Term = bytes([ONE_OP])
ONES: Term = bytes([ONES_OP])

# --- names (§20.2.2) --------------------------------------------------------
_LEAD_NAME_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _LEAD_NAME_CHARS | frozenset(b"0123456789")


def name_seg(seg: str) -> bytes:
    """A NameSeg: four characters, the first not a digit; ASL pads short ones with '_'."""
    raw = seg.encode("ascii", errors="replace")
    if not 1 <= len(raw) <= 4:
        raise ValueError(f"AML name segment {seg!r} must be 1 to 4 characters")
    raw = raw.ljust(4, b"_")
    if raw[0] not in _LEAD_NAME_CHARS or any(c not in _NAME_CHARS for c in raw[1:]):
        raise ValueError(f"AML name segment {seg!r}: only A-Z, 0-9 and _ (not leading digit)")
    return raw


def name_string(path: str) -> bytes:
    """A NameString: optional root '\\' or parent '^' prefixes, then a NamePath.

    "\\_SB.COM1" becomes RootChar DualNamePrefix "_SB_" "COM1"; three or more
    segments use MultiNamePrefix and a count.
    """
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = bytes([ROOT_CHAR]), rest[1:]
    else:
        while rest.startswith("^"):
            prefix, rest = prefix + bytes([PARENT_PREFIX_CHAR]), rest[1:]
    if not rest:
        if prefix == bytes([ROOT_CHAR]):
            return prefix + b"\x00"  # "\" alone: RootChar NullName
        raise ValueError(f"AML name {path!r} is empty")
    segs = [name_seg(s) for s in rest.split(".")]
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + segs[0] + segs[1]
    if len(segs) > 255:
        raise ValueError(f"AML name {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# --- PkgLength (§20.2.4) ----------------------------------------------------
PKG_LENGTH_MAX = (1 << 28) - 1


def pkg_length(body_length: int) -> bytes:
    """The PkgLength that precedes `body_length` bytes; it counts its own bytes too.

    One byte holds 0..63 in bits 0-5. Longer lengths use 1 to 3 more bytes:
    bits 6-7 of the lead byte say how many, bits 0-3 of the lead byte are the
    low nibble and each following byte the next 8 bits (lead bits 4-5 zero).
    """
    if body_length < 0:
        raise ValueError("negative AML package length")
    for extra in range(4):
        total = body_length + 1 + extra
        if extra == 0 and total <= 0x3F:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)
            rest = (total >> 4).to_bytes(extra, "little")
            return bytes([lead]) + rest
    raise ValueError(f"AML package of {body_length} bytes exceeds PkgLength's 2**28")


def decode_pkg_length(data: bytes, offset: int = 0) -> tuple[int, int]:
    """(PkgLength value, number of bytes it took): the inverse of `pkg_length`, for tests."""
    lead = data[offset]
    extra = lead >> 6
    if extra == 0:
        return lead & 0x3F, 1
    if lead & 0x30:
        raise ValueError("PkgLength lead byte bits 4-5 must be zero in a multi-byte length")
    value = lead & 0x0F
    for i in range(extra):
        value |= data[offset + 1 + i] << (4 + 8 * i)
    return value, 1 + extra


def _with_pkg_length(body: bytes) -> bytes:
    return pkg_length(len(body)) + body


# --- data objects (§20.2.3) -------------------------------------------------
def byte_const(value: int) -> Term:
    return bytes([BYTE_PREFIX]) + value.to_bytes(1, "little")


def word_const(value: int) -> Term:
    return bytes([WORD_PREFIX]) + value.to_bytes(2, "little")


def dword_const(value: int) -> Term:
    return bytes([DWORD_PREFIX]) + value.to_bytes(4, "little")


def qword_const(value: int) -> Term:
    return bytes([QWORD_PREFIX]) + value.to_bytes(8, "little")


def integer(value: int) -> Term:
    """An integer in its smallest encoding, as `iasl` emits it in a revision-2 table.

    2**64-1 becomes `Ones`, which is all-ones in the integer width of the
    table: 64 bits from DSDT revision 2, the only width that holds this value.
    """
    if not 0 <= value < 1 << 64:
        raise ValueError(f"AML integer {value} outside 0..2**64-1")
    if value == 0:
        return ZERO
    if value == 1:
        return ONE
    if value == (1 << 64) - 1:
        return ONES
    if value <= 0xFF:
        return byte_const(value)
    if value <= 0xFFFF:
        return word_const(value)
    if value <= 0xFFFF_FFFF:
        return dword_const(value)
    return qword_const(value)


def string(text: str) -> Term:
    """A String: ASCII characters 0x01-0x7F and a NUL terminator."""
    raw = text.encode("ascii")
    if b"\x00" in raw:
        raise ValueError("AML strings cannot contain NUL")
    return bytes([STRING_PREFIX]) + raw + b"\x00"


def buffer(data: bytes) -> Term:
    """A Buffer whose size is the length of `data` (DefBuffer, §20.2.5.4)."""
    return bytes([BUFFER_OP]) + _with_pkg_length(integer(len(data)) + bytes(data))


Value = int | str | bytes
"""What `name` and `package` accept: an int or str is encoded, bytes are an encoded term."""


def data(value: Value) -> Term:
    """Encode a plain Python value as an AML data object; encoded terms pass through."""
    if isinstance(value, bool):
        raise TypeError("use 0/1 (or ZERO/ONE), not bool, for AML integers")
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return string(value)
    return bytes(value)


def package(*elements: Value) -> Term:
    """A Package of up to 255 elements (DefPackage, §20.2.5.4)."""
    if len(elements) > 255:
        raise ValueError("an AML Package holds at most 255 elements (VarPackage not supported)")
    body = bytes([len(elements)]) + b"".join(data(e) for e in elements)
    return bytes([PACKAGE_OP]) + _with_pkg_length(body)


def eisa_id(text: str) -> Term:
    """ASL's EisaId("PNP0501"): three letters packed 5 bits each, four hex digits.

    The 32-bit value is stored so that its bytes read, in memory order, as
    the compressed vendor ID (big-endian) then the product ID.
    """
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"EISA ID {text!r} must be three capital letters and four hex digits")
    try:
        product = int(text[3:], 16)
    except ValueError:
        raise ValueError(f"EISA ID {text!r} must end in four hex digits") from None
    vendor = 0
    for ch in text[:3]:
        vendor = (vendor << 5) | (ord(ch) - 0x40)
    big_endian = (vendor << 16) | product
    return integer(int.from_bytes(big_endian.to_bytes(4, "big"), "little"))


# --- named objects and terms (§20.2.5) ---------------------------------------
def name(path: str, value: Value) -> Term:
    """Name (path, value): DefName."""
    return bytes([NAME_OP]) + name_string(path) + data(value)


def scope(path: str, *terms: Term) -> Term:
    """Scope (path) { terms }: DefScope."""
    return bytes([SCOPE_OP]) + _with_pkg_length(name_string(path) + b"".join(terms))


def device(path: str, *terms: Term) -> Term:
    """Device (path) { terms }: DefDevice."""
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + _with_pkg_length(body)


def method(path: str, arg_count: int, *terms: Term, serialized: bool = False,
           sync_level: int = 0) -> Term:
    """Method (path, arg_count, NotSerialized|Serialized, sync_level) { terms }."""
    if not 0 <= arg_count <= 7 or not 0 <= sync_level <= 15:
        raise ValueError("AML methods take 0-7 arguments and a sync level of 0-15")
    flags = arg_count | (int(serialized) << 3) | (sync_level << 4)
    body = name_string(path) + bytes([flags]) + b"".join(terms)
    return bytes([METHOD_OP]) + _with_pkg_length(body)


def return_(value: Value) -> Term:
    """Return (value): DefReturn."""
    return bytes([RETURN_OP]) + data(value)


# --- what a method does (§20.2.5.2-§20.2.5.4) -------------------------------------------
LOCAL0: Term = bytes([LOCAL0_OP])
SYSTEM_IO = 0x01  # RegionSpace (§19.6.100)
DWORD_ACC = 0x03  # FieldFlags AccessType (§19.6.48)
WRITE_AS_ZEROS = 0x02  # FieldFlags UpdateRule, bits 5-6


def operation_region(path: str, space: int, offset: int, length: int) -> Term:
    """OperationRegion (path, space, offset, length): DefOpRegion."""
    return (bytes([EXT_OP_PREFIX, OP_REGION_OP]) + name_string(path) + bytes([space])
            + integer(offset) + integer(length))


def field(region: str, *units: tuple[str, int], access: int = DWORD_ACC,
          update: int = WRITE_AS_ZEROS) -> Term:
    """Field (region, access, NoLock, update) { name, bits ... }: DefField, each unit a
    NamedField (NameSeg, then its width in bits in PkgLength's encoding; 1 to 63 here,
    which is one byte)."""
    if any(not 0 < bits < 64 for _, bits in units):
        raise ValueError("field units of 1 to 63 bits only")
    body = name_string(region) + bytes([access | update << 5])
    body += b"".join(name_seg(name) + bytes([bits]) for name, bits in units)
    return bytes([EXT_OP_PREFIX, FIELD_OP]) + _with_pkg_length(body)


def ref(path: str) -> Term:
    """A named object used as an operand (a NameString)."""
    return name_string(path)


def store(source: Term, target: Term) -> Term:
    """Store (source, target), which ASL also writes `target = source`: DefStore."""
    return bytes([STORE_OP]) + source + target


def and_(left: Term, right: Value) -> Term:
    """And (left, right) with no target (NullName): DefAnd."""
    return bytes([AND_OP]) + left + data(right) + bytes([NULL_NAME])


def if_(predicate: Term, *terms: Term) -> Term:
    """If (predicate) { terms }, no Else: DefIfElse."""
    return bytes([IF_OP]) + _with_pkg_length(predicate + b"".join(terms))


def notify(path: str, value: int) -> Term:
    """Notify (path, value): DefNotify."""
    return bytes([NOTIFY_OP]) + name_string(path) + integer(value)


# --- resource descriptors (§6.4) --------------------------------------------
# Small resource items carry their length in the tag byte; large items have a
# 16-bit length after it. Lengths exclude the tag (and the length field).
IO_PORT_TAG = 0x47  # small item 0x08, length 7 (§6.4.2.5)
END_TAG = 0x79  # small item 0x0F, length 1 (§6.4.2.9)
MEMORY32_FIXED_TAG = 0x86  # large item 0x06 (§6.4.3.4)
EXTENDED_INTERRUPT_TAG = 0x89  # large item 0x09 (§6.4.3.6)


def io(minimum: int, maximum: int, alignment: int, length: int, decode16: bool = True) -> bytes:
    """IO (Decode16, min, max, alignment, length): an I/O port descriptor."""
    return struct.pack("<BBHHBB", IO_PORT_TAG, int(decode16), minimum, maximum, alignment, length)


def memory32_fixed(base: int, length: int, writeable: bool = True) -> bytes:
    """Memory32Fixed (ReadWrite|ReadOnly, base, length)."""
    return struct.pack("<BHBII", MEMORY32_FIXED_TAG, 9, int(writeable), base, length)


def interrupt(*gsis: int, consumer: bool = True, edge: bool = True, active_low: bool = False,
              shared: bool = False, wake_capable: bool = False) -> bytes:
    """Interrupt (ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared) {gsis}.

    The extended interrupt descriptor names global system interrupts
    directly, so it works for GSIs above 15 where the legacy IRQ descriptor
    cannot reach.
    """
    if not 1 <= len(gsis) <= 255:
        raise ValueError("an Interrupt descriptor lists 1 to 255 interrupts")
    flags = (int(consumer) | int(edge) << 1 | int(active_low) << 2 | int(shared) << 3
             | int(wake_capable) << 4)
    body = struct.pack("<BB", flags, len(gsis)) + b"".join(struct.pack("<I", g) for g in gsis)
    return struct.pack("<BH", EXTENDED_INTERRUPT_TAG, len(body)) + body


def end_tag(descriptors: bytes = b"", compute_checksum: bool = False) -> bytes:
    """The End Tag closing a resource template.

    §6.4.2.9: a checksum of zero means "treat as valid", and that is what
    `iasl` writes; `compute_checksum` makes the whole template sum to zero.
    """
    if not compute_checksum:
        return bytes([END_TAG, 0])
    return bytes([END_TAG, (-(sum(descriptors) + END_TAG)) & 0xFF])


def resource_template(*descriptors: bytes) -> Term:
    """ResourceTemplate () { descriptors }: a Buffer of descriptors and an End Tag."""
    items = b"".join(descriptors)
    return buffer(items + end_tag(items))


# --- common device objects --------------------------------------------------
def hid(device_id: str) -> Term:
    """Name (_HID, ...): an EISA ID ("PNP0501") compressed, an ACPI ID ("LNRO0005") as a string."""
    if len(device_id) == 7:
        return name("_HID", eisa_id(device_id))
    return name("_HID", string(device_id))


def uid(value: int) -> Term:
    return name("_UID", value)


def crs(*descriptors: bytes) -> Term:
    return name("_CRS", resource_template(*descriptors))


STA_PRESENT_ENABLED_SHOWN_FUNCTIONING = 0x0F  # _STA bits 0-3 (§6.3.7)


def sta_method(status: int = STA_PRESENT_ENABLED_SHOWN_FUNCTIONING) -> Term:
    """Method (_STA) { Return (status) }."""
    return method("_STA", 0, return_(status))


def sleep_state(state: int, slp_typ_a: int, slp_typ_b: int = 0) -> Term:
    """Name (_Sx, Package { SLP_TYPa, SLP_TYPb, 0, 0 }): the values OSPM writes to sleep.

    Place it at the root of the definition block (it is \\_Sx, §7.4.2); the
    name is relative, as `iasl` encodes a root-level `\\_S5`.
    """
    if not 0 <= state <= 5:
        raise ValueError("sleep states are S0 to S5")
    return name(f"_S{state}", package(slp_typ_a, slp_typ_b, 0, 0))
