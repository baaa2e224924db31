"""The port cache answers as `Bus.lookup` does, for any ranges, ports and order of events."""

from hypothesis import given
from hypothesis import strategies as st

from kvmpy.bus import Bus
from kvmpy.errors import ConfigError
from kvmpy.portcache import PortCache

PORT = st.integers(0, 0x40)
EVENTS = st.lists(st.one_of(
    st.tuples(st.just("insert"), PORT, st.integers(1, 8)),
    st.tuples(st.just("lookup"), PORT, st.just(0)),
), max_size=60)


class Dev:
    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass


@given(EVENTS)
def test_cached_lookups_agree_with_the_bus(events: list[tuple[str, int, int]]) -> None:
    bus = Bus("pio")
    cache = PortCache(bus)
    for what, port, length in events:
        if what == "insert":
            try:
                bus.insert(port, length, Dev())
            except ConfigError:
                pass  # an overlap: refused, the bus unchanged
        else:
            hit = bus.lookup(port)
            assert cache[port] == (None if hit is None else hit[:2])


def test_a_miss_is_not_remembered() -> None:
    bus = Bus("pio")
    cache = PortCache(bus)
    assert cache[0x80] is None
    dev = Dev()
    bus.insert(0x80, 1, dev)
    assert cache[0x80] == (dev, 0)


@given(EVENTS, st.integers(1, 4))
def test_a_bounded_cache_agrees_and_stays_within_its_limit(events: list[tuple[str, int, int]],
                                                           limit: int) -> None:
    bus = Bus("mmio")
    cache = PortCache(bus, limit=limit)
    for what, port, length in events:
        if what == "insert":
            try:
                bus.insert(port, length, Dev())
            except ConfigError:
                pass
        else:
            hit = bus.lookup(port)
            assert cache[port] == (None if hit is None else hit[:2])
            assert len(cache) <= limit
