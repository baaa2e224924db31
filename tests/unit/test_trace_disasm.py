"""Decoding guest instructions in the vCPU's width, including the one before RIP."""

from types import SimpleNamespace as NS

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy.trace import disasm

pytest.importorskip("capstone")


def sregs(cr0: int, efer: int = 0, l: int = 0, db: int = 0) -> NS:  # noqa: E741
    return NS(cr0=cr0, efer=efer, cs=NS(l=l, db=db))


def test_code_bits_follow_the_segment_cache() -> None:
    assert disasm.code_bits(sregs(0)) == 16  # real mode, whatever CS.D says
    assert disasm.code_bits(sregs(1, db=1)) == 32
    assert disasm.code_bits(sregs(1, db=0)) == 16  # 16-bit protected mode
    assert disasm.code_bits(sregs(1 | 1 << 31, efer=1 << 10, l=1)) == 64
    assert disasm.code_bits(sregs(1 | 1 << 31, efer=1 << 10, l=0, db=1)) == 32  # compat
    assert disasm.mode_name(sregs(1 | 1 << 31, efer=1 << 10, l=0, db=1)) == "compatibility mode"


def test_the_same_bytes_in_each_width() -> None:
    code = bytes.fromhex("b8 01 00 00 00")
    assert disasm.one(code, 0, 32).text == "mov eax, 1"
    assert disasm.one(code, 0, 16).text == "mov ax, 1"


def test_instruction_ending_at_rip_keeps_its_rex_prefix() -> None:
    # movabs rax, imm; mov [rbx+0x10], rax: the 3-byte suffix 89 43 10 decodes too
    # (as a 4-byte store): the access size tells them apart
    code = bytes.fromhex("48 b8 88 77 66 55 44 33 22 11 48 89 43 10")
    end = 0x1000 + len(code)
    found = disasm.ending_at(code, end, 64, "memory", size=8)
    assert found is not None and found.text == "mov qword ptr [rbx + 0x10], rax"
    assert found.address == end - 4
    assert disasm.ending_at(code, end, 64, "memory", size=4).size == 3


def test_io_instruction_ending_at_rip() -> None:
    code = bytes.fromhex("66 ba f8 03 ee")  # mov dx, 0x3f8; out dx, al
    found = disasm.ending_at(code, 0x104, 64, "io", size=1)
    assert found is not None and found.text == "out dx, al" and found.address == 0x103
    assert found.access_size == 1 and found.is_io


def test_a_mnemonic_can_be_wanted() -> None:
    code = bytes.fromhex("fa f4")
    assert disasm.ending_at(code, 2, 64, "hlt").text == "hlt"
    assert disasm.ending_at(code, 2, 64, "out") is None


def test_around_rip_shows_the_instructions_before_and_after() -> None:
    code = bytes.fromhex("48 c7 c0 34 12 00 00 0f 0b f4")
    insns = disasm.around(code, 0x10000, 0x10007, 64)
    assert [i.text for i in insns] == ["mov rax, 0x1234", "ud2", "hlt"]


def test_undecodable_bytes_give_none() -> None:
    assert disasm.one(b"\x0f", 0, 64) is None
    assert disasm.one(b"", 0, 64) is None


@given(st.binary(max_size=40), st.sampled_from([16, 32, 64]))
def test_decoding_arbitrary_bytes_never_fails(code: bytes, bits: int) -> None:
    disasm.disassemble(code, 0x1000, bits, 8)
    disasm.ending_at(code, 0x1000 + len(code), bits, "memory", size=4)
    if code:
        disasm.around(code, 0x1000, 0x1000 + len(code) // 2, bits)
