"""The migration stream without KVM: addresses, parameters, what both ends compare, and a
destination's reading of records over a socket pair (any bytes: a one-line
MigrationError or SnapshotError, never another exception, never a write outside RAM)."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.errors import ConfigError, KvmpyError
from kvmpy.memory import GuestMemory
from kvmpy.migration import agree, wire
from kvmpy.migration.destination import Incoming, _records
from kvmpy.migration.source import Parameters, _runs, _sendmsg_all
from kvmpy.migration.wire import PAGE, MigrationError
from kvmpy.state import stream


@pytest.mark.parametrize(("text", "family", "where"), [
    ("unix:/run/x.sock", socket.AF_UNIX, "/run/x.sock"),
    ("tcp:127.0.0.1:4444", socket.AF_INET, ("127.0.0.1", 4444)),
    ("tcp:[::1]:4444", socket.AF_INET6, ("::1", 4444)),
])
def test_addresses(text: str, family: int, where: Any) -> None:
    address = wire.parse_address(text)
    assert (address.family, address.where) == (family, where)


@pytest.mark.parametrize("text", ["unix:", "tcp:host", "tcp:h:0", "tcp:h:70000", "exec:cat",
                                  "file:/x", "tcp::80"])
def test_bad_addresses_are_one_line_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match=r"unix:PATH or tcp:HOST:PORT"):
        wire.parse_address(text, "--incoming")


def test_parameters_are_checked_before_any_is_set() -> None:
    p = Parameters()
    p.set({"downtime-limit": 50, "x-max-rounds": 3, "max-bandwidth": 1 << 20})
    assert p.query() == {"downtime-limit": 50, "x-max-rounds": 3, "max-bandwidth": 1 << 20}
    for bad in ({"downtime-limit": 0}, {"x-max-rounds": True}, {"nope": 1},
                {"max-bandwidth": 1, "downtime-limit": "5"}):
        with pytest.raises(KvmpyError, match="migrate-set-parameters"):
            p.set(bad)
    assert p.query()["max-bandwidth"] == 1 << 20


def test_differ_names_the_first_difference() -> None:
    here = {"mem_size": 1 << 27, "cpus": 2, "cpuid": [[[1, 0, 0, 5, 6, 7, 8]]] * 2}
    assert agree.differ(here, dict(here)) is None
    assert "mem_size" in str(agree.differ(here, {**here, "mem_size": 1 << 26}))
    cpuid = [[[1, 0, 0, 5, 6, 7, 9]], [[1, 0, 0, 5, 6, 7, 8]]]
    assert "vCPU 0, leaf 0x1.0" in str(agree.differ(here, {**here, "cpuid": cpuid}))
    for junk in (None, [], {"cpuid": "x"}, {**here, "cpuid": [["a"], [None]]}, {**here, "x": 1}):
        assert isinstance(agree.differ(here, junk), str)


def test_runs_group_consecutive_pages() -> None:
    memory = GuestMemory.from_buffer(bytearray(16 * PAGE))
    pending = [[0, PAGE, 2 * PAGE, 5 * PAGE, 7 * PAGE, 8 * PAGE]]
    assert [(o, n) for _, o, n in _runs(memory, pending)] == [
        (0, 3 * PAGE), (5 * PAGE, PAGE), (7 * PAGE, 2 * PAGE)]


def test_sendmsg_all_sends_every_byte_in_order_when_taken_in_parts() -> None:
    sent = bytearray()

    class Stingy:  # takes at most 5 bytes a call, as a socket with a timeout may
        def sendmsg(self, buffers: list[Any]) -> int:
            data = b"".join(bytes(b) for b in buffers)[:5]
            sent.extend(data)
            return len(data)

    buffers: list[Any] = [b"abc", memoryview(b"defghijkl"), b"m", b"nopqrstuvwxyz"]
    assert _sendmsg_all(Stingy(), buffers) == 26  # type: ignore[arg-type]
    assert bytes(sent) == b"abcdefghijklmnopqrstuvwxyz"


def _receive(data: bytes, ram: bytearray) -> dict[str, Any]:
    """`data` fed to a destination's record reader over a socket pair."""
    a, b = socket.socketpair()
    b.settimeout(5)
    writer = threading.Thread(target=lambda: (a.sendall(data), a.close()))
    writer.start()
    try:
        machine = SimpleNamespace(memory=GuestMemory([(0, ram)]))
        return _records(b, machine, Incoming())  # type: ignore[arg-type]
    finally:
        writer.join()
        b.close()


def test_records_fill_ram_and_return_the_state() -> None:
    ram = bytearray(80 * PAGE)
    ram[PAGE : 2 * PAGE] = b"\x55" * PAGE
    state = stream.encode({"serial0": {"x": 1}})
    data = (wire.RECORD.pack(wire.ROUND, 0, 0) +
            wire.RECORD.pack(wire.PAGES, 2, 4 * PAGE) + b"\xaa" * PAGE + b"\xbb" * PAGE +
            wire.RECORD.pack(wire.ZEROS, 1, PAGE) +
            # (a run larger than the reader's buffer goes straight into RAM)
            wire.RECORD.pack(wire.PAGES, 70, 8 * PAGE) + b"\xcc" * (70 * PAGE) +
            wire.RECORD.pack(wire.STATE, len(state), 0) + state +
            wire.RECORD.pack(wire.END, 0, 0))
    assert _receive(data, ram) == {"serial0": {"x": 1}}
    assert ram[4 * PAGE : 6 * PAGE] == b"\xaa" * PAGE + b"\xbb" * PAGE
    assert ram[PAGE : 2 * PAGE] == bytes(PAGE)
    assert ram[8 * PAGE : 78 * PAGE] == b"\xcc" * (70 * PAGE)


@pytest.mark.parametrize(("data", "message"), [
    (wire.RECORD.pack(wire.PAGES, 1, 8 * PAGE), "not guest RAM here"),
    (wire.RECORD.pack(wire.PAGES, 1, 7 * PAGE + 1), "not guest RAM here"),
    (wire.RECORD.pack(wire.ZEROS, 0, 0), "not guest RAM here"),
    (wire.RECORD.pack(wire.PAGES, 2, 0) + bytes(PAGE), "cut short"),
    (wire.RECORD.pack(9, 0, 0), "unknown kind 9"),
    (wire.RECORD.pack(wire.END, 0, 0), "END before any state"),
    (wire.RECORD.pack(wire.STATE, 3, 0) + b"abc", "not a kvmpy state stream|truncated"),
    (b"\x01\x02", "cut short"),
])
def test_bad_records_are_refused_in_one_line(data: bytes, message: str) -> None:
    ram = bytearray(8 * PAGE)
    with pytest.raises(KvmpyError, match=message) as e:
        _receive(data, ram)
    assert "\n" not in str(e.value)
    assert ram == bytearray(8 * PAGE) or data[0] == wire.PAGES


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 5))
def test_any_bytes_are_a_stream_or_one_error(junk: bytes, kind: int) -> None:
    data = wire.RECORD.pack(kind, len(junk) // PAGE, 0) + junk if kind else junk
    try:
        _receive(data, bytearray(4 * PAGE))
    except (MigrationError, KvmpyError) as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize(("args", "message"), [
    (["--incoming", "bogus"], "--incoming bogus: unix:PATH or tcp:HOST:PORT"),
    (["--incoming", "unix:/x.sock", "--restore", "/tmp"], "--incoming, --restore"),
])
def test_incoming_options_are_checked_first(args: list[str], message: str) -> None:
    from kvmpy.cli import build_parser, cmd_run

    with pytest.raises(ConfigError) as e:
        cmd_run(build_parser().parse_args(["run", "--flat", "/nonexistent.bin", *args]))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
