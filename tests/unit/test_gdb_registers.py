"""gdb's x86-64 register layout: the target description and the KVM structs behind it."""

import xml.etree.ElementTree as ET

from hypothesis import given
from hypothesis import strategies as st
from test_trace_fakes import machine

from kvmpy.gdb import registers
from kvmpy.gdb.registers import BY_NAME, PACKET_BYTES, REGISTERS


def test_target_xml_is_well_formed_and_numbers_every_register() -> None:
    root = ET.fromstring(registers.target_xml().split("\n", 2)[2])  # skip the prolog
    assert root.find("architecture").text == "i386:x86-64"  # type: ignore[union-attr]
    regs = root.findall("./feature/reg")
    assert [r.get("name") for r in regs] == [r.name for r in REGISTERS]
    assert [int(r.get("regnum", -1)) for r in regs] == list(range(len(REGISTERS)))
    features = [f.get("name") for f in root.findall("feature")]
    assert features == ["org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse",
                        "org.gnu.gdb.i386.segments", "org.kvmpy.x86.sys"]


def test_gdbs_amd64_numbering() -> None:
    # the numbers gdb's amd64 code uses for the core registers (amd64-tdep.h)
    assert BY_NAME["rax"] == 0 and BY_NAME["rsp"] == 7 and BY_NAME["rip"] == 16
    assert BY_NAME["eflags"] == 17 and BY_NAME["cs"] == 18 and BY_NAME["st0"] == 24
    assert BY_NAME["fop"] == 39 and BY_NAME["xmm0"] == 40 and BY_NAME["mxcsr"] == 56
    assert PACKET_BYTES == 16 * 8 + 8 + 4 + 6 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4 + 2 * 8 + 6 * 8


def test_values_come_from_regs_sregs_and_fpu() -> None:
    vcpu, _, _ = machine("long")
    vcpu.set_rip(0x10000, rax=0x1122334455667788)
    values = registers.read_values(vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu())
    assert len(values) == len(REGISTERS)
    assert values[BY_NAME["rax"]] == bytes.fromhex("8877665544332211")
    assert values[BY_NAME["cs"]] == (0x10).to_bytes(4, "little")
    assert values[BY_NAME["cr3"]] == (0x9000).to_bytes(8, "little")
    assert values[BY_NAME["efer"]] == (0xD01).to_bytes(8, "little")
    assert values[BY_NAME["ftag"]] == (0xFFFF).to_bytes(4, "little")  # all x87 registers empty
    assert sum(len(v) for v in values) == PACKET_BYTES


@given(st.sampled_from([r for r in REGISTERS if r.name not in ("fiseg", "foseg")]),
       st.data())
def test_every_register_written_reads_back(reg, data) -> None:  # type: ignore[no-untyped-def]
    vcpu, _, _ = machine("long")
    value = data.draw(st.binary(min_size=reg.size, max_size=reg.size))
    if reg.name in registers.SEGMENTS:
        value = value[:2] + b"\0\0"  # selectors are 16 bits
    if reg.name in ("fctrl", "fstat", "fop"):
        value = value[:2] + b"\0\0"
    if reg.name == "ftag":  # kvm_fpu keeps FXSAVE's abridged tags: "empty" (11) or "valid" (00)
        pairs = data.draw(st.lists(st.sampled_from([0b00, 0b11]), min_size=8, max_size=8))
        value = sum(p << (2 * i) for i, p in enumerate(pairs)).to_bytes(4, "little")
    regs, sregs, fpu = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu()
    registers.write_value(BY_NAME[reg.name], value, regs, sregs, fpu)
    assert registers.read_values(regs, sregs, fpu)[BY_NAME[reg.name]] == value


def test_a_real_mode_selector_moves_the_base_too() -> None:
    vcpu, _, _ = machine("real")
    regs, sregs, fpu = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu()
    registers.write_value(BY_NAME["ds"], (0x2000).to_bytes(4, "little"), regs, sregs, fpu)
    assert sregs.ds.selector == 0x2000 and sregs.ds.base == 0x20000


def test_a_g_packet_splits_per_register() -> None:
    pieces = registers.split_packet(bytes(PACKET_BYTES))
    assert [len(p) for p in pieces] == [r.size for r in REGISTERS]
    assert len(registers.split_packet(bytes(17 * 8))) == 17  # a short G sets fewer
