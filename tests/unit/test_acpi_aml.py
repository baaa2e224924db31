"""The AML encoder: property tests of its encodings, and byte equality with `iasl`."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.acpi import aml, iasl

needs_iasl = pytest.mark.skipif(not iasl.available(), reason="iasl (acpica-tools) not installed")


# --- a tiny decoder for the data objects, written from the spec, to check the encoder ----------
def decode_integer(term: bytes) -> tuple[int, int]:
    """(value, bytes used) of an integer data object (ACPI 6.5 §20.2.3)."""
    op = term[0]
    if op == aml.ZERO_OP:
        return 0, 1
    if op == aml.ONE_OP:
        return 1, 1
    if op == aml.ONES_OP:
        return (1 << 64) - 1, 1
    width = {aml.BYTE_PREFIX: 1, aml.WORD_PREFIX: 2, aml.DWORD_PREFIX: 4,
             aml.QWORD_PREFIX: 8}[op]
    return int.from_bytes(term[1:1 + width], "little"), 1 + width


# --- PkgLength ---------------------------------------------------------------------------------
@given(st.integers(0, aml.PKG_LENGTH_MAX - 4))
def test_pkg_length_round_trips_and_counts_itself(body_length):
    encoded = aml.pkg_length(body_length)
    value, used = aml.decode_pkg_length(encoded + bytes(4))
    assert used == len(encoded)
    assert value == body_length + len(encoded)


@given(st.integers(0, aml.PKG_LENGTH_MAX - 4))
def test_pkg_length_is_minimal_and_well_formed(body_length):
    encoded = aml.pkg_length(body_length)
    total = body_length + len(encoded)
    # The smallest encoding that can hold the total (which includes itself).
    limits = [0x3F, (1 << 12) - 1, (1 << 20) - 1, (1 << 28) - 1]
    assert len(encoded) == next(n for n in range(1, 5)
                                if body_length + n <= limits[n - 1])
    assert encoded[0] >> 6 == len(encoded) - 1
    if len(encoded) > 1:
        assert encoded[0] & 0x30 == 0  # bits 4-5 reserved in multi-byte form
    assert total <= aml.PKG_LENGTH_MAX


@pytest.mark.parametrize("body_length, expected", [
    (0, b"\x01"), (62, b"\x3f"), (63, b"\x41\x04"), (4093, b"\x4f\xff"),
    (4094, b"\x81\x00\x01"),
])
def test_pkg_length_boundaries(body_length, expected):
    assert aml.pkg_length(body_length) == expected


def test_pkg_length_rejects_what_cannot_be_encoded():
    with pytest.raises(ValueError):
        aml.pkg_length(aml.PKG_LENGTH_MAX)
    with pytest.raises(ValueError):
        aml.pkg_length(-1)


# --- integers ------------------------------------------------------------------------------------
@given(st.integers(0, (1 << 64) - 1))
def test_integer_round_trips_in_smallest_form(value):
    term = aml.integer(value)
    decoded, used = decode_integer(term)
    assert decoded == value and used == len(term)
    if value <= 1 or value == (1 << 64) - 1:
        assert len(term) == 1
    else:
        width = len(term) - 1
        assert width in (1, 2, 4, 8)
        assert value >= 1 << (8 * {1: 0, 2: 1, 4: 2, 8: 4}[width])  # no smaller prefix fits


@given(st.one_of(st.integers(max_value=-1), st.integers(min_value=1 << 64)))
def test_integer_out_of_range_is_refused(value):
    with pytest.raises(ValueError):
        aml.integer(value)


def test_fixed_width_constants():
    assert aml.byte_const(5) == b"\x0a\x05"
    assert aml.word_const(0x1234) == b"\x0b\x34\x12"
    assert aml.dword_const(0xD0000000) == b"\x0c\x00\x00\x00\xd0"
    assert aml.qword_const(1 << 32) == b"\x0e" + (1 << 32).to_bytes(8, "little")
    assert (aml.ZERO, aml.ONE, aml.ONES) == (b"\x00", b"\x01", b"\xff")


# --- names ---------------------------------------------------------------------------------------
name_segs = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=1).flatmap(
    lambda lead: st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789", max_size=3).map(
        lambda rest: lead + rest))


@given(st.lists(name_segs, min_size=1, max_size=6), st.booleans())
def test_name_string_layout(segs, rooted):
    path = ("\\" if rooted else "") + ".".join(segs)
    encoded = aml.name_string(path)
    rest = encoded[1:] if rooted else encoded
    if rooted:
        assert encoded[0] == aml.ROOT_CHAR
    if len(segs) == 1:
        body = rest
    elif len(segs) == 2:
        assert rest[0] == aml.DUAL_NAME_PREFIX
        body = rest[1:]
    else:
        assert rest[:2] == bytes([aml.MULTI_NAME_PREFIX, len(segs)])
        body = rest[2:]
    assert body == b"".join(s.ljust(4, "_").encode() for s in segs)


@pytest.mark.parametrize("bad", ["", "1ABC", "ABCDE", "ab", "A-B", "_SB..X", "\u00e9"])
def test_bad_names_are_refused(bad):
    with pytest.raises(ValueError):
        aml.name_string(bad)


def test_parent_prefix_and_root_alone():
    assert aml.name_string("^^ABCD") == b"^^ABCD"
    assert aml.name_string("\\") == b"\\\x00"


# --- EISA IDs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [
    ("PNP0501", 0x0105D041),  # the values `iasl` and every BIOS produce
    ("PNP0303", 0x0303D041),
    ("PNP0B00", 0x000BD041),
    ("PNP0A03", 0x030AD041),
])
def test_eisa_id(text, value):
    assert aml.eisa_id(text) == aml.integer(value)


@pytest.mark.parametrize("bad", ["PNP050", "pnp0501", "PNP05G1", "P1P0501"])
def test_bad_eisa_ids_are_refused(bad):
    with pytest.raises(ValueError):
        aml.eisa_id(bad)


# --- resource descriptors: layout from §6.4 ------------------------------------------------------
def test_resource_descriptor_layouts():
    assert aml.io(0x3F8, 0x3F8, 1, 8) == bytes([0x47, 1, 0xF8, 3, 0xF8, 3, 1, 8])
    assert aml.memory32_fixed(0xD0000000, 0x1000) == bytes(
        [0x86, 9, 0, 1, 0, 0, 0, 0xD0, 0, 0x10, 0, 0])
    # consumer | edge = 0x03, one interrupt
    assert aml.interrupt(5) == bytes([0x89, 6, 0, 0x03, 1, 5, 0, 0, 0])
    assert aml.interrupt(9, edge=False, active_low=True, shared=True)[3] == 0x0D


@given(st.binary(max_size=64))
def test_end_tag_checksum_makes_the_template_sum_to_zero(descriptors):
    tag = aml.end_tag(descriptors, compute_checksum=True)
    assert tag[0] == aml.END_TAG
    assert (sum(descriptors) + sum(tag)) % 256 == 0
    assert aml.end_tag(descriptors) == bytes([aml.END_TAG, 0])  # zero: "valid" (§6.4.2.9)


def test_package_and_method_limits():
    with pytest.raises(ValueError):
        aml.package(*range(256))
    with pytest.raises(ValueError):
        aml.method("MTH0", 8)
    with pytest.raises(TypeError):
        aml.data(True)


# --- byte equality with iasl ---------------------------------------------------------------------
# (ASL source, our encoding): each pair must produce the same AML.
ROUND_TRIPS = [
    ("Name (INT0, Zero)", aml.name("INT0", 0)),
    ("Name (INT1, One)", aml.name("INT1", 1)),
    ("Name (INTB, 0xFE)", aml.name("INTB", 0xFE)),
    ("Name (INTW, 0x1234)", aml.name("INTW", 0x1234)),
    ("Name (INTD, 0xD0000000)", aml.name("INTD", 0xD0000000)),
    ("Name (INTQ, 0x123456789A)", aml.name("INTQ", 0x123456789A)),
    ("Name (ALL1, Ones)", aml.name("ALL1", aml.ONES)),
    ("Name (ALL2, 0xFFFFFFFFFFFFFFFF)", aml.name("ALL2", (1 << 64) - 1)),
    ("Name (STR0, \"LNRO0005\")", aml.name("STR0", "LNRO0005")),
    ("Name (STR1, \"\")", aml.name("STR1", "")),
    ("Name (BUF0, Buffer () {0x01, 0x02, 0x03})", aml.name("BUF0", aml.buffer(b"\x01\x02\x03"))),
    ("Name (PKG0, Package () {5, 5, Zero, Zero})", aml.name("PKG0", aml.package(5, 5, 0, 0))),
    ("Name (PKG1, Package () {\"A\", 0x1000, Package () {One}})",
     aml.name("PKG1", aml.package("A", 0x1000, aml.package(1)))),
    ("Name (_S5, Package () {5, 5, Zero, Zero})", aml.sleep_state(5, 5, 5)),
    ("Name (EISA, EisaId (\"PNP0501\"))", aml.name("EISA", aml.eisa_id("PNP0501"))),
    ("Name (EIS0, EisaId (\"PNP0000\"))", aml.name("EIS0", aml.eisa_id("PNP0000"))),
    ("Method (MTH0, 0, NotSerialized) { Return (0x1234) }",
     aml.method("MTH0", 0, aml.return_(0x1234))),
    ("Method (MTH1, 0, Serialized, 3) { Return (\"X\") }",
     aml.method("MTH1", 0, aml.return_("X"), serialized=True, sync_level=3)),
    ("Scope (_SB) { Device (DEV0) { Name (_HID, \"LNRO0005\")\n"
     "  Method (_STA, 0, NotSerialized) { Return (0x0F) } } }",
     aml.scope("_SB", aml.device("DEV0", aml.hid("LNRO0005"), aml.sta_method()))),
    ("Scope (\\_SB) { Device (DEV1) { Name (_HID, EisaId (\"PNP0501\")) Name (_UID, 3) } }\n"
     "Name (\\_SB.DEV1.ABCD, 5)\n"
     "Scope (\\_SB.DEV1) { Name (^EFGH, 6) }",
     aml.scope("\\_SB", aml.device("DEV1", aml.hid("PNP0501"), aml.uid(3)))
     + aml.name("\\_SB.DEV1.ABCD", 5)
     + aml.scope("\\_SB.DEV1", aml.name("^EFGH", 6))),
    ("Device (DEV2) { Name (_HID, \"LNRO0005\")\n"
     "  Name (_CRS, ResourceTemplate () {\n"
     "    Memory32Fixed (ReadWrite, 0xD0001000, 0x1000)\n"
     "    Memory32Fixed (ReadOnly, 0xFEC00000, 0x100)\n"
     "    Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 6 }\n"
     "    Interrupt (ResourceConsumer, Level, ActiveLow, Shared) { 9, 10, 40 }\n"
     "    IO (Decode16, 0x3F8, 0x3F8, 1, 8)\n"
     "    IO (Decode10, 0x60, 0x60, 0, 1)\n"
     "  }) }",
     aml.device("DEV2", aml.hid("LNRO0005"), aml.crs(
         aml.memory32_fixed(0xD0001000, 0x1000),
         aml.memory32_fixed(0xFEC00000, 0x100, writeable=False),
         aml.interrupt(6),
         aml.interrupt(9, 10, 40, edge=False, active_low=True, shared=True),
         aml.io(0x3F8, 0x3F8, 1, 8),
         aml.io(0x60, 0x60, 0, 1, decode16=False)))),
    # the Generic Event Device's pieces (kvmpy.acpi.dsdt.ged_device)
    ("Device (GED) { Name (_HID, \"ACPI0013\") Name (_UID, Zero)\n"
     "  OperationRegion (EREG, SystemIO, 0x0604, 0x04)\n"
     "  Field (EREG, DWordAcc, NoLock, WriteAsZeros) { ESEL, 32 }\n"
     "  Method (_EVT, 1, Serialized) {\n"
     "    Local0 = ESEL\n"
     "    If ((Local0 & One)) { Notify (PWRB, 0x80) } } }\n"
     "Device (PWRB) { Name (_HID, EisaId (\"PNP0C0C\")) Name (_UID, Zero) }",
     aml.device("GED", aml.hid("ACPI0013"), aml.uid(0),
                aml.operation_region("EREG", aml.SYSTEM_IO, 0x604, 4),
                aml.field("EREG", ("ESEL", 32)),
                aml.method("_EVT", 1, aml.store(aml.ref("ESEL"), aml.LOCAL0),
                           aml.if_(aml.and_(aml.LOCAL0, 1), aml.notify("PWRB", 0x80)),
                           serialized=True))
     + aml.device("PWRB", aml.hid("PNP0C0C"), aml.uid(0))),
    ("OperationRegion (REG2, SystemIO, 0x80, 0x10)\n"
     "Field (REG2, DWordAcc, NoLock, WriteAsZeros) { AAAA, 8, BBBB, 16, CCCC, 8 }",
     aml.operation_region("REG2", aml.SYSTEM_IO, 0x80, 0x10)
     + aml.field("REG2", ("AAAA", 8), ("BBBB", 16), ("CCCC", 8))),
]


@needs_iasl
@pytest.mark.parametrize("asl, ours", ROUND_TRIPS, ids=[a.split("(")[0] + str(i)
                                                      for i, (a, _) in enumerate(ROUND_TRIPS)])
def test_encoder_matches_iasl(asl, ours):
    # -on: iasl would otherwise drop a redundant root prefix ("\_SB" at the root -> "_SB").
    assert ours == iasl.compile_aml(asl, "-on")


def _hex_bytes(data: bytes) -> str:
    return ", ".join(f"0x{b:02X}" for b in data)


@needs_iasl
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, (1 << 64) - 1), min_size=1, max_size=8),
       st.sampled_from([1, 2, 60, 61, 62, 63, 64, 65, 200, 4089, 4090, 4091, 4092, 4093]))
def test_integers_and_buffer_lengths_match_iasl(values, buffer_size):
    """Integers in every width, and Buffers whose PkgLength crosses the 1/2/3-byte limits."""
    data = bytes(i & 0xFF for i in range(buffer_size))
    asl = "\n".join(f"Name (I{i:03d}, 0x{v:X})" for i, v in enumerate(values))
    asl += f"\nName (BUFF, Buffer () {{ {_hex_bytes(data)} }})"
    ours = b"".join(aml.name(f"I{i:03d}", v) for i, v in enumerate(values))
    ours += aml.name("BUFF", aml.buffer(data))
    assert ours == iasl.compile_aml(asl)


@needs_iasl
def test_compile_aml_reports_iasl_problems():
    """The oracle is not vacuous: a warning from iasl fails the comparison."""
    with pytest.raises(ValueError, match="Warning"):
        iasl.compile_aml("Device (DEV9) { Name (_UID, 1) }")  # a Device without _HID/_ADR
