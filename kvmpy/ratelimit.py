"""Token buckets for virtio-blk and virtio-net, as Firecracker's rate limiter has them:
one guest's disk or network cannot take all of the host's.

A `TokenBucket` holds up to `capacity` tokens and gains `rate` tokens a second. A
request goes whenever the bucket is not in debt, and takes its n tokens, which may leave
a debt that the next request waits out (Linux's HTB lets tokens go negative the same
way): over any long stretch the rate is exactly `rate`, whatever the request sizes.
The capacity is a tenth of a second of the rate (BURST_S): a device that was idle may
burst that much and one request more, no more.

Waiting only for the debt, never for "n tokens", is what keeps the rate when a retry
comes late. The bucket goes on filling until the retry really runs, and only tokens
beyond the capacity are lost, so a retry may be up to a tenth of a second late (a busy
I/O thread, a descheduled process) at no cost. Had a request waited for its n tokens,
one as big as the bucket would wait for a full bucket, and each millisecond its retry
ran late would be lost from the rate.

A `RateLimiter` is a bandwidth bucket (bytes) and an operations bucket (requests), each
optional. `consume(bytes)` either takes from both and answers 0, or takes nothing and
answers how long to wait: the device puts the request back on its queue and asks the
I/O thread to try again then (`call_later`), so a throttled device never sleeps on the
thread the other devices share.

The clock is a parameter so that tests run on a fake one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

BURST_S = 0.1
MB = 1_000_000  # --disk ...,bw=MB/s: dd's megabytes


class TokenBucket:
    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("a token bucket needs a positive rate")
        self.rate = float(rate)
        self.capacity = self.rate * BURST_S
        self.clock = clock
        self.tokens = self.capacity  # starts full
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self) -> float:
        """Seconds until the bucket is out of debt and a request may go (0: now)."""
        self._refill()
        # (a retry timed for exactly the wait may still find a rounding error's worth)
        return -self.tokens / self.rate if self.tokens < -1e-6 else 0.0

    def take(self, n: float) -> None:
        self._refill()
        self.tokens -= n

    def give_back(self, n: float) -> None:
        """Undo a `take` of `n` whose request did not go after all."""
        self._refill()
        self.tokens = min(self.capacity, self.tokens + n)


class Limits(NamedTuple):
    """What a device is limited to: bytes per second, requests per second (0: no limit)."""

    bw: float = 0
    ops: float = 0

    def __bool__(self) -> bool:
        return bool(self.bw or self.ops)


NO_LIMITS = Limits()


class RateLimiter:
    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.bytes = TokenBucket(limits.bw, clock) if limits.bw else None
        self.ops = TokenBucket(limits.ops, clock) if limits.ops else None
        self.throttled = 0  # requests that had to wait, for statistics and tests

    def consume(self, nbytes: int, ops: int = 1) -> float:
        """Take `nbytes` and `ops` tokens and return 0, or take none and return the
        seconds to wait before asking again."""
        wait = max(self.bytes.wait() if self.bytes else 0.0,
                   self.ops.wait() if self.ops else 0.0)
        if wait > 0:
            self.throttled += 1
            return wait
        if self.bytes:
            self.bytes.take(nbytes)
        if self.ops:
            self.ops.take(ops)
        return 0.0

    def refund(self, nbytes: int, ops: int = 1) -> None:
        """Give back what a `consume` took for a request that then could not go (net's
        receive: the guest had no buffer), so that it is not paid for twice."""
        if self.bytes:
            self.bytes.give_back(nbytes)
        if self.ops:
            self.ops.give_back(ops)


def parse_limits(spec: str, options: dict[str, str], *, ops: bool) -> Limits:
    """`bw=MB/s` (and with `ops`, `iops=N`) from a device option's fields."""
    from kvmpy.errors import ConfigError

    values = {}
    for key in ("bw", "iops") if ops else ("bw",):
        if key in options:
            try:
                values[key] = float(options[key])
            except ValueError:
                values[key] = -1.0
            if not 0 < values[key] < 1e9:
                raise ConfigError(f"{spec}: {key}={options[key]}: a positive number "
                                  f"({'MB/s' if key == 'bw' else 'requests/s'})")
    return Limits(bw=values.get("bw", 0) * MB, ops=values.get("iops", 0))
