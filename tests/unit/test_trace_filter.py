"""The --trace=FILTER language: what it accepts, what it rejects, what it lets through."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy.errors import ConfigError
from kvmpy.kvm.exits import ExitReason
from kvmpy.trace.filter import TraceFilter

IO, MMIO, HLT = ExitReason.IO, ExitReason.MMIO, ExitReason.HLT


def test_empty_filter_lets_everything_through() -> None:
    f = TraceFilter.parse("")
    assert f.everything
    assert f.matches(HLT) and f.matches(IO, "pio", 0x80, "post-code")
    assert TraceFilter.parse(None).everything


def test_reasons_are_alternatives_and_case_insensitive() -> None:
    f = TraceFilter.parse("io, HLT")
    assert f.matches(IO, "pio", 0x3F8) and f.matches(HLT)
    assert not f.matches(MMIO, "mmio", 0xE0000000)


def test_aliases() -> None:
    assert TraceFilter.parse("pio").reasons == {IO}
    assert TraceFilter.parse("triple_fault").reasons == {ExitReason.SHUTDOWN}


def test_port_range_is_inclusive_and_only_matches_port_io() -> None:
    f = TraceFilter.parse("port:0x3f8-0x3ff")
    assert f.matches(IO, "pio", 0x3F8) and f.matches(IO, "pio", 0x3FF)
    assert not f.matches(IO, "pio", 0x400) and not f.matches(IO, "pio", 0x3F7)
    assert not f.matches(MMIO, "mmio", 0x3F8)  # port: implies io only
    assert not f.matches(HLT)


def test_address_terms_imply_their_reasons_and_add_to_others() -> None:
    f = TraceFilter.parse("hlt,port:0x3f8")
    assert f.matches(HLT) and f.matches(IO, "pio", 0x3F8)
    assert not f.matches(IO, "pio", 0x80) and not f.matches(MMIO, "mmio", 0xE0000000)
    f = TraceFilter.parse("port:0x3f8,addr:0xe0000000-0xe0000fff")
    assert f.matches(IO, "pio", 0x3F8) and f.matches(MMIO, "mmio", 0xE0000010)
    assert not f.matches(IO, "pio", 0x80) and not f.matches(MMIO, "mmio", 0xD0000000)


def test_address_terms_only_narrow_their_own_bus() -> None:
    f = TraceFilter.parse("mmio,port:0x80")
    assert f.matches(MMIO, "mmio", 0xD0000000) and f.matches(IO, "pio", 0x80)
    assert not f.matches(IO, "pio", 0x3F8)


def test_devices_narrow_io_and_mmio() -> None:
    f = TraceFilter.parse("io,dev:serial*")
    assert f.matches(IO, "pio", 0x3F8, "serial0")
    assert not f.matches(IO, "pio", 0x80, "post-code")
    assert not f.matches(HLT)
    assert not f.matches(IO, "pio", 0x81, None)  # unclaimed port: no device
    f = TraceFilter.parse("dev:testdev,hlt")
    assert f.matches(MMIO, "mmio", 0xE0000000, "testdev") and f.matches(HLT)
    assert not f.matches(IO, "pio", 0x3F8, "serial0")


@pytest.mark.parametrize("text,message", [
    ("bogus", "unknown exit reason 'bogus'"),
    ("port:0x3ff-0x3f8", "ends before it starts"),
    ("port:0x10000", "above 0xffff"),
    ("port:xyz", "'xyz' in 'port:xyz' is not a number"),
    ("dev:", "names no device"),
    ("color:red", "unknown filter 'color:red'"),
])
def test_bad_filters_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        TraceFilter.parse(text)


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_config_error(text: str) -> None:
    try:
        TraceFilter.parse(text)
    except ConfigError:
        pass


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_port_ranges_match_exactly_their_ports(a: int, b: int, port: int) -> None:
    lo, hi = min(a, b), max(a, b)
    f = TraceFilter.parse(f"port:{lo:#x}-{hi}")
    assert f.matches(IO, "pio", port) == (lo <= port <= hi)
