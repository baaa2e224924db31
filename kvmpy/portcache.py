"""`Bus.lookup` for port I/O, remembered per port: the exit loop's speed trick, behind one door.

Why: a port exit is the commonest exit a guest makes (the UART, the PIT, the
post-code port), and `Bus.lookup` bisects the bus's ranges at every one. A guest
uses a handful of ports, so the answer per port is kept in a dict: a hit costs
one C-level dict lookup (`cache[port]`), and only a port's first access asks the bus.

Why it cannot go stale: a bus only grows. `Bus.insert` refuses a range that
overlaps another and nothing removes a device, so a port that once hit a device
always hits it at the same offset. A miss is not remembered: the bus counts and
logs an unclaimed access itself (`Bus.read`, `Bus.write`), and a device inserted
later still gets its ports.

The exit loop keeps one for MMIO addresses too, with a `limit`: an MMIO window can be
large, and a guest touching each of its addresses must not grow the cache without end
(at the limit it starts again empty, which costs a lookup per address, never a wrong
answer).

tests/unit/test_portcache.py checks it against `Bus.lookup` for any ranges, ports
and order of inserts and lookups (hypothesis).
"""

from __future__ import annotations

from kvmpy.bus import Bus, Device


class PortCache(dict[int, "tuple[Device, int] | None"]):
    """`cache[port]`: (device, offset into it) as `bus.lookup(port)` says, or None."""

    def __init__(self, bus: Bus, limit: int | None = None) -> None:
        super().__init__()
        self.bus = bus
        self.limit = limit

    def __missing__(self, port: int) -> tuple[Device, int] | None:
        hit = self.bus.lookup(port)
        if hit is None:
            return None
        device, offset, _ = hit
        if self.limit is not None and len(self) >= self.limit:
            self.clear()
        self[port] = device, offset
        return device, offset
