"""The saved-state stream: what goes in comes out, and every damaged stream is one line."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.errors import SnapshotError
from kvmpy.state import stream

SECTIONS = {"machine": {"cpus": 2, "mem_size": 1 << 27}, "vcpu0": {"regs": {"rip": 65536}},
            "serial0": {"rx": "aGVsbG8=", "thre_pending": True}, "empty": {}}


def test_round_trip_in_order() -> None:
    data = stream.encode(SECTIONS)
    assert data.startswith(b"KVMPYSTA" + struct.pack("<I", stream.FORMAT_VERSION))
    assert list(stream.decode(data).items()) == list(SECTIONS.items())


def test_read_as_it_arrives_from_a_socket_like_reader() -> None:
    class Trickle(io.RawIOBase):
        """Returns at most 3 bytes per read, as a socket may."""

        def __init__(self, data: bytes) -> None:
            self.data = data

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
            n = min(3, len(b), len(self.data))
            b[:n], self.data = self.data[:n], self.data[n:]
            return n

    data = stream.encode(SECTIONS) + b"next message"
    reader = io.BufferedReader(Trickle(data))
    assert stream.read_sections(reader) == SECTIONS
    assert reader.read() == b"next message"  # nothing read past the end section


def test_every_truncation_is_refused_in_one_line() -> None:
    data = stream.encode(SECTIONS)
    for cut in range(len(data)):
        with pytest.raises(SnapshotError) as e:
            stream.decode(data[:cut])
        assert "\n" not in str(e.value)
        assert "truncated" in str(e.value) or "not a kvmpy" in str(e.value)


def test_every_flipped_byte_is_refused() -> None:
    data = stream.encode(SECTIONS)
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[i] ^= bit
            with pytest.raises(SnapshotError):
                stream.decode(bytes(damaged))


def test_other_version_and_trailing_bytes() -> None:
    data = stream.encode(SECTIONS)
    newer = data[:8] + struct.pack("<I", 2) + data[12:]
    with pytest.raises(SnapshotError, match="state format version 2; this kvmpy reads version 1"):
        stream.decode(newer)
    with pytest.raises(SnapshotError, match="3 bytes after the end"):
        stream.decode(data + b"abc")


def _section(name: bytes, payload: bytes) -> bytes:
    import zlib

    return struct.pack("<HII", len(name), len(payload),
                       zlib.crc32(payload, zlib.crc32(name))) + name + payload


@pytest.mark.parametrize(("name", "payload", "message"), [
    (b"vcpu0", b"[" * 100000 + b"]" * 100000, "not JSON"),
    (b"vcpu0", b"NaN", "not JSON"),
    (b"vcpu0", b"\xff\xfe", "not JSON"),
    (b"vcpu0", b"1" * 5000, "not JSON"),
    (b"../etc", b"{}", "bad, repeated or too many"),
    (b"VCPU", b"{}", "bad, repeated or too many"),
])
def test_hostile_sections(name: bytes, payload: bytes, message: str) -> None:
    data = b"KVMPYSTA" + struct.pack("<I", 1) + _section(name, payload) + _section(b"end", b"")
    with pytest.raises(SnapshotError, match=message):
        stream.decode(data)


def test_repeated_section_and_oversized_header() -> None:
    head = b"KVMPYSTA" + struct.pack("<I", 1)
    twice = head + _section(b"a", b"{}") * 2 + _section(b"end", b"")
    with pytest.raises(SnapshotError, match="repeated"):
        stream.decode(twice)
    huge = head + struct.pack("<HII", 3, stream.MAX_SECTION + 1, 0)
    with pytest.raises(SnapshotError, match="bad header"):
        stream.decode(huge)


def test_names_and_values_the_writer_refuses() -> None:
    for name in ("", "end", "Upper", "a/b", "x" * 65):
        with pytest.raises(ValueError):
            stream.encode({name: {}})
    with pytest.raises(ValueError):
        stream.encode({"a": float("nan")})


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_anything_but_snapshot_error(junk: bytes) -> None:
    for data in (junk, b"KVMPYSTA\x01\x00\x00\x00" + junk):
        try:
            stream.decode(data)
        except SnapshotError as e:
            assert "\n" not in str(e)
