"""gdb remote protocol framing: checksums, escapes, acks, Ctrl-C, packets split anywhere."""

from hypothesis import given
from hypothesis import strategies as st

from kvmpy.gdb.protocol import (
    PacketReader,
    checksum,
    escape,
    expand_rle,
    frame,
    parse_hex,
    unescape,
)


def events(data: bytes) -> list[tuple[str, bytes]]:
    return [(e.kind, e.payload) for e in PacketReader().feed(data)]


def test_frame_matches_the_manual() -> None:
    assert frame(b"OK") == b"$OK#9a"
    assert frame(b"") == b"$#00"
    assert checksum(b"qSupported") == 0x37


def test_reserved_bytes_are_escaped() -> None:
    assert escape(b"a#b$c}d*") == b"a}\x03b}\x04c}]d}\x0a"
    assert unescape(escape(b"#$}*")) == b"#$}*"


def test_reader_yields_packets_acks_and_interrupts() -> None:
    assert events(b"+$g#67-\x03$m10,4#2e") == [
        ("ack", b""), ("packet", b"g"), ("nak", b""), ("interrupt", b""),
        ("packet", b"m10,4")]


def test_bad_checksum_is_reported_not_dropped_silently() -> None:
    assert events(b"$g#00") == [("bad", b"")]
    assert events(b"$g#zz") == [("bad", b"")]


def test_noise_between_packets_is_ignored() -> None:
    assert events(b"xyz\n$?#3f") == [("packet", b"?")]


def test_run_length_encoding() -> None:
    assert expand_rle(b"0* ") == b"0000"  # ' ' is 32: three more
    assert events(b"$" + b"0* " + b"#" + f"{checksum(b'0* '):02x}".encode()) == [
        ("packet", b"0000")]


def test_parse_hex_is_strict() -> None:
    assert parse_hex("1F") == 31
    for bad in ("", "0x10", "-1", "1 "):
        try:
            parse_hex(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


@given(st.lists(st.binary(max_size=40), max_size=5), st.lists(st.integers(1, 50), max_size=10))
def test_packets_survive_any_split(payloads: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(frame(p) for p in payloads)
    reader, got, pos = PacketReader(), [], 0
    for cut in [*cuts, len(wire)]:
        got += [e.payload for e in reader.feed(wire[pos : pos + cut]) if e.kind == "packet"]
        pos += cut
    got += [e.payload for e in reader.feed(wire[pos:]) if e.kind == "packet"]
    # RLE is not applied by `frame`, so a '*' never appears unescaped: payloads come back whole
    assert got == payloads


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_break_the_reader(data: bytes) -> None:
    reader = PacketReader()
    for e in reader.feed(data):
        assert e.kind in ("packet", "bad", "ack", "nak", "interrupt")
