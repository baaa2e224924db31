"""kvmpy.ratelimit on a fake clock, and the devices and I/O thread that use it."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest

from kvmpy.bus import NullIrq
from kvmpy.memory import GuestMemory
from kvmpy.ratelimit import BURST_S, Limits, RateLimiter, TokenBucket
from kvmpy.virtio.blk import VIRTIO_BLK_T_IN, Block
from kvmpy.virtio.driver import GuestDriver, SocketPairBackend
from kvmpy.virtio.iothread import IoThread
from kvmpy.virtio.mmio import VirtioMmioTransport
from kvmpy.virtio.net import Net


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_starts_full_refills_at_its_rate_and_lets_a_request_go_unless_in_debt(
        ) -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, clock)
    assert bucket.capacity == 1000 * BURST_S
    assert bucket.wait() == 0
    bucket.take(150)  # more than it holds: it goes, and leaves a debt of 50
    assert bucket.wait() == pytest.approx(0.05)
    clock.now += 0.05
    assert bucket.wait() == 0
    clock.now += 10  # idle: no more than the capacity saved up
    bucket.take(100)
    assert bucket.wait() == 0
    bucket.take(1)
    assert bucket.wait() == pytest.approx(0.001)


def test_a_request_bigger_than_the_bucket_is_paid_for_by_a_debt() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, clock)
    bucket.take(1000)  # ten times the capacity: a debt of 900
    assert bucket.wait() == pytest.approx(0.9)
    bucket.give_back(1000)  # (it did not go after all): full again, never more
    assert bucket.tokens == bucket.capacity


def _move(limiter: RateLimiter, clock: FakeClock, size: int, seconds: float,
          late: float = 0.0) -> float:
    """A device asking as fast as it may for `seconds` simulated seconds, its retries
    `late` seconds after the time the limiter gave; the rate it got."""
    moved, start = 0, clock.now
    while clock.now - start < seconds:
        wait = limiter.consume(size)
        if wait:
            clock.now += wait + late
        else:
            moved += size
    return moved / (clock.now - start)


@pytest.mark.parametrize("size", [512, 4096, 65536, 1 << 20])
def test_over_time_the_rate_is_met_whatever_the_request_size(size: int) -> None:
    """20 simulated seconds at 1 MB/s: within 1% (the first tenth of a second's burst
    and one request are 0.5% of 20 s, and a 1 MiB request is 5% of it: 2% there)."""
    clock = FakeClock()
    rate = _move(RateLimiter(Limits(bw=1_000_000), clock), clock, size, 20)
    assert rate == pytest.approx(1_000_000, rel=0.02 if size > 100_000 else 0.01)


@pytest.mark.parametrize("size", [4096, 65536, 1 << 20])
@pytest.mark.parametrize("late", [0.001, 0.02, 0.09])
def test_a_late_retry_costs_nothing_while_the_bucket_is_not_full(size: int,
                                                                  late: float) -> None:
    """The I/O thread's timer runs late (epoll rounds up to a millisecond; a busy or
    descheduled thread is later): the bucket fills meanwhile, so the rate holds. (It
    did not when a request waited for its own size: 1 MiB requests at 4 MB/s, each
    waiting for a full bucket, lost every late millisecond, 7% at 20 ms.)"""
    clock = FakeClock()
    rate = _move(RateLimiter(Limits(bw=4_000_000), clock), clock, size, 30, late)
    assert rate == pytest.approx(4_000_000, rel=0.02)


def test_later_than_the_burst_the_rate_loses_only_what_the_full_bucket_cannot_hold() -> None:
    clock = FakeClock()
    # retries 0.3 s late, 4 KiB requests at 1 MB/s: each wait is 4 ms, then 0.3 s pass of
    # which the bucket keeps 0.1 s' worth: a tenth of a second's rate per 0.304 s
    rate = _move(RateLimiter(Limits(bw=1_000_000), clock), clock, 4096, 60, 0.3)
    assert rate == pytest.approx((100_000 + 4096) / 0.304, rel=0.05)


def test_operations_and_bytes_both_limit_and_a_refused_request_takes_nothing() -> None:
    clock = FakeClock()
    limiter = RateLimiter(Limits(bw=1_000_000, ops=100), clock)
    served = sum(1 for _ in range(50) if not limiter.consume(10))
    assert served == 11  # the ops bucket: 100/s, a tenth of a second's burst, and one more
    assert limiter.bytes is not None and limiter.bytes.tokens == 100_000 - 11 * 10
    assert limiter.throttled == 39


def test_a_throttled_disk_queue_is_retried_by_a_timer_not_a_sleep(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * 512))
    clock = FakeClock()
    dev = Block(str(image), limits=Limits(bw=10_240))
    dev.limiters[0] = RateLimiter(Limits(bw=10_240), clock)  # capacity 1024 bytes
    timers: list[tuple[float, object]] = []
    dev.call_later = lambda delay, fn: timers.append((delay, fn))
    mem = GuestMemory.from_buffer(bytearray(1 << 20))
    d = GuestDriver(VirtioMmioTransport(dev, mem, NullIrq()), mem)
    assert d.init()
    head = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)
    for _ in range(4):
        d.add_chain(0, [head], [512, 1])
    # two take the 1024 bytes, the third leaves a debt of 512, the fourth waits it out
    assert len(d.used(0)) == 3
    assert len(timers) == 1 and timers[0][0] == pytest.approx(0.05)
    d.kick(0)  # the guest kicks again: still waiting, and no second timer
    assert d.used(0) == [] and len(timers) == 1
    clock.now += timers[0][0]
    timers[0][1]()  # type: ignore[operator]
    assert len(d.used(0)) == 1
    dev.close()


def test_a_received_frame_waiting_for_buffers_is_paid_for_once() -> None:
    """The frame is charged when it goes to the guest, however often the device tried
    while the guest had no receive buffers (each try used to charge it again)."""
    clock = FakeClock()
    backend = SocketPairBackend()
    dev = Net(backend, "52:54:00:12:34:56", limits=Limits(bw=10_000))
    dev.rx_limiter = RateLimiter(Limits(bw=10_000), clock)  # 1000 bytes
    mem = GuestMemory.from_buffer(bytearray(2 << 20))
    d = GuestDriver(VirtioMmioTransport(dev, mem, NullIrq()), mem)
    assert d.init()
    backend.peer.send(bytes(12) + bytes(600))
    dev.on_backend_readable()  # no buffers: the frame waits in the device
    for _ in range(3):
        d.kick(0)  # the guest notifies the receive queue, still with no buffers
    assert dev.rx_len == 612 and d.used(0) == []
    d.add_chain(0, [], [2048])
    [(_, length, _)] = d.used(0)
    assert length == 612
    assert dev.rx_limiter.bytes is not None and dev.rx_limiter.bytes.tokens == 1000 - 600
    backend.close()


def test_timers_run_on_the_io_thread_without_holding_up_its_fds() -> None:
    io = IoThread()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    seen = threading.Event()
    fired = threading.Event()
    io.add_reader(fd, lambda: (os.eventfd_read(fd), seen.set()))
    with io:
        io.call_later(0.2, fired.set)
        os.eventfd_write(fd, 1)
        assert seen.wait(5) and not fired.is_set()  # the fd first, the timer pending
        assert fired.wait(5)
    os.close(fd)
