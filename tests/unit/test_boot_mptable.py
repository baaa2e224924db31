"""MP tables: checksums sum to zero, one processor entry per vCPU, IRQs routed to the I/O APIC."""

import struct

import pytest

from kvmpy import layout
from kvmpy.boot.mptable import (
    MAX_CPUS,
    MP_BUS,
    MP_EXTINT,
    MP_INT,
    MP_INTSRC,
    MP_IOAPIC,
    MP_LINTSRC,
    MP_NMI,
    MP_PROCESSOR,
    build_mptable,
    mptable_size,
    write_mptable,
)
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory

ENTRY_SIZE = {MP_PROCESSOR: 20, MP_BUS: 8, MP_IOAPIC: 8, MP_INTSRC: 8, MP_LINTSRC: 8}


def parse(mem: GuestMemory, gpa: int = layout.EBDA):
    """Read the tables back the way Linux's smp_scan_config/smp_read_mpc do."""
    mpf = mem.read(gpa, 16)
    assert mpf[:4] == b"_MP_"
    assert sum(mpf) % 256 == 0
    physptr, length, spec = struct.unpack_from("<IBB", mpf, 4)
    assert (length, spec) == (1, 4)
    assert mpf[11] == 0  # feature1: the configuration table is present
    header = mem.read(physptr, 44)
    assert header[:4] == b"PCMP"
    base_len, spec, _, oem, product, _, _, count, lapic = struct.unpack_from(
        "<HBB8s12sIHHI", header, 4
    )
    assert spec == 4 and lapic == layout.LAPIC
    table = mem.read(physptr, base_len)
    assert sum(table) % 256 == 0
    entries, pos = [], 44
    while pos < base_len:
        kind = table[pos]
        size = ENTRY_SIZE[kind]
        entries.append((kind, table[pos : pos + size]))
        pos += size
    assert pos == base_len
    assert count == len(entries)
    return physptr, entries


def mem() -> GuestMemory:
    return GuestMemory.from_buffer(bytearray(0x100000))


@pytest.mark.parametrize("n", [1, 2, 4, 37])
def test_tables_for_n_cpus(n):
    m = mem()
    size = write_mptable(m, n)
    assert size == mptable_size(n) and layout.EBDA + size <= layout.EBDA_END
    physptr, entries = parse(m)
    assert physptr == layout.EBDA + 16
    cpus = [struct.unpack("<BBBBII8x", e) for k, e in entries if k == MP_PROCESSOR]
    assert [c[1] for c in cpus] == list(range(n))  # APIC id = vCPU index
    assert [c[3] & 1 for c in cpus] == [1] * n  # enabled
    assert [c[3] >> 1 & 1 for c in cpus] == [1] + [0] * (n - 1)  # BSP is vCPU 0 only
    buses = [e for k, e in entries if k == MP_BUS]
    assert buses == [struct.pack("<BB6s", MP_BUS, 0, b"ISA   ")]
    ioapics = [struct.unpack("<BBBBI", e) for k, e in entries if k == MP_IOAPIC]
    assert len(ioapics) == 1
    _, ioapic_id, _, flags, address = ioapics[0]
    assert ioapic_id == n and flags == 1 and address == layout.IOAPIC
    ints = [struct.unpack("<BBHBBBB", e) for k, e in entries if k == MP_INTSRC]
    assert [(i[1], i[3], i[4], i[5], i[6]) for i in ints] == [
        (MP_INT, 0, irq, n, irq) for irq in range(layout.IOAPIC_PINS)
    ]
    lints = [struct.unpack("<BBHBBBB", e) for k, e in entries if k == MP_LINTSRC]
    assert [(i[1], i[5], i[6]) for i in lints] == [(MP_EXTINT, 0, 0), (MP_NMI, 0xFF, 1)]


def test_custom_irq_list():
    m = mem()
    write_mptable(m, 2, irqs=[0, 1, 4, 5, 6])
    _, entries = parse(m)
    assert [e[5] for k, e in entries if k == MP_INTSRC] == [0, 1, 4, 5, 6]  # source bus IRQ
    with pytest.raises(ConfigError):
        build_mptable(1, irqs=[24])


def test_cpu_counts_out_of_range():
    with pytest.raises(ConfigError, match="1 to 254"):
        build_mptable(0)
    with pytest.raises(ConfigError, match="1 to 254"):
        build_mptable(MAX_CPUS + 1)
    with pytest.raises(ConfigError, match="MP table for 38 vCPUs is 1044 bytes, only 1024 fit"):
        write_mptable(mem(), 38)


def test_elsewhere_with_room():
    m = mem()
    write_mptable(m, MAX_CPUS, gpa=0x80000, limit=0x90000)
    _, entries = parse(m, 0x80000)
    assert sum(k == MP_PROCESSOR for k, _ in entries) == MAX_CPUS
