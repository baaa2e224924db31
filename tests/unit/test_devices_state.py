"""The legacy devices' state() / restore(state): a busy device comes back exactly, and a
hostile state is refused in one line without touching the device (kvmpy.state.values)."""

from __future__ import annotations

import io
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.bus import NullIrq
from kvmpy.devices.acpi_pm import AcpiPm
from kvmpy.devices.i8042 import I8042
from kvmpy.devices.postcode import PostCode
from kvmpy.devices.rtc import Rtc
from kvmpy.devices.serial import Serial
from kvmpy.devices.testdev import TestDevice
from kvmpy.errors import SnapshotError
from tests.unit.hostile import check_restore, mutate, round_trip

HOSTILE = settings(max_examples=300, deadline=None,
                   suppress_health_check=list(HealthCheck))


def poke(device, span: int, seed: int = 1, ops: int = 400) -> None:  # type: ignore[no-untyped-def]
    """Random register traffic, as a guest could send: must never raise."""
    rng = random.Random(seed)
    for _ in range(ops):
        offset = rng.randrange(span)
        if rng.random() < 0.5:
            device.read(offset, rng.choice([1, 1, 2, 4]))
        else:
            device.write(offset, bytes([rng.randrange(256)]))


# -- 16550A UART ------------------------------------------------------------------------------
def busy_serial() -> tuple[Serial, NullIrq, io.BytesIO]:
    irq, out = NullIrq(), io.BytesIO()
    s = Serial(irq, out)
    s.write(3, b"\x83")  # DLAB
    s.write(0, b"\x01")
    s.write(1, b"\x00")  # 115200
    s.write(3, b"\x03")
    s.write(2, b"\xc1")  # FIFO on, trigger 14
    s.write(4, b"\x0b")  # DTR RTS OUT2
    s.write(1, b"\x07")  # ERBFI ETBEI ELSI
    s.write(7, b"\x5a")
    for byte in b"partial line":
        s.write(0, bytes([byte]))
    s.enqueue_input(b"typed input")
    s.read(0, 1)  # the guest took "t"
    return s, irq, out


def test_serial_round_trip_keeps_registers_buffers_and_line() -> None:
    s, irq, out = busy_serial()
    state = round_trip(s.state())
    irq2, out2 = NullIrq(), io.BytesIO()
    s2 = Serial(irq2, out2)
    s2.restore(state)
    assert s2.state() == s.state()
    assert irq2.level == irq.level is True
    for reg in range(8):  # the guest sees the same registers (IIR last: reading it acts)
        if reg not in (0, 2):
            assert s2.read(reg, 1) == s.read(reg, 1)
    assert b"".join(s2.read(0, 1) for _ in range(10)) == b"yped input"
    s2.flush()
    assert out2.getvalue() == b"partial line"  # never handed out before the save


def test_serial_saved_after_flush_prints_nothing_twice() -> None:
    s, _, out = busy_serial()
    s.flush()
    assert out.getvalue() == b"partial line"
    s2 = Serial(NullIrq(), out2 := io.BytesIO())
    s2.restore(round_trip(s.state()))
    s2.write(0, b"!")
    s2.write(0, b"\n")
    assert out2.getvalue() == b"!\n"


def test_serial_refuses_impossible_registers() -> None:
    s, _, _ = busy_serial()
    for field, value in (("ier", 0x10), ("mcr", 0x20), ("fcr", 0x02), ("lsr_errors", 0x01),
                         ("msr_delta", 0x10), ("dll", 256), ("thre_pending", 1)):
        state = s.state() | {field: value}
        fresh = Serial(NullIrq())
        with pytest.raises(SnapshotError, match=f"serial.{field}"):
            fresh.restore(state)
    with pytest.raises(SnapshotError, match="rx: expected base64 of at most 16"):
        Serial(NullIrq(), rx_capacity=16).restore(s.state() | {"rx": "A" * 40})


@HOSTILE
@given(data=st.data())
def test_serial_hostile_state(data: st.DataObject) -> None:
    good = busy_serial()[0].state()
    fresh = Serial(NullIrq())
    check_restore(mutate(data, good), fresh, fresh.restore, fresh.state,
                  lambda d: poke(d, 8))


# -- i8042 ------------------------------------------------------------------------------------
def busy_i8042() -> tuple[I8042, NullIrq]:
    irq = NullIrq()
    k = I8042(on_reset=lambda: None, kbd_irq=irq)
    k.write(4, b"\x60")  # write CTR
    k.write(0, b"\x47")
    k.write(0, b"\xff")  # keyboard reset: FA AA queued
    k.read(0, 1)
    k.write(0, b"\xed")  # set LEDs: waits for its parameter
    k.write(4, b"\xd1")  # write output port: waits for its data byte
    return k, irq


def test_i8042_round_trip() -> None:
    k, irq = busy_i8042()
    irq2 = NullIrq()
    k2 = I8042(on_reset=lambda: None, kbd_irq=irq2)
    k2.restore(round_trip(k.state()))
    assert k2.state() == k.state()
    assert irq2.level == irq.level
    assert [k2.read(4, 1) for _ in range(2)] == [k.read(4, 1) for _ in range(2)]
    assert [k2.read(0, 1) for _ in range(3)] == [k.read(0, 1) for _ in range(3)]


def test_i8042_refuses_a_pending_command_that_takes_no_data() -> None:
    k, _ = busy_i8042()
    with pytest.raises(SnapshotError, match="i8042.pending: 0xaa is not a command"):
        I8042(on_reset=lambda: None).restore(k.state() | {"pending": 0xAA})
    with pytest.raises(SnapshotError, match="i8042.kbd: expected a list of at most 16"):
        I8042(on_reset=lambda: None).restore(k.state() | {"kbd": [0] * 17})


@HOSTILE
@given(data=st.data())
def test_i8042_hostile_state(data: st.DataObject) -> None:
    fresh = I8042(on_reset=lambda: None, kbd_irq=NullIrq())
    check_restore(mutate(data, busy_i8042()[0].state()), fresh, fresh.restore, fresh.state,
                  lambda d: poke(d, 5))


# -- CMOS RTC ----------------------------------------------------------------------------------
class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rtc_time(rtc: Rtc) -> list[int]:
    out = []
    for reg in (0, 2, 4, 7, 8, 9, 0x32):
        rtc.write(0, bytes([reg]))
        out.append(rtc.read(1, 1)[0])
    return out


def busy_rtc(clock: Clock) -> Rtc:
    rtc = Rtc(clock, ram_below_4g=256 << 20)
    rtc.write(0, b"\x0b")
    rtc.write(1, b"\x86")  # SET, binary, 24h
    for reg, value in ((9, 30), (8, 7), (7, 4)):  # 2030-07-04
        rtc.write(0, bytes([reg]))
        rtc.write(1, bytes([value]))
    rtc.write(0, b"\x0b")
    rtc.write(1, b"\x06")  # SET cleared: the new date starts now
    rtc.write(0, b"\x40")
    rtc.write(1, b"\x99")  # CMOS storage
    return rtc


def test_rtc_round_trip_keeps_the_guest_clock_running_with_the_host() -> None:
    clock = Clock(1_700_000_000.25)
    rtc = busy_rtc(clock)
    rtc2 = Rtc(clock)
    rtc2.restore(round_trip(rtc.state()))
    assert rtc2.state() == rtc.state()
    assert rtc_time(rtc2) == rtc_time(rtc)
    clock.now += 3600  # an hour later on the host: an hour later in both
    assert rtc_time(rtc2) == rtc_time(rtc)
    rtc2.write(0, b"\x40")
    assert rtc2.read(1, 1) == b"\x99"


def test_rtc_refuses_an_offset_the_host_cannot_show() -> None:
    rtc = busy_rtc(Clock(1_700_000_000))
    with pytest.raises(SnapshotError, match="rtc.offset"):
        Rtc().restore(rtc.state() | {"offset": 10**13})
    with pytest.raises(SnapshotError, match="rtc.frozen: 3 items, expected 8"):
        Rtc().restore(rtc.state() | {"frozen": [1, 2, 3]})


@HOSTILE
@given(data=st.data())
def test_rtc_hostile_state(data: st.DataObject) -> None:
    clock = Clock(1_700_000_000.5)
    fresh = Rtc(clock)
    check_restore(mutate(data, busy_rtc(clock).state()), fresh, fresh.restore, fresh.state,
                  lambda d: poke(d, 2))


# -- ACPI PM, POST code, test device ------------------------------------------------------------
def test_small_devices_round_trip() -> None:
    pm = AcpiPm(on_poweroff=lambda: None, on_reboot=lambda: None)
    pm.write(0, bytes([3 << 2]))  # SLP_TYP 3 without SLP_EN
    pm2 = AcpiPm(on_poweroff=lambda: None, on_reboot=lambda: None)
    pm2.restore(round_trip(pm.state()))
    assert pm2.read(0, 1) == pm.read(0, 1) == bytes([3 << 2])
    post = PostCode()
    post.write(0, b"\x42")
    post2 = PostCode()
    post2.restore(round_trip(post.state()))
    assert post2.read(0, 1) == b"\x42"
    dev = TestDevice()
    dev.write(0x20, b"scratch")
    dev2 = TestDevice()
    dev2.restore(round_trip(dev.state()))
    assert dev2.read(0, 8) == b"KVMPYTST" and dev2.read(0x20, 7) == b"scratch"


@HOSTILE
@given(data=st.data(), which=st.sampled_from(["pm", "post", "testdev"]))
def test_small_devices_hostile_state(data: st.DataObject, which: str) -> None:
    def make():  # type: ignore[no-untyped-def]
        return {"pm": lambda: AcpiPm(on_poweroff=lambda: None, on_reboot=lambda: None),
                "post": PostCode, "testdev": TestDevice}[which]()

    fresh = make()
    check_restore(mutate(data, make().state()), fresh, fresh.restore, fresh.state,
                  lambda d: poke(d, 3 if which != "testdev" else 0x40))
