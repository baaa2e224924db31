"""i8042: Linux's probe, its keyboard probe and its reboot, through the two ports only."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.bus import NullIrq
from kvmpy.devices.i8042 import I8042

DATA, STATUS = 0, 4  # ports 0x60 and 0x64 at base 0x60
# drivers/input/serio/i8042.h: command = (bytes in << 8) | (bytes out << 12) | opcode
CMD_CTL_RCTR, CMD_CTL_WCTR, CMD_CTL_TEST = 0x0120, 0x1060, 0x01AA
CMD_AUX_DISABLE, CMD_AUX_ENABLE, CMD_AUX_TEST, CMD_AUX_LOOP = 0x00A7, 0x00A8, 0x01A9, 0x11D3
CMD_KBD_DISABLE, CMD_KBD_ENABLE, CMD_KBD_TEST = 0x00AD, 0x00AE, 0x01AB
CMD_READ_OUTPUT, CMD_WRITE_OUTPUT = 0x01D0, 0x10D1
STR_OBF, STR_IBF, STR_SYSFLAG, STR_CMDDAT, STR_KEYLOCK, STR_AUXDATA = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20)
CTR_KBDINT, CTR_AUXINT, CTR_KBDDIS, CTR_AUXDIS, CTR_XLATE = 0x01, 0x02, 0x10, 0x20, 0x40


class LinuxI8042:
    """The command path of drivers/input/serio/i8042.c. A wait that would time out
    (0.5 s each on real Linux) is recorded instead of waited for."""

    def __init__(self, dev: I8042) -> None:
        self.dev = dev
        self.timeouts: list[int] = []

    def status(self) -> int:
        return self.dev.read(STATUS, 1)[0]

    def data(self) -> int:
        return self.dev.read(DATA, 1)[0]

    def command(self, param: list[int], command: int) -> int:
        """__i8042_command(): 0, -1 for "auxerr", -110 for a timeout."""
        assert not self.status() & STR_IBF  # i8042_wait_write
        self.dev.write(STATUS, bytes([command & 0xFF]))
        for i in range((command >> 12) & 0xF):
            assert not self.status() & STR_IBF
            self.dev.write(DATA, bytes([param[i]]))
        for i in range((command >> 8) & 0xF):
            if not self.status() & STR_OBF:  # i8042_wait_read would spin 10000 x 50 us
                self.timeouts.append(command)
                return -110
            if command == CMD_AUX_LOOP and not self.status() & STR_AUXDATA:
                return -1
            param[i] = self.data()
        return 0

    def flush(self) -> int:
        count = 0
        while self.status() & STR_OBF and count < 16:
            self.data()
            count += 1
        return count


@pytest.fixture
def kbc() -> tuple[I8042, list[int], NullIrq]:
    resets: list[int] = []
    irq = NullIrq()
    return I8042(lambda: resets.append(1), irq), resets, irq


def test_linux_probe_finds_a_keyboard_controller_and_no_aux_port_without_waiting(kbc):
    dev, resets, irq = kbc
    linux = LinuxI8042(dev)
    # i8042_controller_check, i8042_controller_selftest
    assert linux.flush() < 16
    param = [0]
    assert linux.command(param, CMD_CTL_TEST) == 0 and param == [0x55]
    # i8042_controller_init: a stable CTR, keylock off, translation on
    ctr = [[0], [0]]
    assert linux.command(ctr[0], CMD_CTL_RCTR) == 0
    assert linux.command(ctr[1], CMD_CTL_RCTR) == 0
    assert ctr[0] == ctr[1]
    value = ctr[0][0]
    assert value & CTR_XLATE and value & CTR_KBDINT
    assert linux.status() & STR_KEYLOCK
    value = (value | CTR_KBDDIS) & ~CTR_KBDINT
    assert linux.command([value], CMD_CTL_WCTR) == 0
    assert linux.flush() == 0
    # i8042_check_aux: the loop test fails fast, the interface test says "no AUX"
    linux.flush()
    param = [0x5A]
    retval = linux.command(param, CMD_AUX_LOOP)
    assert retval == -1  # auxerr, not a timeout
    assert linux.command(param, CMD_AUX_TEST) == 0
    assert param[0] not in (0x00, 0xFA, 0xFF)  # -> return -1: no AUX port
    # i8042_enable_kbd_port
    value = (value & ~CTR_KBDDIS) | CTR_KBDINT
    assert linux.command([value], CMD_CTL_WCTR) == 0
    param = [0]
    assert linux.command(param, CMD_KBD_TEST) == 0 and param == [0x00]
    assert linux.timeouts == []
    assert resets == []


def test_keyboard_answers_atkbd_with_one_interrupt_per_byte(kbc):
    dev, _, irq = kbc
    edges_before = irq.edges
    got = []

    def interrupt() -> None:  # i8042_interrupt(): one byte per interrupt
        if dev.read(STATUS, 1)[0] & STR_OBF:
            got.append(dev.read(DATA, 1)[0])

    def send(byte: int) -> None:  # i8042_kbd_write
        dev.write(DATA, bytes([byte]))

    handled = edges_before
    send(0xF2)  # ATKBD_CMD_GETID
    while handled < irq.edges:
        handled += 1
        interrupt()
    assert got == [0xFA, 0xAB, 0x41]  # translated ID (CTR.XLATE is set)
    assert irq.edges - edges_before == 3
    assert not irq.level
    got.clear()
    for byte in (0xED, 0x00, 0xF3, 0x20, 0xF4, 0xFF, 0xEE):
        send(byte)
        while handled < irq.edges:
            handled += 1
            interrupt()
    assert got == [0xFA, 0xFA, 0xFA, 0xFA, 0xFA, 0xFA, 0xAA, 0xEE]


def test_untranslated_keyboard_id_and_scancode_set(kbc):
    dev, _, _ = kbc
    dev.write(STATUS, b"\x60")
    dev.write(DATA, bytes([CTR_KBDINT | 0x04]))  # XLATE off
    out = []
    for byte in (0xF2, 0xF0, 0x00):
        dev.write(DATA, bytes([byte]))
        while dev.read(STATUS, 1)[0] & STR_OBF:
            out.append(dev.read(DATA, 1)[0])
    assert out == [0xFA, 0xAB, 0x83, 0xFA, 0xFA, 0x02]


def test_keyboard_bytes_wait_while_the_interface_is_disabled(kbc):
    dev, _, irq = kbc
    dev.write(DATA, b"\xff")  # reset: FA then AA
    assert dev.read(DATA, 1) == b"\xfa"  # AA moves into the output buffer
    dev.write(STATUS, b"\xad")  # disable the keyboard interface
    dev.write(STATUS, b"\x20")  # the CTR reply pushes AA back to the keyboard
    assert dev.read(DATA, 1)[0] & CTR_KBDDIS
    assert not dev.read(STATUS, 1)[0] & STR_OBF  # AA waits in the keyboard
    assert not irq.level
    dev.write(STATUS, b"\xae")
    assert dev.read(STATUS, 1)[0] & STR_OBF and irq.level
    assert dev.read(DATA, 1) == b"\xaa"


def test_controller_reply_does_not_lose_a_keyboard_byte(kbc):
    dev, _, _ = kbc
    dev.write(DATA, b"\xff")  # FA AA from the keyboard
    dev.write(STATUS, b"\x20")  # CTR takes the output buffer
    assert [dev.read(DATA, 1)[0] for _ in range(4)] == [0x45, 0xFA, 0xAA, 0x00]


def test_command_byte_read_write_and_port_enables(kbc):
    dev, _, irq = kbc
    linux = LinuxI8042(dev)
    param = [0]
    linux.command(param, CMD_CTL_RCTR)
    assert param == [0x45]
    assert linux.status() & STR_SYSFLAG
    assert linux.status() & STR_CMDDAT
    linux.command([0x74], CMD_CTL_WCTR)
    assert not linux.status() & STR_CMDDAT  # last write went to the data port
    linux.command(param, CMD_CTL_RCTR)
    assert param == [0x74]
    for cmd, bit, on in ((CMD_KBD_ENABLE, CTR_KBDDIS, False), (CMD_KBD_DISABLE, CTR_KBDDIS, True),
                         (CMD_AUX_ENABLE, CTR_AUXDIS, False), (CMD_AUX_DISABLE, CTR_AUXDIS, True)):
        linux.command([], cmd)
        linux.command(param, CMD_CTL_RCTR)
        assert bool(param[0] & bit) == on
    assert linux.timeouts == []


def test_output_port_read_write(kbc):
    dev, resets, _ = kbc
    linux = LinuxI8042(dev)
    param = [0]
    linux.command(param, CMD_READ_OUTPUT)
    assert param[0] & 0x03 == 0x03  # reset line inactive, A20 on
    linux.command([0xDF], CMD_WRITE_OUTPUT)  # the classic A20 enable
    linux.command(param, CMD_READ_OUTPUT)
    assert param == [0xDF]
    assert resets == []
    linux.command([0xDE], CMD_WRITE_OUTPUT)  # bit 0 low: CPU reset
    assert resets == [1]


def test_reboot_pulses_the_reset_line(kbc):
    """arch/x86/kernel/reboot.c BOOT_KBD: kb_wait(), then 0xFE to port 0x64."""
    dev, resets, _ = kbc
    assert not dev.read(STATUS, 1)[0] & STR_IBF
    dev.write(STATUS, b"\xfe")
    assert resets == [1]
    dev.write(STATUS, b"\xff")  # pulses nothing
    dev.write(DATA, b"\xfe")  # a keyboard byte, not a command
    assert resets == [1]
    assert dev.resets == 1


def test_empty_data_port_reads_zero_and_other_ports(kbc):
    dev, _, _ = kbc
    assert dev.read(DATA, 1) == b"\x00"
    assert not dev.read(STATUS, 1)[0] & STR_OBF
    assert dev.read(2, 1) == b"\xff"
    dev.write(1, b"\x03")  # port 0x61: timer 2 gate and speaker
    assert dev.read(1, 1)[0] == 0x23
    assert dev.read(STATUS, 2)[1] == 0
    assert dev.read(DATA, 0) == b""


def test_works_without_a_keyboard_interrupt_line():
    dev = I8042(lambda: None)
    dev.write(DATA, b"\xf2")
    assert [dev.read(DATA, 1)[0] for _ in range(3)] == [0xFA, 0xAB, 0x41]


ops = st.lists(st.tuples(st.sampled_from(["r", "w"]), st.integers(0, 4), st.integers(0, 255),
                         st.integers(0, 4)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_random_accesses_never_raise_or_hang(sequence):
    irq = NullIrq()
    dev = I8042(lambda: None, irq)
    for op, offset, value, size in sequence:
        if op == "r":
            assert len(dev.read(offset, size)) == size
        else:
            dev.write(offset, bytes([value]) * size)
        status = dev.read(STATUS, 1)[0]
        assert not status & STR_IBF  # kb_wait() and i8042_wait_write() never spin
        if irq.level:
            assert status & STR_OBF
        if not status & STR_OBF:
            assert not irq.level
            assert dev.read(DATA, 1) == b"\x00"
    # whatever happened, the controller still answers its self-test
    dev.write(STATUS, b"\xaa")
    assert dev.read(DATA, 1) == b"\x55"
