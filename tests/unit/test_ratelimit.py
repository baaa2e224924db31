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
from kvmpy.virtio.driver import GuestDriver
from kvmpy.virtio.iothread import IoThread
from kvmpy.virtio.mmio import VirtioMmioTransport


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_starts_full_and_refills_at_its_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, clock)
    assert bucket.capacity == 1000 * BURST_S
    assert bucket.wait_for(100) == 0
    bucket.take(100)
    assert bucket.wait_for(50) == pytest.approx(0.05)
    clock.now += 0.05
    assert bucket.wait_for(50) == 0
    clock.now += 10  # idle: no more than the capacity saved up
    assert bucket.wait_for(100) == 0 and bucket.wait_for(101) == 0  # (bigger: full is enough)


def test_a_request_bigger_than_the_bucket_goes_when_full_and_is_paid_for() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, clock)
    bucket.take(1000)  # ten times the capacity: a debt of 900
    assert bucket.wait_for(1) == pytest.approx(0.901)


@pytest.mark.parametrize("size", [512, 4096, 65536, 1 << 20])
def test_over_time_the_rate_is_met_whatever_the_request_size(size: int) -> None:
    """A device asking as fast as it may, for 20 simulated seconds: within 1% of 1 MB/s."""
    clock = FakeClock()
    limiter = RateLimiter(Limits(bw=1_000_000), clock)
    moved, start = 0, clock.now
    while clock.now - start < 20:
        wait = limiter.consume(size)
        if wait:
            clock.now += wait
        else:
            moved += size
    assert moved / (clock.now - start) == pytest.approx(1_000_000, rel=0.01)


def test_operations_and_bytes_both_limit_and_a_refused_request_takes_nothing() -> None:
    clock = FakeClock()
    limiter = RateLimiter(Limits(bw=1_000_000, ops=100), clock)
    served = sum(1 for _ in range(50) if not limiter.consume(10))
    assert served == 10  # the ops bucket: 100/s, a tenth of a second's burst
    assert limiter.bytes is not None and limiter.bytes.tokens == 100_000 - 10 * 10
    assert limiter.throttled == 40


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
    for _ in range(3):
        d.add_chain(0, [head], [512, 1])
    assert len(d.used(0)) == 2  # 1024 bytes' worth; the third waits
    assert len(timers) == 1 and timers[0][0] == pytest.approx(0.05)
    d.kick(0)  # the guest kicks again: still waiting, and no second timer
    assert d.used(0) == [] and len(timers) == 1
    clock.now += timers[0][0]
    timers[0][1]()  # type: ignore[operator]
    assert len(d.used(0)) == 1
    dev.close()


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
