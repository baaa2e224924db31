"""DR0-DR3 and DR7 for gdb's breakpoints and watchpoints (Intel SDM Vol. 3B §18.2)."""

import pytest

from kvmpy.gdb.debugregs import DebugRegisters, HwPoint, NoSlot

KERNEL = 0xFFFF_FFFF_8100_0000


def test_one_execute_breakpoint() -> None:
    d = DebugRegisters()
    d.insert(HwPoint("hw", KERNEL))
    assert d.debugreg() == [KERNEL, 0, 0, 0, 0, 0, 0, 0x401]  # L0, reserved bit 10
    assert d.executes_at(KERNEL) and not d.executes_at(KERNEL + 1)


def test_watchpoints_encode_condition_and_length() -> None:
    d = DebugRegisters()
    d.insert(HwPoint("sw", 0x1000))
    d.insert(HwPoint("write", 0x2000, 4))
    d.insert(HwPoint("access", 0x3000, 8))
    dr7 = d.dr7()
    assert dr7 & 0xFF == 0b010101  # L0, L1, L2
    assert (dr7 >> 16) & 0xF == 0b0000  # slot 0: execute, length 1
    assert (dr7 >> 20) & 0xF == 0b1101  # slot 1: write, 4 bytes
    assert (dr7 >> 24) & 0xF == 0b1011  # slot 2: read/write, 8 bytes
    assert dr7 & (3 << 8) == 3 << 8  # LE/GE with data breakpoints
    assert not d.executes_at(0x2000)


def test_four_slots_then_no_more() -> None:
    d = DebugRegisters()
    for i in range(4):
        d.insert(HwPoint("hw", 0x1000 + i))
    d.insert(HwPoint("hw", 0x1000))  # already there: fine
    with pytest.raises(NoSlot):
        d.insert(HwPoint("hw", 0x2000))
    assert d.remove(HwPoint("hw", 0x1001))
    d.insert(HwPoint("hw", 0x2000))
    assert d.slots[1] == HwPoint("hw", 0x2000)


def test_watchpoints_must_be_aligned_and_sized() -> None:
    d = DebugRegisters()
    with pytest.raises(ValueError):
        d.insert(HwPoint("write", 0x1002, 4))
    with pytest.raises(ValueError):
        d.insert(HwPoint("write", 0x1000, 3))


def test_dr6_says_which_slot_hit() -> None:
    d = DebugRegisters()
    d.insert(HwPoint("hw", 0x1000))
    d.insert(HwPoint("write", 0x2000, 2))
    assert d.hit(0xFFFF0FF1) == HwPoint("hw", 0x1000)  # measured on PVM: B0
    assert d.hit(0xFFFF0FF2) == HwPoint("write", 0x2000, 2)
    assert d.hit(0xFFFF4FF0) is None  # BS: a single step
