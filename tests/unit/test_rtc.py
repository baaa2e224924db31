"""CMOS RTC: the time Linux reads through ports 0x70/0x71, in every format register B allows."""

from __future__ import annotations

import calendar
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.devices.rtc import Rtc

INDEX, DATA = 0, 1
SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D, CENTURY = 0x0A, 0x0B, 0x0C, 0x0D, 0x32
UIP = 0x80
SET, UIE, DM_BINARY, H24 = 0x80, 0x10, 0x04, 0x02
LEAP_DAY = calendar.timegm((2024, 2, 29, 13, 45, 7))  # a Thursday


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cmos_read(rtc: Rtc, index: int) -> int:
    rtc.write(INDEX, bytes([index]))
    return rtc.read(DATA, 1)[0]


def cmos_write(rtc: Rtc, index: int, value: int) -> None:
    rtc.write(INDEX, bytes([index]))
    rtc.write(DATA, bytes([value]))


def bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(LEAP_DAY + 0.5)


def test_power_on_registers(clock):
    rtc = Rtc(clock)
    assert cmos_read(rtc, REG_A) == 0x26
    assert cmos_read(rtc, REG_B) == H24  # BCD, 24-hour
    assert cmos_read(rtc, REG_D) == 0x80  # valid RAM and time
    cmos_write(rtc, REG_D, 0)
    assert cmos_read(rtc, REG_D) == 0x80


def test_time_in_bcd_by_default(clock):
    rtc = Rtc(clock)
    got = [cmos_read(rtc, r) for r in (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR,
                                       CENTURY)]
    assert got == [0x07, 0x45, 0x13, 5, 0x29, 0x02, 0x24, 0x20]


def test_time_in_binary_when_register_b_says_so(clock):
    rtc = Rtc(clock)
    cmos_write(rtc, REG_B, DM_BINARY | H24)
    got = [cmos_read(rtc, r) for r in (SECONDS, MINUTES, HOURS, DAY, MONTH, YEAR, CENTURY)]
    assert got == [7, 45, 13, 29, 2, 24, 20]


@pytest.mark.parametrize("hour,bcd12,bin12", [(0, 0x12, 12), (1, 0x01, 1), (11, 0x11, 11),
                                              (12, 0x92, 0x8C), (13, 0x81, 0x81),
                                              (23, 0x91, 0x8B)])
def test_twelve_hour_mode_sets_bit_7_for_pm(hour, bcd12, bin12):
    rtc = Rtc(FakeClock(calendar.timegm((2024, 1, 1, hour, 0, 0))))
    cmos_write(rtc, REG_B, 0)
    assert cmos_read(rtc, HOURS) == bcd12
    cmos_write(rtc, REG_B, DM_BINARY)
    assert cmos_read(rtc, HOURS) == bin12


def test_nmi_disable_bit_of_the_index_is_ignored(clock):
    rtc = Rtc(clock)
    rtc.write(INDEX, bytes([0x80 | MINUTES]))
    assert rtc.read(DATA, 1) == b"\x45"
    assert rtc.read(INDEX, 1) == b"\xff"  # the index port is write-only


def test_uip_is_set_around_the_second_tick(clock):
    rtc = Rtc(clock)
    for phase, uip in ((0.5, False), (0.9999, True), (0.0005, True), (0.0019, True),
                       (0.0021, False), (0.9990, False)):
        clock.now = LEAP_DAY + phase
        assert bool(cmos_read(rtc, REG_A) & UIP) == uip, phase
        assert cmos_read(rtc, REG_A) & 0x7F == 0x26


def test_linux_avoid_uip_loop_terminates_with_a_consistent_time(clock):
    """drivers/rtc/rtc-mc146818-lib.c mc146818_avoid_UIP(), udelay(100) per retry."""
    rtc = Rtc(clock)
    clock.now = LEAP_DAY + 0.99990  # 100 us before the tick
    tries = 0
    while tries < 100:
        tries += 1
        seconds = cmos_read(rtc, SECONDS)
        if cmos_read(rtc, REG_A) & UIP:
            clock.now += 100e-6
            continue
        if seconds != cmos_read(rtc, SECONDS):
            continue
        fields = [cmos_read(rtc, r) for r in (MINUTES, HOURS, DAY, MONTH, YEAR)]
        if cmos_read(rtc, REG_A) & UIP or seconds != cmos_read(rtc, SECONDS):
            continue
        break
    assert tries < 30, "mc146818_avoid_UIP would retry for too long"
    assert seconds == 0x08 and fields == [0x45, 0x13, 0x29, 0x02, 0x24]


def test_register_c_reports_update_ended_and_clears_on_read(clock):
    rtc = Rtc(clock)
    assert cmos_read(rtc, REG_C) == 0
    clock.now += 1
    assert cmos_read(rtc, REG_C) == 0x10  # UF
    assert cmos_read(rtc, REG_C) == 0
    cmos_write(rtc, REG_B, H24 | UIE)
    clock.now += 1
    assert cmos_read(rtc, REG_C) == 0x90  # IRQF | UF
    cmos_write(rtc, REG_C, 0xFF)  # read-only
    assert cmos_read(rtc, REG_C) == 0


def test_linux_set_time_sequence_moves_the_guest_clock(clock):
    """mc146818_set_time(): SET, divider reset, fields, then restore A and B."""
    rtc = Rtc(clock)
    save_control = cmos_read(rtc, REG_B)
    cmos_write(rtc, REG_B, save_control | SET)
    save_freq_select = cmos_read(rtc, REG_A)
    cmos_write(rtc, REG_A, save_freq_select | 0x70)
    for reg, value in ((YEAR, 0x99), (MONTH, 0x12), (DAY, 0x31), (HOURS, 0x23), (MINUTES, 0x59),
                       (SECONDS, 0x58)):
        cmos_write(rtc, reg, value)
    cmos_write(rtc, CENTURY, 0x19)
    clock.now += 30  # stopped while SET is 1
    assert cmos_read(rtc, SECONDS) == 0x58
    cmos_write(rtc, REG_B, save_control)
    cmos_write(rtc, REG_A, save_freq_select)
    assert [cmos_read(rtc, r) for r in (SECONDS, MINUTES, HOURS, DAY, MONTH, YEAR, CENTURY)] == [
        0x58, 0x59, 0x23, 0x31, 0x12, 0x99, 0x19]
    clock.now += 3
    assert [cmos_read(rtc, r) for r in (SECONDS, MINUTES, HOURS, DAY, MONTH, YEAR, CENTURY)] == [
        0x01, 0x00, 0x00, 0x01, 0x01, 0x00, 0x20]
    assert cmos_read(rtc, WEEKDAY) == 7  # 1 January 2000 was a Saturday


def test_a_single_field_write_without_set_takes_effect_at_once(clock):
    rtc = Rtc(clock)
    cmos_write(rtc, MINUTES, 0x05)
    assert cmos_read(rtc, MINUTES) == 0x05
    assert cmos_read(rtc, HOURS) == 0x13


def test_an_impossible_time_is_ignored(clock):
    rtc = Rtc(clock)
    cmos_write(rtc, REG_B, H24 | SET)
    cmos_write(rtc, MONTH, 0x13)
    cmos_write(rtc, REG_B, H24)
    assert cmos_read(rtc, MONTH) == 0x02
    cmos_write(rtc, DAY, 0x30)  # 30 February
    assert cmos_read(rtc, DAY) == 0x29


def test_cmos_storage_and_memory_size_bytes(clock):
    rtc = Rtc(clock, ram_below_4g=3 << 30, ram_above_4g=1 << 30)
    assert (cmos_read(rtc, 0x15), cmos_read(rtc, 0x16)) == (0x80, 0x02)  # 640 KiB
    assert (cmos_read(rtc, 0x17), cmos_read(rtc, 0x18)) == (0xFF, 0xFF)  # capped
    assert (cmos_read(rtc, 0x34), cmos_read(rtc, 0x35)) == (0x00, 0xBF)  # 48896 x 64 KiB
    assert [cmos_read(rtc, i) for i in (0x5B, 0x5C, 0x5D)] == [0x00, 0x40, 0x00]
    for index in (0x0E, 0x40, 0x7F):
        cmos_write(rtc, index, index ^ 0x5A)
        assert cmos_read(rtc, index) == index ^ 0x5A
    assert cmos_read(rtc, 0x20) == 0
    assert rtc.read(DATA, 2) == bytes([cmos_read(rtc, 0x20), 0])


def decode(rtc: Rtc) -> tuple[int, ...]:
    b = cmos_read(rtc, REG_B)
    conv = (lambda v: v) if b & DM_BINARY else bcd
    hour_raw = cmos_read(rtc, HOURS)
    if b & H24:
        hour = conv(hour_raw)
    else:
        hour = conv(hour_raw & 0x7F) % 12 + (12 if hour_raw & 0x80 else 0)
    return (conv(cmos_read(rtc, CENTURY)) * 100 + conv(cmos_read(rtc, YEAR)),
            conv(cmos_read(rtc, MONTH)), conv(cmos_read(rtc, DAY)), hour,
            conv(cmos_read(rtc, MINUTES)), conv(cmos_read(rtc, SECONDS)))


not_time = st.integers(0, 0x7F).filter(
    lambda i: i not in (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**33), st.lists(st.tuples(not_time, st.integers(0, 255)), max_size=30))
def test_time_reads_back_in_any_format(now, writes):
    clock = FakeClock(now + 0.5)
    rtc = Rtc(clock)
    for index, value in writes:
        cmos_write(rtc, index, value & ~SET if index == REG_B else value)
    assert decode(rtc) == time.gmtime(now)[:6]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.booleans(), st.integers(0, 255),
                          st.integers(0, 4)), max_size=60),
       st.integers(0, 2**33))
def test_random_accesses_never_raise(sequence, now):
    clock = FakeClock(now)
    rtc = Rtc(clock)
    for offset, is_write, value, size in sequence:
        clock.now += 0.37
        if is_write:
            rtc.write(offset, bytes([value]) * size)
        else:
            assert len(rtc.read(offset, size)) == size
    assert cmos_read(rtc, REG_D) == 0x80
