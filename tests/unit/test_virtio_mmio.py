"""virtio-mmio transport: registers, negotiation, status machine, interrupts, reset."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy import layout
from kvmpy import log as kvmpy_log
from kvmpy.bus import Bus, NullIrq
from kvmpy.memory import GuestMemory
from kvmpy.virtio import mmio
from kvmpy.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_ENTROPY,
    VIRTIO_STATUS_ACKNOWLEDGE,
    VIRTIO_STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_STATUS_DRIVER,
    VIRTIO_STATUS_DRIVER_OK,
    VIRTIO_STATUS_FAILED,
    VIRTIO_STATUS_FEATURES_OK,
    LogOnce,
)
from kvmpy.virtio.driver import BusWindow, GuestDriver
from kvmpy.virtio.iothread import EventFdIrq
from kvmpy.virtio.queue import VIRTQ_DESC_F_NEXT
from kvmpy.virtio.rng import Rng

BASE = layout.VIRTIO_MMIO_BASE


def setup(mem_size: int = 1 << 20) -> tuple[mmio.VirtioMmioTransport, GuestDriver, NullIrq]:
    mem = GuestMemory.from_buffer(bytearray(mem_size))
    irq = NullIrq()
    t = mmio.VirtioMmioTransport(Rng(), mem, irq)
    bus = Bus("mmio")
    bus.insert(BASE, layout.VIRTIO_MMIO_SIZE, t, "virtio-rng")
    return t, GuestDriver(BusWindow(bus, BASE), mem), irq


def test_identity_registers() -> None:
    _, d, _ = setup()
    assert d.r32(mmio.MAGIC_VALUE) == 0x74726976
    assert d.r32(mmio.VERSION) == 2
    assert d.r32(mmio.DEVICE_ID) == VIRTIO_ID_ENTROPY
    assert d.device_features() & (1 << VIRTIO_F_VERSION_1)
    d.w32(mmio.DEVICE_FEATURES_SEL, 7)
    assert d.r32(mmio.DEVICE_FEATURES) == 0
    assert d.r32(mmio.SHM_LEN_LOW) == 0xFFFFFFFF  # no shared memory regions


def test_full_init_sequence_reaches_driver_ok() -> None:
    t, d, _ = setup()
    assert d.init()
    assert d.status == (VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER
                        | VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK)
    assert t.device.active
    assert t.device.acked_features == d.acked
    d.w32(mmio.QUEUE_SEL, 1)
    assert d.r32(mmio.QUEUE_NUM_MAX) == 0  # the entropy device has one queue


def test_features_ok_refused_without_version_1() -> None:
    t, d, _ = setup()
    offered = d.device_features()
    assert not d.init(features=offered & ~(1 << VIRTIO_F_VERSION_1))
    assert not d.status & VIRTIO_STATUS_FEATURES_OK
    assert not t.device.active


def test_features_ok_refused_for_features_not_offered() -> None:
    _, d, _ = setup()
    assert not d.init(features=d.device_features() | (1 << 63))


def test_driver_features_frozen_after_features_ok() -> None:
    t, d, _ = setup()
    assert d.init()
    d.w32(mmio.DRIVER_FEATURES_SEL, 0)
    d.w32(mmio.DRIVER_FEATURES, 0)
    assert t.device.acked_features == d.acked


def test_status_order_enforced_and_bits_cannot_be_cleared() -> None:
    t, d, _ = setup()
    d.w32(mmio.STATUS, VIRTIO_STATUS_DRIVER)  # DRIVER before ACKNOWLEDGE
    assert d.status == 0
    d.w32(mmio.STATUS, VIRTIO_STATUS_ACKNOWLEDGE)
    d.w32(mmio.STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER_OK)
    assert d.status == VIRTIO_STATUS_ACKNOWLEDGE  # DRIVER_OK needs FEATURES_OK
    assert d.init()
    d.w32(mmio.STATUS, VIRTIO_STATUS_ACKNOWLEDGE)  # clearing bits without a reset
    assert d.status & VIRTIO_STATUS_DRIVER_OK
    d.w32(mmio.STATUS, d.status | VIRTIO_STATUS_FAILED)
    assert d.status & VIRTIO_STATUS_FAILED and not t.device.active


def test_only_aligned_32_bit_register_access() -> None:
    t, d, _ = setup()
    assert t.read(mmio.MAGIC_VALUE, 2) == b"\0\0"
    assert t.read(mmio.MAGIC_VALUE + 1, 4) == b"\0\0\0\0"
    t.write(mmio.STATUS, b"\x01")  # a byte write to Status is dropped
    assert d.status == 0


def test_config_space_allows_byte_access() -> None:
    t, _, _ = setup()
    console_like = t.device
    console_like.config_space = lambda: bytes(range(1, 13))  # type: ignore[method-assign]
    assert t.read(mmio.CONFIG + 1, 1) == b"\x02"
    assert t.read(mmio.CONFIG + 2, 2) == b"\x03\x04"
    assert t.read(mmio.CONFIG + 8, 8) == bytes([9, 10, 11, 12, 0, 0, 0, 0])
    assert t.read(mmio.CONFIG + 3, 3) == b"\0\0\0"  # 3-byte access: zeros


def test_queue_registers_ignored_while_ready() -> None:
    t, d, _ = setup()
    assert d.init()
    d.w32(mmio.QUEUE_SEL, 0)
    d.w32(mmio.QUEUE_DESC_LOW, 0x1234)
    assert t.queues[0].desc_table == d.queues[0].desc
    assert d.r32(mmio.QUEUE_READY) == 1


def test_reset_clears_queues_interrupts_and_features() -> None:
    t, d, irq = setup()
    assert d.init()
    d.add_chain(0, [], [8])
    assert irq.level and t.interrupt_status == mmio.VIRTIO_MMIO_INT_VRING
    d.w32(mmio.STATUS, 0)
    assert d.status == 0 and t.interrupt_status == 0 and not irq.level
    assert not t.queues[0].ready and t.queues[0].next_avail == 0
    assert t.device.acked_features == 0 and not t.device.active
    assert d.r32(mmio.QUEUE_READY) == 0
    assert d.init()  # and it comes back
    d.add_chain(0, [], [8])
    assert d.used(0)[0][1] == 8


def test_interrupt_ack_lowers_line() -> None:
    t, d, irq = setup()
    assert d.init()
    d.add_chain(0, [], [4])
    assert irq.level
    assert d.ack_interrupt() == mmio.VIRTIO_MMIO_INT_VRING
    assert not irq.level and t.interrupt_status == 0


def test_eventfd_irq_pulses_only_on_new_bits() -> None:
    t, d, _ = setup()
    irq = EventFdIrq()
    t.irq = irq
    try:
        assert d.init()
        d.add_chain(0, [], [4])
        d.add_chain(0, [], [4])  # the VRING bit is still set: no second edge
        assert irq.pulses == 1
        d.ack_interrupt()
        assert len(d.used(0)) == 2  # (moves used_event on, as Linux does)
        d.add_chain(0, [], [4])
        assert irq.pulses == 2
    finally:
        irq.close()


def test_event_idx_suppresses_interrupts() -> None:
    t, d, irq = setup()
    assert d.init()
    assert d.acked & (1 << VIRTIO_F_EVENT_IDX)
    d.add_chain(0, [], [4])
    d.ack_interrupt()
    q = d.queues[0]
    d.add_chain(0, [], [4], kick=False)
    d.mem.write_u16(q.avail + 4 + 2 * q.size, 10)  # used_event far ahead
    d.kick(0)
    assert t.interrupt_status == 0 and not irq.level
    assert len(d.used(0)) == 2  # the work was still done


def test_notify_before_driver_ok_is_served_at_activation(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    t, d, _ = setup()
    real_w32 = d.w32

    def no_driver_ok(offset: int, value: int) -> None:
        if not (offset == mmio.STATUS and value & VIRTIO_STATUS_DRIVER_OK):
            real_w32(offset, value)

    monkeypatch.setattr(d, "w32", no_driver_ok)
    assert d.init()
    d.add_chain(0, [], [16])  # offered before DRIVER_OK; its notify is ignored
    assert d.used(0) == []
    real_w32(mmio.STATUS, d.status | VIRTIO_STATUS_DRIVER_OK)
    assert len(d.used(0)[0][2][0]) == 16


def test_broken_chain_sets_needs_reset_and_config_interrupt() -> None:
    t, d, irq = setup()
    assert d.init()
    q = d.queues[0]
    d.mem.write(q.desc, struct.pack("<QIHH", 0x8000, 16, VIRTQ_DESC_F_NEXT, 0))  # self-loop
    d.publish(0, 0)
    assert d.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET
    assert t.interrupt_status & mmio.VIRTIO_MMIO_INT_CONFIG and irq.level
    assert not t.device.active
    d.ack_interrupt()
    d.add_chain(0, [], [8])  # nothing more is used until reset
    assert d.used(0) == []
    assert d.init()  # reset recovers
    d.add_chain(0, [], [8])
    assert len(d.used(0)) == 1


def test_bad_queue_address_needs_reset() -> None:
    t, d, irq = setup(mem_size=0x10000)
    d.w32(mmio.STATUS, 0)
    d.w32(mmio.STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER)
    for sel in (0, 1):
        d.w32(mmio.DRIVER_FEATURES_SEL, sel)
        d.w32(mmio.DRIVER_FEATURES, (1 << VIRTIO_F_VERSION_1) >> (32 * sel))
    ok = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK
    d.w32(mmio.STATUS, ok)
    d.w32(mmio.QUEUE_SEL, 0)
    d.w32(mmio.QUEUE_DESC_HIGH, 1)  # 4 GiB up: not RAM
    d.w32(mmio.QUEUE_READY, 1)
    assert d.r32(mmio.QUEUE_READY) == 0
    assert d.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET
    d.w32(mmio.STATUS, ok | VIRTIO_STATUS_DRIVER_OK)
    assert not t.device.active and irq.level  # told through a config interrupt


def test_device_failure_becomes_needs_reset() -> None:
    t, d, _ = setup()
    assert d.init()

    def boom(index: int) -> None:
        raise RuntimeError("backend bug")

    t.device.process_queue = boom  # type: ignore[method-assign]
    d.kick(0)
    assert d.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET


def test_cmdline_fragment_and_slots() -> None:
    assert mmio.cmdline_fragment(0xD0000000, 5) == "virtio_mmio.device=4K@0xd0000000:5"
    assert mmio.slot_base(2) == layout.VIRTIO_MMIO_BASE + 2 * layout.VIRTIO_MMIO_SIZE
    assert mmio.slot_irq(2) == layout.VIRTIO_IRQS[2]
    assert 8 not in layout.VIRTIO_IRQS and 4 not in layout.VIRTIO_IRQS  # RTC, COM1
    with pytest.raises(ValueError):
        mmio.slot_irq(len(layout.VIRTIO_IRQS))  # past the last free IO-APIC pin
    with pytest.raises(ValueError):
        mmio.slot_base(layout.VIRTIO_MMIO_SLOTS)


register_op = st.tuples(
    st.sampled_from([0x0, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60, 0x64,
                     0x70, 0x80, 0x84, 0x90, 0x94, 0xA0, 0xA4, 0xAC, 0xC0, 0xFC, 0x100, 0x104])
    | st.integers(0, 0xFFF),
    st.sampled_from([4, 4, 4, 1, 2, 8, 3]),
    st.integers(0, 2**64 - 1) | st.sampled_from([0, 1, 3, 7, 15, 0x0F, 8, 0x40, 0x80]),
    st.booleans(),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(register_op, max_size=60), init_first=st.booleans())
def test_random_register_traffic_never_escapes(ops, init_first) -> None:  # type: ignore[no-untyped-def]
    t, d, irq = setup(mem_size=0x20000)
    if init_first:
        d.init()
    for offset, size, value, is_write in ops:
        if is_write:
            t.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        else:
            assert len(t.read(offset, size)) == size
        # Invariants the guest relies on.
        assert irq.level == (t.interrupt_status != 0)
        if t.device.active:
            assert t.status & VIRTIO_STATUS_DRIVER_OK
            assert not t.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET
        if t.status & VIRTIO_STATUS_FEATURES_OK:
            assert t.device.acked_features & (1 << VIRTIO_F_VERSION_1)


def test_guest_chosen_warnings_are_bounded(caplog: pytest.LogCaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """100,000 notifications of distinct missing queues: a few lines, one saying the rest
    are suppressed, and nothing kept per guest-chosen value."""
    monkeypatch.setattr(kvmpy_log, "_cli_level", None)
    t, d, _ = setup()
    assert d.init()
    with caplog.at_level("INFO", logger="kvmpy"):
        for index in range(1, 100_001):
            d.w32(mmio.QUEUE_NOTIFY, index)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == LogOnce.PER_SITE + 1, lines[:10]
    assert "suppressed" in lines[-1]
    assert sum(map(len, t.warn.seen.values())) == LogOnce.PER_SITE + 1


def test_driver_ok_after_failed_does_not_go_live() -> None:
    """§2.1: after FAILED the driver must reset the device; 0x8f is not a live device."""
    t, d, _ = setup()
    d.w32(mmio.STATUS, 0)
    for status in (VIRTIO_STATUS_ACKNOWLEDGE, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER):
        d.w32(mmio.STATUS, status)
    d.w32(mmio.DRIVER_FEATURES_SEL, 1)
    d.w32(mmio.DRIVER_FEATURES, 1)  # VIRTIO_F_VERSION_1
    status = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK
    d.w32(mmio.STATUS, status)
    d.w32(mmio.STATUS, status | VIRTIO_STATUS_FAILED)
    d.w32(mmio.STATUS, status | VIRTIO_STATUS_FAILED | VIRTIO_STATUS_DRIVER_OK)
    assert d.status == status | VIRTIO_STATUS_FAILED and not t.device.active
    d.w32(mmio.STATUS, 0)  # a reset is the way back
    assert d.status == 0 and d.init() and t.device.active
