"""ACPI tables: layout and checksums from the spec, then ACPICA's own tools as the judge."""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy import layout
from kvmpy.acpi import build_acpi, fadt, iasl, madt, rsdp, sdt
from kvmpy.acpi.dsdt import VirtioMmio, dsdt
from kvmpy.devices import acpi_pm
from kvmpy.devices import rtc as rtc_device
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory

needs_iasl = pytest.mark.skipif(not iasl.available(), reason="iasl (acpica-tools) not installed")
needs_acpiexec = pytest.mark.skipif(not iasl.available(iasl.ACPIEXEC),
                                    reason="acpiexec (acpica-tools) not installed")


def windows(n: int) -> list[tuple[int, int, int]]:
    """n virtio-mmio windows the way kvmpy lays them out (slot n: base + n*4K, VIRTIO_IRQS[n])."""
    return [(layout.VIRTIO_MMIO_BASE + i * layout.VIRTIO_MMIO_SIZE, layout.VIRTIO_MMIO_SIZE,
             layout.VIRTIO_IRQS[i]) for i in range(n)]


def low_memory() -> GuestMemory:
    return GuestMemory.from_buffer(bytearray(layout.HIMEM))


def read_table(mem: GuestMemory, gpa: int) -> bytes:
    return mem.read(gpa, mem.read_u32(gpa + sdt.LENGTH_OFFSET))


def assert_valid_sdt(table: bytes, signature: bytes, revision: int) -> None:
    sig, length, rev, *_ = sdt.SDT_HEADER.unpack_from(table)
    assert sig == signature
    assert length == len(table)
    assert rev == revision
    assert sum(table) % 256 == 0


def all_tables(n_cpus: int = 2, n_virtio: int = 3) -> dict[str, bytes]:
    mem = low_memory()
    placed = build_acpi(mem, n_cpus, windows(n_virtio), True)
    out = {sig: read_table(mem, gpa) for sig, gpa in placed.tables.items() if sig != "RSDP"}
    out["RSDP"] = mem.read(placed.rsdp_gpa, rsdp.RSDP_SIZE)
    return out


# --- the pure builders ----------------------------------------------------------------------------
def test_rsdp_fields_and_both_checksums():
    raw = rsdp.rsdp(0x1234_5678_9ABC)
    sig, _, oem, revision, rsdt_addr, length, xsdt_addr, _, reserved = rsdp.RSDP.unpack(raw)
    assert sig == b"RSD PTR " and oem == sdt.OEM_ID and revision == 2
    assert rsdt_addr == 0 and length == 36 and xsdt_addr == 0x1234_5678_9ABC
    assert reserved == bytes(3)
    assert sum(raw[:20]) % 256 == 0  # ACPI 1.0 checksum
    assert sum(raw) % 256 == 0  # extended checksum


def test_xsdt_lists_the_addresses():
    table = sdt.xsdt([0xE0100, 0x1_0000_0000])
    assert_valid_sdt(table, b"XSDT", 1)
    assert struct.unpack_from("<2Q", table, 36) == (0xE0100, 0x1_0000_0000)


def test_fadt_layout_follows_table_5_9():
    table = fadt.fadt(0xE0040)
    assert_valid_sdt(table, b"FACP", 6)
    assert len(table) == fadt.FADT_SIZE == 276
    # Offsets from ACPI 6.5 Table 5.9
    for field, offset in [("FIRMWARE_CTRL", 36), ("DSDT", 40), ("IAPC_BOOT_ARCH", 109),
                          ("Flags", 112), ("RESET_REG", 116), ("RESET_VALUE", 128),
                          ("FADT_Minor_Version", 131), ("X_DSDT", 140),
                          ("SLEEP_CONTROL_REG", 244), ("SLEEP_STATUS_REG", 256),
                          ("Hypervisor_Vendor_Identity", 268)]:
        assert fadt.field_offset(field) == offset, field

    def at(field: str, fmt: str) -> int | tuple[int, ...]:
        values = struct.unpack_from("<" + fmt, table, fadt.field_offset(field))
        return values[0] if len(values) == 1 else values

    assert at("X_DSDT", "Q") == 0xE0040
    assert at("DSDT", "I") == 0  # must be zero when X_DSDT is used
    assert at("FIRMWARE_CTRL", "I") == 0 and at("X_FIRMWARE_CTRL", "Q") == 0  # no FACS
    flags = at("Flags", "I")
    assert flags & fadt.HW_REDUCED_ACPI and flags & fadt.RESET_REG_SUP
    assert at("FADT_Minor_Version", "B") == fadt.MINOR_REVISION
    assert at("RESET_VALUE", "B") == acpi_pm.RESET_VALUE
    # GAS: space 1 (I/O), 8 bits wide, offset 0, byte access, at the acpi_pm registers
    gas = "BBBBQ"
    assert at("RESET_REG", gas) == (1, 8, 0, 1, layout.PM_PORT_BASE + acpi_pm.RESET)
    assert at("SLEEP_CONTROL_REG", gas) == (1, 8, 0, 1,
                                            layout.PM_PORT_BASE + acpi_pm.SLEEP_CONTROL)
    assert at("SLEEP_STATUS_REG", gas) == (1, 8, 0, 1,
                                           layout.PM_PORT_BASE + acpi_pm.SLEEP_STATUS)
    # hardware-reduced: no SCI, no PM1/GPE/timer blocks
    assert at("SCI_INT", "H") == 0
    assert table[fadt.field_offset("X_PM1a_EVT_BLK"):fadt.field_offset("SLEEP_CONTROL_REG")] \
        == bytes(12 * 8)


@pytest.mark.parametrize("uart, i8042, rtc, expected", [
    (True, True, True, fadt.LEGACY_DEVICES | fadt.I8042),
    (True, False, True, fadt.LEGACY_DEVICES),
    (False, False, False, fadt.CMOS_RTC_NOT_PRESENT),
])
def test_iapc_boot_arch_tells_which_legacy_devices_exist(uart, i8042, rtc, expected):
    always = fadt.VGA_NOT_PRESENT | fadt.MSI_NOT_SUPPORTED | fadt.PCIE_ASPM_CONTROLS
    table = fadt.fadt(0, uart=uart, i8042=i8042, rtc=rtc)
    (flags,) = struct.unpack_from("<H", table, fadt.field_offset("IAPC_BOOT_ARCH"))
    assert flags == always | expected
    century = table[fadt.field_offset("CENTURY")]
    assert century == (rtc_device.REG_CENTURY if rtc else 0)


def walk_madt(table: bytes) -> list[bytes]:
    """The interrupt controller structures, split by their own length bytes."""
    entries, offset = [], 44
    while offset < len(table):
        length = table[offset + 1]
        assert length >= 2
        entries.append(table[offset:offset + length])
        offset += length
    assert offset == len(table)
    return entries


@given(st.integers(1, madt.MAX_CPUS))
def test_madt_has_one_enabled_local_apic_per_cpu(n_cpus):
    table = madt.madt(n_cpus)
    assert_valid_sdt(table, b"APIC", madt.REVISION)
    assert struct.unpack_from("<II", table, 36) == (layout.LAPIC, madt.PCAT_COMPAT)
    entries = walk_madt(table)
    lapics = [struct.unpack("<BBBBI", e) for e in entries if e[0] == madt.TYPE_LOCAL_APIC]
    assert lapics == [(0, 8, i, i, 1) for i in range(n_cpus)]
    ioapics = [struct.unpack("<BBBBII", e) for e in entries if e[0] == madt.TYPE_IO_APIC]
    assert ioapics == [(1, 12, madt.IOAPIC_ID, 0, layout.IOAPIC, 0)]
    nmis = [struct.unpack("<BBBHB", e) for e in entries if e[0] == madt.TYPE_LOCAL_APIC_NMI]
    assert nmis == [(4, 6, 0xFF, 0, 1)]


def test_madt_interrupt_source_overrides():
    flags = madt.INTI_ACTIVE_HIGH | madt.INTI_EDGE
    entries = walk_madt(madt.madt(1, overrides=[(0, 2, flags)]))
    overrides = [struct.unpack("<BBBBIH", e) for e in entries
                 if e[0] == madt.TYPE_INTERRUPT_SOURCE_OVERRIDE]
    assert overrides == [(2, 10, 0, 0, 2, flags)]


@pytest.mark.parametrize("n_cpus", [0, 256])
def test_madt_refuses_impossible_cpu_counts(n_cpus):
    with pytest.raises(ValueError):
        madt.madt(n_cpus)


def test_dsdt_is_a_valid_revision_2_table():
    table = dsdt(2, [VirtioMmio(*w) for w in windows(2)])
    assert_valid_sdt(table, b"DSDT", 2)
    assert table.count(b"LNRO0005") == 2
    assert table.count(b"ACPI0007") == 2


# --- placement ------------------------------------------------------------------------------------
def scan_for_rsdp(mem: GuestMemory) -> int:
    """What Linux's acpi_find_root_pointer() does in 0xE0000-0xFFFFF (ACPI 6.5 §5.2.5.1)."""
    for gpa in range(layout.BIOS_START, layout.BIOS_END, 16):
        raw = mem.read(gpa, 8)
        if raw == b"RSD PTR " and sum(mem.read(gpa, 20)) % 256 == 0:
            return gpa
    raise AssertionError("no RSDP in the BIOS area")


def test_tables_are_found_the_way_the_kernel_finds_them():
    mem = low_memory()
    placed = build_acpi(mem, 4, windows(5), True)
    rsdp_gpa = scan_for_rsdp(mem)
    assert rsdp_gpa == placed.rsdp_gpa == layout.BIOS_START
    assert sum(mem.read(rsdp_gpa, 36)) % 256 == 0
    xsdt_gpa = mem.read_u64(rsdp_gpa + 24)
    xsdt = read_table(mem, xsdt_gpa)
    assert_valid_sdt(xsdt, b"XSDT", 1)
    pointed = [read_table(mem, a) for a in struct.unpack_from("<2Q", xsdt, 36)]
    assert [t[:4] for t in pointed] == [b"FACP", b"APIC"]
    facp, apic = pointed
    dsdt_gpa = struct.unpack_from("<Q", facp, fadt.field_offset("X_DSDT"))[0]
    dsdt_table = read_table(mem, dsdt_gpa)
    assert_valid_sdt(dsdt_table, b"DSDT", 2)
    assert dsdt_table.count(b"LNRO0005") == 5
    assert len([e for e in walk_madt(apic) if e[0] == madt.TYPE_LOCAL_APIC]) == 4
    # everything lies in the reported range, inside the BIOS area, 16-byte aligned
    for gpa in placed.tables.values():
        assert placed.start <= gpa < placed.end and gpa % 16 == 0
    assert layout.BIOS_START <= placed.start < placed.end <= layout.BIOS_END
    last = max(placed.tables.values())
    assert last + len(read_table(mem, last)) <= placed.end


def test_largest_configuration_fits():
    """Every IO-APIC pin above the UART used by a virtio window, and 255 vCPUs."""
    n_virtio = len(layout.VIRTIO_IRQS)
    placed = build_acpi(low_memory(), madt.MAX_CPUS, windows(n_virtio), True)
    assert placed.end - placed.start < layout.BIOS_END - layout.BIOS_START


@pytest.mark.parametrize("kwargs, virtio, message", [
    ({}, [(layout.VIRTIO_MMIO_BASE, 0x1000, layout.COM1_IRQ)], "used by COM1"),
    ({}, windows(1) * 2, "already used"),
    ({}, [(layout.VIRTIO_MMIO_BASE, 0x1000, layout.IOAPIC_PINS)], "not an IO-APIC pin"),
    ({}, [(0xFFFF_F000, 0x2000, 5)], "below 4 GiB"),
    ({"base": layout.BIOS_START + 8}, [], "aligned"),
    ({"limit": layout.BIOS_START + 0x100}, windows(4), "more than"),
])
def test_bad_configurations_are_config_errors(kwargs, virtio, message):
    with pytest.raises(ConfigError, match=message):
        build_acpi(low_memory(), 1, virtio, True, **kwargs)


def test_no_cpus_is_a_config_error():
    with pytest.raises(ConfigError):
        build_acpi(low_memory(), 0, [], True)


# --- ACPICA as the judge --------------------------------------------------------------------------
@needs_iasl
@pytest.mark.parametrize("signature", ["DSDT", "FACP", "APIC", "XSDT"])
def test_iasl_disassembles_every_table_cleanly(signature):
    result = iasl.disassemble(all_tables()[signature])
    assert result.problems == []
    assert result.text


@needs_iasl
def test_iasl_checker_is_not_vacuous():
    table = bytearray(all_tables()["APIC"])
    table[sdt.CHECKSUM_OFFSET] ^= 1
    assert any("checksum" in p.lower() for p in iasl.disassemble(bytes(table)).problems)
    aml_table = bytearray(all_tables()["DSDT"])
    aml_table[40] = 0x99  # corrupt the first name segment
    aml_table[sdt.CHECKSUM_OFFSET] = 0
    aml_table[sdt.CHECKSUM_OFFSET] = sdt.checksum(aml_table)
    assert iasl.disassemble(bytes(aml_table)).problems


@needs_iasl
def test_dsdt_disassembly_shows_every_device():
    result = iasl.disassemble(all_tables(n_cpus=3, n_virtio=4)["DSDT"])
    text = result.text
    assert text.count('Name (_HID, "LNRO0005")') == 4
    for i, (base, _, gsi) in enumerate(windows(4)):
        assert re.search(rf"Device \(V{i:03d}\).*?Memory32Fixed \(ReadWrite,\s+0x{base:08X},"
                         rf"\s+// Address Base\s+0x00001000,.*?Interrupt \(ResourceConsumer, "
                         rf"Edge, ActiveHigh, Exclusive.*?0x{gsi:08X},", text, re.S)
    assert text.count('"ACPI0007"') == 3
    assert 'EisaId ("PNP0501")' in text and "0x03F8" in text and "0x00000004" in text
    assert 'EisaId ("PNP0303")' in text and 'EisaId ("PNP0B00")' in text
    assert re.search(r"Name \(_S5, Package \(0x04\).*?0x05,\s+0x05,\s+Zero,\s+Zero", text, re.S)


@needs_iasl
def test_madt_disassembly_counts_local_apics():
    text = iasl.disassemble(all_tables(n_cpus=5)["APIC"]).text
    assert text.count("[Processor Local APIC]") == 5
    assert text.count("Processor Enabled : 1") == 5
    assert "[I/O APIC]" in text and "Address : FEC00000" in text
    assert "[Local APIC NMI]" in text
    assert "Local Apic Address : FEE00000" in text


@needs_iasl
def test_fadt_disassembly_shows_the_pm_registers():
    text = iasl.disassemble(all_tables()["FACP"]).text
    assert "Hardware Reduced (V5) : 1" in text
    assert "Reset Register Supported (V2) : 1" in text
    assert "Value to cause reset : 42" in text
    assert "8042 Present on ports 60/64 (V2) : 1" in text
    assert "CMOS RTC Not Present (V5) : 0" in text

    def register(label: str) -> str:
        block = re.search(rf"{label} : \[Generic Address Structure\](.*?)\n\n", text, re.S)
        assert block, label
        return block.group(1)

    for label, port in [("Reset Register", acpi_pm.RESET),
                        ("Sleep Control Register", acpi_pm.SLEEP_CONTROL),
                        ("Sleep Status Register", acpi_pm.SLEEP_STATUS)]:
        fields = register(label)
        assert "Space ID : 01 [SystemIO]" in fields
        assert "Bit Width : 08" in fields
        assert f"Address : {layout.PM_PORT_BASE + port:016X}" in fields


@needs_iasl
@pytest.mark.parametrize("signature", ["DSDT", "FACP", "APIC", "XSDT"])
def test_disassemble_then_compile_gives_back_the_same_bytes(signature):
    """iasl -d, then iasl: the recompiled table equals ours except for the compiler fields."""
    ours = all_tables(n_cpus=2, n_virtio=4)[signature]
    source = iasl.disassemble(ours).text
    recompiled = iasl.compile_source(source)
    assert recompiled.problems == [] and recompiled.output
    theirs = recompiled.output
    assert len(theirs) == len(ours)
    assert theirs[:9] == ours[:9]  # signature, length, revision
    assert theirs[10:28] == ours[10:28]  # OEM ID, OEM table ID, OEM revision
    assert theirs[36:] == ours[36:]  # the whole body


@needs_iasl
def test_rsdp_matches_iasl_data_table_compiler():
    """iasl 20200925 cannot disassemble an RSDP, but it compiles one; it sets the checksums."""
    xsdt_gpa = 0xE0270
    source = "\n".join([
        '[0008] Signature : "RSD PTR "',
        "[0001] Checksum : 00",
        f'[0006] Oem ID : "{sdt.OEM_ID.decode()}"',
        "[0001] Revision : 02",
        "[0004] RSDT Address : 00000000",
        "[0004] Length : 00000024",
        f"[0008] XSDT Address : {xsdt_gpa:016X}",
        "[0001] Extended Checksum : 00",
        "[0003] Reserved : 000000",
    ]) + "\n"
    result = iasl.compile_source(source)
    assert result.problems == []
    assert result.output == rsdp.rsdp(xsdt_gpa)


@needs_acpiexec
def test_acpica_interpreter_loads_the_tables_and_evaluates_them():
    """acpiexec runs the same ACPICA code as Linux: load FADT+DSDT+MADT, evaluate objects."""
    tables = all_tables(n_cpus=2, n_virtio=2)
    result = iasl.acpiexec([tables["FACP"], tables["DSDT"], tables["APIC"]],
                           ["evaluate \\_S5", "evaluate \\_SB.V001._CRS",
                            "evaluate \\_SB.COM1._HID", "evaluate \\_SB.C001._UID"])
    assert result.problems == []
    log = result.log
    assert re.search(r"\\_S5.*?Contains 4 Elements:\s+\[Integer\] = 0+5\s+\[Integer\] = 0+5", log,
                     re.S)
    v001 = windows(2)[1]
    crs = (b"\x86\x09\x00\x01" + struct.pack("<II", v001[0], v001[1])
           + b"\x89\x06\x00\x03\x01" + struct.pack("<I", v001[2]) + b"\x79\x00")
    dump = " ".join(f"{b:02X}" for b in crs)
    assert dump[:47] in log  # acpiexec prints 16 bytes a line
    assert "= 000000000105D041" in log  # PNP0501
    assert re.search(r"C001._UID.*?\[Integer\] = 0+1\b", log, re.S)
    # C000 C001 COM1 PS2K RTC_ V000 V001, all loaded into the namespace
    assert re.search(r"Objects with\s+7 Devices", log)


@needs_iasl
@settings(max_examples=10, deadline=None)
@given(st.integers(1, 16), st.integers(0, len(layout.VIRTIO_IRQS)), st.booleans(), st.booleans(),
       st.booleans())
def test_any_configuration_disassembles_cleanly(n_cpus, n_virtio, uart, i8042, rtc):
    mem = low_memory()
    placed = build_acpi(mem, n_cpus, windows(n_virtio), uart, i8042=i8042, rtc=rtc)
    for sig, gpa in placed.tables.items():
        if sig == "RSDP":
            continue
        assert iasl.disassemble(read_table(mem, gpa)).problems == [], sig


@needs_acpiexec
def test_power_button_and_its_generic_event_device_evaluate_in_acpica():
    """The GED's _EVT reads the event register and runs: ACPICA, Linux's interpreter, agrees."""
    mem = low_memory()
    placed = build_acpi(mem, 1, windows(1), True, power_button=True)
    tables = {sig: read_table(mem, gpa) for sig, gpa in placed.tables.items() if sig != "RSDP"}
    text = iasl.disassemble(tables["DSDT"]).text
    assert 'Name (_HID, "ACPI0013"' in text and 'EisaId ("PNP0C0C")' in text
    assert re.search(r"Local0 = ESEL.*?If \(\(Local0 & One\)\).*?Notify \(PWRB, 0x80\)", text, re.S)
    assert re.search(r"OperationRegion \(EREG, SystemIO, 0x0604, 0x04\)", text)
    assert re.search(r"Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive.*?0x00000003,",
                     text, re.S)
    result = iasl.acpiexec([tables["FACP"], tables["DSDT"], tables["APIC"]],
                           ["evaluate \\_SB.GED_._EVT 3", "evaluate \\_SB.PWRB._HID"])
    assert result.problems == [], result.log
    assert "= 000000000C0CD041" in result.log  # PNP0C0C
    with pytest.raises(ConfigError, match="GSI 3 is already used by GED"):
        build_acpi(low_memory(), 1, [(layout.VIRTIO_MMIO_BASE, 4096, layout.GED_GSI)], True,
                   power_button=True)
