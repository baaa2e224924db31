"""The MC146818 CMOS real-time clock and its 128 bytes of CMOS RAM, at ports 0x70/0x71.

What it is: an index port (offset 0, write-only; bit 7 is the PC's NMI-disable
bit, ignored here) and a data port (offset 1) reading or writing the register
the index selects, registered at base 0x70 with length 2.

  0x00-0x09  seconds, alarm seconds, minutes, alarm minutes, hours, alarm hours,
             day of week (Sunday = 1), day of month, month, year (two digits):
             the host's clock in UTC, encoded as register B says: BCD or binary
             (DM, bit 2), 24-hour or 12-hour with bit 7 = PM (bit 1). Alarms are
             plain storage.
  0x0A  A    UIP (bit 7) and the divider/rate bits (reset 0x26: 32.768 kHz, 1024 Hz).
             UIP reads 1 for the 244 us before each second ticks over and the
             1984 us update after it, as the chip does, so Linux's
             mc146818_avoid_UIP() retries briefly and then reads a stable time.
  0x0B  B    SET, PIE, AIE, UIE, SQWE, DM, 24/12, DSE (reset 0x02: BCD, 24-hour).
             While SET is 1 the clock stops and writes to the time registers
             take effect when SET returns to 0 (Linux's mc146818_set_time()
             writes them in that order); a write with SET clear takes effect at
             once. The guest's time is kept as an offset from the host's.
  0x0C  C    IRQF, PF, AF, UF; reading clears it. UF is set when a second has
             ticked since the last read, IRQF when UF is set and UIE enables it.
  0x0D  D    VRT (0x80): the RAM and time are valid. Read-only.
  0x32       century (BCD or binary, as the other fields).
  0x0E-0x7F  CMOS storage; when given the RAM size, the conventional memory-size
             bytes a BIOS leaves (0x15/0x16, 0x17/0x18, 0x30/0x31, 0x34/0x35,
             0x5B-0x5D).

What it is not: no interrupt (IRQ 8) at all: no periodic, alarm or
update-ended interrupt, PF and AF never set. Linux needs none of them to read
the time. No extended CMOS bank (ports 0x72/0x73).

Learned from kvmtool hw/rtc.c (fields straight from the host clock) and the
MC146818A datasheet's register descriptions.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from kvmpy.log import get_logger
from kvmpy.state.values import StateReader, b64

log = get_logger(__name__)

PORT_SPAN = 2
INDEX = 0  # port 0x70
DATA = 1  # port 0x71
NMI_DISABLE = 0x80  # bit 7 of the index: ignored

REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_DAY_OF_WEEK = 0x06
REG_DAY_OF_MONTH = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32
CMOS_SIZE = 128

# Register A
A_UIP = 0x80  # update in progress
A_DEFAULT = 0x26  # DV = 010 (32.768 kHz time base), RS = 0110 (1024 Hz)
# Register B
B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_SQWE = 0x08
B_DM_BINARY = 0x04
B_24H = 0x02
B_DSE = 0x01
B_DEFAULT = B_24H
# Register C
C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10
# Register D
D_VRT = 0x80
HOUR_PM = 0x80  # in 12-hour mode

UIP_BEFORE = 244e-6  # UIP rises this long before the update (MC146818A, register A)
UIP_AFTER = 1984e-6  # and the update cycle itself lasts this long

# Where each time register lives in a fields list (all binary, hours 0-23).
FIELDS = {REG_SECONDS: 0, REG_MINUTES: 1, REG_HOURS: 2, REG_DAY_OF_WEEK: 3,
          REG_DAY_OF_MONTH: 4, REG_MONTH: 5, REG_YEAR: 6, REG_CENTURY: 7}

KiB = 1024
MiB = 1024 * KiB
# How far a restored guest clock may be from the host's (about 270 years): time.gmtime
# must be able to show it, whatever the snapshot says.
MAX_OFFSET_S = 1 << 33


class Rtc:
    """CMOS RTC; `clock()` gives the host time in seconds since the epoch (tests pass a fake).

    `ram_below_4g`/`ram_above_4g` (bytes) fill the CMOS memory-size bytes some
    firmware and boot loaders read; Linux does not.
    """

    def __init__(self, clock: Callable[[], float] = time.time, *, ram_below_4g: int = 0,
                 ram_above_4g: int = 0) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._index = 0
        self._cmos = bytearray(CMOS_SIZE)
        self._cmos[REG_A] = A_DEFAULT
        self._cmos[REG_B] = B_DEFAULT
        self._cmos[REG_D] = D_VRT
        self._offset = 0  # guest time minus host time, whole seconds
        self._frozen: list[int] | None = None  # the time fields while B.SET is 1
        self._last_c_second = math.floor(clock())
        self._warned = False
        if ram_below_4g:
            self._set_memory_size(ram_below_4g, ram_above_4g)

    # -- the Device protocol ------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        """The selected register at the data port; wider reads pad with zeros."""
        if size <= 0:
            return b""
        value = 0xFF  # the index port is write-only
        if offset == DATA:
            with self._lock:
                value = self._read_register(self._index)
        return bytes((value,)) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        """Write the first byte of `data` (the index port's bit 7, NMI disable, is dropped)."""
        if not data:
            return
        value = data[0]
        with self._lock:
            if offset == INDEX:
                self._index = value & ~NMI_DISABLE
            elif offset == DATA:
                self._write_register(self._index, value)

    # -- state ------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """CMOS RAM, the index, and the guest's clock as an offset from the host's.

        The clock is not frozen in a snapshot: a restored RTC reads the host's time
        plus the guest's offset, as a battery-backed clock would have kept counting.
        """
        with self._lock:
            return {"index": self._index, "cmos": b64(self._cmos), "offset": self._offset,
                    "frozen": self._frozen, "last_c_second": self._last_c_second}

    def restore(self, state: object, where: str = "rtc") -> None:
        r = StateReader(state, where)
        index = r.int("index", 0, CMOS_SIZE - 1)
        cmos = r.bytes("cmos", CMOS_SIZE, exact=CMOS_SIZE)
        offset = r.int("offset", -MAX_OFFSET_S, MAX_OFFSET_S)
        frozen = None if r.null("frozen") else r.ints("frozen", len(FIELDS), 0, 0xFF,
                                                       exact=len(FIELDS))
        last_c_second = r.int("last_c_second", 0, 1 << 40)
        r.done()
        with self._lock:
            self._index, self._offset, self._last_c_second = index, offset, last_c_second
            self._cmos[:] = cmos
            self._cmos[REG_A] &= ~A_UIP
            self._frozen = frozen

    # -- registers --------------------------------------------------------------
    def _read_register(self, index: int) -> int:
        if index in FIELDS:
            return self._encode(index, self._fields()[FIELDS[index]])
        if index == REG_A:
            return self._cmos[REG_A] | (A_UIP if self._updating() else 0)
        if index == REG_C:
            return self._read_c()
        return self._cmos[index]

    def _write_register(self, index: int, value: int) -> None:
        if index in FIELDS:
            if self._frozen is not None:  # SET is 1: applied when it returns to 0
                self._frozen[FIELDS[index]] = self._decode(index, value)
            else:  # SET is clear: the new time starts now
                fields = self._fields()
                fields[FIELDS[index]] = self._decode(index, value)
                self._set_time(fields)
        elif index == REG_A:
            self._cmos[REG_A] = value & ~A_UIP
        elif index == REG_B:
            self._write_b(value)
        elif index not in (REG_C, REG_D):  # C and D are read-only
            self._cmos[index] = value

    def _write_b(self, value: int) -> None:
        if value & B_SET:
            value &= ~B_UIE  # setting SET clears UIE (MC146818A, register B)
            if self._frozen is None:
                self._frozen = self._fields()
        elif self._frozen is not None:
            fields, self._frozen = self._frozen, None
            self._set_time(fields)
        self._cmos[REG_B] = value

    def _read_c(self) -> int:
        second = math.floor(self._clock())
        flags = 0
        if second != self._last_c_second and self._frozen is None:
            flags |= C_UF
            if self._cmos[REG_B] & B_UIE:
                flags |= C_IRQF
        self._last_c_second = second
        return flags

    # -- time -------------------------------------------------------------------
    def _fields(self) -> list[int]:
        """[sec, min, hour, weekday, day, month, year % 100, century] of the guest's clock."""
        if self._frozen is not None:
            return list(self._frozen)
        tm = time.gmtime(math.floor(self._clock()) + self._offset)
        return [tm.tm_sec, tm.tm_min, tm.tm_hour, (tm.tm_wday + 1) % 7 + 1, tm.tm_mday,
                tm.tm_mon, tm.tm_year % 100, tm.tm_year // 100]

    def _set_time(self, fields: list[int]) -> None:
        import calendar  # only a guest that sets the clock pays for the import

        sec, minute, hour, _, day, month, year, century = fields
        try:
            # calendar.monthrange validates the month and bounds the day
            if not 1 <= day <= calendar.monthrange(century * 100 + year, month)[1]:
                raise ValueError(f"day {day}")
            if not (0 <= sec < 60 and 0 <= minute < 60 and 0 <= hour < 24):
                raise ValueError(f"time {hour}:{minute}:{sec}")
            when = calendar.timegm((century * 100 + year, month, day, hour, minute, sec))
            time.gmtime(when)  # representable on this host
        except (ValueError, OverflowError, OSError) as e:
            if not self._warned:
                self._warned = True
                log.warning("rtc: guest set an invalid time (%s); the clock keeps its time", e)
            return
        self._offset = when - math.floor(self._clock())

    def _updating(self) -> bool:
        if self._frozen is not None:
            return False  # SET stops update cycles
        phase = self._clock() % 1.0
        return phase >= 1.0 - UIP_BEFORE or phase < UIP_AFTER

    def _encode(self, index: int, value: int) -> int:
        b = self._cmos[REG_B]
        pm = 0
        if index == REG_HOURS and not b & B_24H:
            pm = HOUR_PM if value >= 12 else 0
            value = value % 12 or 12
        if not b & B_DM_BINARY:
            value = (value // 10) << 4 | value % 10
        return (value & 0xFF) | pm

    def _decode(self, index: int, raw: int) -> int:
        b = self._cmos[REG_B]
        pm = False
        if index == REG_HOURS and not b & B_24H:
            pm, raw = bool(raw & HOUR_PM), raw & ~HOUR_PM
        value = raw if b & B_DM_BINARY else (raw >> 4) * 10 + (raw & 0x0F)
        if index == REG_HOURS and not b & B_24H:
            value = value % 12 + (12 if pm else 0)
        return value

    def _set_memory_size(self, below_4g: int, above_4g: int) -> None:
        """The memory-size bytes a PC BIOS leaves in CMOS (all little-endian)."""
        def put(index: int, value: int, width: int = 2) -> None:
            self._cmos[index:index + width] = min(value, (1 << 8 * width) - 1).to_bytes(
                width, "little")

        put(0x15, 640)  # base memory, KiB
        extended_kib = max(below_4g - MiB, 0) // KiB  # above 1 MiB, KiB
        put(0x17, extended_kib)
        put(0x30, extended_kib)
        put(0x34, max(below_4g - 16 * MiB, 0) // (64 * KiB))  # above 16 MiB, 64 KiB units
        put(0x5B, above_4g // (64 * KiB), 3)  # above 4 GiB, 64 KiB units
