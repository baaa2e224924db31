"""virtio-vsock through the MMIO transport, with real unix sockets on the host side.

The guest is the Python test driver speaking virtio_vsock_hdr packets; the host side is
plain sockets in Firecracker's convention (CONNECT/OK on PATH, PATH_<port> listeners).
The I/O thread's loop is pumped by hand (`IoThread.run_once`).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmpy.bus import NullIrq
from kvmpy.errors import ConfigError, SnapshotError
from kvmpy.memory import GuestMemory
from kvmpy.state.values import StateReader
from kvmpy.virtio.device import VIRTIO_STATUS_DEVICE_NEEDS_RESET
from kvmpy.virtio.driver import GuestDriver
from kvmpy.virtio.iothread import IoThread
from kvmpy.virtio.mmio import VirtioMmioTransport
from kvmpy.virtio.vsock import (
    BUF_ALLOC,
    HDR,
    HOST_CID,
    LOCAL_PORT_FIRST,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    Header,
    Vsock,
)
from kvmpy.virtio.vsock_uds import parse_connect

CID = 42
RX, TX, EVENT = 0, 1, 2
RX_BUF = 4096


class Guest:
    """The test driver as a vsock guest: packets out on tx, packets in from rx."""

    def __init__(self, path: Path) -> None:
        self.dev = Vsock(CID, str(path))
        self.mem = GuestMemory.from_buffer(bytearray(16 << 20))
        self.t = VirtioMmioTransport(self.dev, self.mem, NullIrq())
        self.io = IoThread()
        self.io.add_device(self.dev)
        self.d = GuestDriver(self.t, self.mem)
        assert self.d.init(queue_sizes=[64, 64, 8])
        self.d.add_chain(EVENT, [], [4])
        self.rx_posted = 0
        self.post_rx(64)
        self.inbox: list[tuple[Header, bytes]] = []
        self.fwd_cnt = 0

    def post_rx(self, n: int) -> None:
        for _ in range(n):
            self.d.add_chain(RX, [], [RX_BUF], kick=False)
        self.d.kick(RX)

    def send(self, op: int, src_port: int, dst_port: int, payload: bytes = b"",
             flags: int = 0, buf_alloc: int = 1 << 20, type_: int = TYPE_STREAM,
             src_cid: int = CID) -> None:
        hdr = HDR.pack(src_cid, HOST_CID, src_port, dst_port, len(payload), type_, op, flags,
                       buf_alloc, self.fwd_cnt)
        self.d.add_chain(TX, [hdr, payload] if payload else [hdr], [])
        self.d.used(TX)

    def pump(self, until: Callable[[], bool] = lambda: False, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.collect()
            if until() or time.monotonic() > deadline:
                return
            self.io.run_once(0.02)

    def collect(self) -> None:
        used = self.d.used(RX)
        for _, length, (buf,) in used:
            hdr = Header(*HDR.unpack_from(buf))
            payload = buf[HDR.size:length]
            assert len(payload) == hdr.len and hdr.dst_cid == CID and hdr.src_cid == HOST_CID
            self.inbox.append((hdr, payload))
        if used:
            self.post_rx(len(used))

    def take(self, op: int) -> tuple[Header, bytes]:
        self.pump(lambda: any(h.op == op for h, _ in self.inbox))
        for i, (h, p) in enumerate(self.inbox):
            if h.op == op:
                del self.inbox[i]
                return h, p
        raise AssertionError(f"no packet with op {op}: {[h.op for h, _ in self.inbox]}")

    def data(self, port: int) -> bytes:
        out = b"".join(p for h, p in self.inbox if h.op == OP_RW and h.dst_port == port)
        self.inbox = [(h, p) for h, p in self.inbox if not (h.op == OP_RW and h.dst_port == port)]
        self.fwd_cnt += len(out)
        return out

    def close(self) -> None:
        self.dev.close()
        self.io.close()


@pytest.fixture
def uds(tmp_path: Path) -> Path:
    return tmp_path / "v.sock"


@pytest.fixture
def guest(uds: Path) -> Iterator[Guest]:
    g = Guest(uds)
    yield g
    g.close()


def host_connect(g: Guest, uds: Path, port: int) -> tuple[socket.socket, int]:
    """A host program reaching guest `port`: CONNECT, the guest accepts, OK."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(uds))
    sock.sendall(f"CONNECT {port}\n".encode())
    hdr, _ = g.take(OP_REQUEST)
    assert (hdr.dst_port, hdr.src_port >= LOCAL_PORT_FIRST) == (port, True)
    g.send(OP_RESPONSE, port, hdr.src_port)
    sock.settimeout(5)
    assert sock.recv(64) == f"OK {hdr.src_port}\n".encode()
    return sock, hdr.src_port


def test_config_and_options_are_checked(uds: Path, tmp_path: Path) -> None:
    for bad in (0, 1, 2, 2**32 - 1, 2**32):
        with pytest.raises(ConfigError):
            Vsock(bad, str(uds))
    with pytest.raises(ConfigError):
        Vsock(3, str(tmp_path / "missing-dir" / "v.sock"))
    with pytest.raises(ConfigError):
        Vsock(3, str(tmp_path / ("x" * 120)))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError):
        Vsock(3, str(tmp_path / "file"))
    dev = Vsock(7, str(uds))
    assert dev.config_space() == struct.pack("<Q", 7)
    with pytest.raises(ConfigError):  # somebody listens there already
        Vsock(8, str(uds))
    dev.close()
    assert not uds.exists()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(uds))  # a socket file nobody listens on: a previous run's
    stale.close()
    Vsock(9, str(uds)).close()


def test_parse_connect() -> None:
    assert parse_connect(b"CONNECT 52") == 52
    assert parse_connect(b"CONNECT 4294967295\r") == 2**32 - 1
    for bad in (b"CONNECT", b"CONNECT -1", b"CONNECT 4294967296", b"connect 5", b"CONNECT 5 6"):
        with pytest.raises(ValueError):
            parse_connect(bad)


def test_host_connects_to_a_guest_port_and_both_directions_flow(guest: Guest, uds: Path) -> None:
    sock, local = host_connect(guest, uds, 5000)
    sock.sendall(b"to the guest")
    guest.pump(lambda: any(h.op == OP_RW for h, _ in guest.inbox))
    assert guest.data(5000) == b"to the guest"
    guest.send(OP_RW, 5000, local, b"to the host")
    assert sock.recv(100) == b"to the host"
    # the host closes: SHUTDOWN(SEND) to the guest; the guest's full shutdown gets RST
    sock.close()
    hdr, _ = guest.take(OP_SHUTDOWN)
    assert hdr.flags & SHUTDOWN_SEND
    guest.send(OP_SHUTDOWN, 5000, local, flags=SHUTDOWN_SEND | SHUTDOWN_RCV)
    guest.take(OP_RST)
    assert not guest.dev.conns


def test_data_sent_with_the_connect_line_is_not_lost(guest: Guest, uds: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(uds))
    sock.sendall(b"CONNECT 80\nGET / HTTP/1.0\r\n")
    hdr, _ = guest.take(OP_REQUEST)
    guest.send(OP_RESPONSE, 80, hdr.src_port)
    guest.pump(lambda: any(h.op == OP_RW for h, _ in guest.inbox))
    assert guest.data(80) == b"GET / HTTP/1.0\r\n"
    sock.close()


def test_bad_connect_lines_are_dropped(guest: Guest, uds: Path) -> None:
    for line in (b"HELLO 5\n", b"x" * 40):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(uds))
        sock.sendall(line)
        sock.settimeout(5)
        guest.pump(timeout=0.3)
        try:  # closed by kvmpy (with the bad line unread: a reset)
            assert sock.recv(10) == b""
        except ConnectionResetError:
            pass
        sock.close()
    assert not guest.inbox and not guest.dev.conns


def test_guest_connects_to_path_port(guest: Guest, uds: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(f"{uds}_1234")
    server.listen()
    guest.send(OP_REQUEST, 3333, 1234)
    hdr, _ = guest.take(OP_RESPONSE)
    assert (hdr.src_port, hdr.dst_port) == (1234, 3333)
    conn, _ = server.accept()
    guest.send(OP_RW, 3333, 1234, b"hello host")
    conn.settimeout(5)
    assert conn.recv(100) == b"hello host"
    conn.sendall(b"hello guest")
    guest.pump(lambda: any(h.op == OP_RW for h, _ in guest.inbox))
    assert guest.data(3333) == b"hello guest"
    # the guest half-closes: the host reads EOF and can still answer
    guest.send(OP_SHUTDOWN, 3333, 1234, flags=SHUTDOWN_SEND)
    guest.pump(timeout=0.2)
    assert conn.recv(100) == b""
    conn.sendall(b"late answer")
    conn.close()
    guest.pump(lambda: any(h.op == OP_SHUTDOWN for h, _ in guest.inbox))
    assert guest.data(3333) == b"late answer"
    hdr, _ = guest.take(OP_SHUTDOWN)
    assert hdr.flags == SHUTDOWN_SEND | SHUTDOWN_RCV  # both directions are done...
    guest.send(OP_RST, 3333, 1234)  # ...and the guest ends it, as Linux does
    guest.pump(timeout=0.1)
    assert not guest.dev.conns
    server.close()


def test_nothing_listening_is_rst_and_unknown_connections_too(guest: Guest) -> None:
    guest.send(OP_REQUEST, 3333, 999)
    hdr, _ = guest.take(OP_RST)
    assert (hdr.src_port, hdr.dst_port) == (999, 3333)
    guest.send(OP_RW, 3334, 999, b"data")
    guest.take(OP_RST)
    guest.send(OP_RST, 3335, 999)  # an RST is never answered
    guest.pump(timeout=0.1)
    assert not guest.inbox


def test_packets_from_a_wrong_cid_are_dropped(guest: Guest, uds: Path) -> None:
    sock, local = host_connect(guest, uds, 7)
    guest.send(OP_RW, 7, local, b"spoofed", src_cid=CID + 1)
    guest.send(OP_REQUEST, 7, 9, type_=2)  # SEQPACKET is not offered: RST
    guest.take(OP_RST)
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(10)


def test_credit_limits_what_the_host_sends_and_updates_resume_it(guest: Guest,
                                                                 uds: Path) -> None:
    sock, local = host_connect(guest, uds, 9)
    guest.send(OP_CREDIT_UPDATE, 9, local, buf_alloc=10_000)  # a small receive buffer
    payload = bytes(range(256)) * 200  # 51200 bytes
    sock.sendall(payload)
    guest.pump(timeout=0.5)
    got = guest.data(9)
    assert len(got) == 10_000  # exactly the credit, then nothing
    guest.take(OP_CREDIT_REQUEST)  # and it asks for more
    guest.send(OP_CREDIT_UPDATE, 9, local, buf_alloc=10_000)  # consumed: fwd_cnt moved
    guest.pump(timeout=0.5)
    got += guest.data(9)
    assert len(got) == 20_000
    guest.send(OP_CREDIT_UPDATE, 9, local, buf_alloc=1 << 20)
    guest.pump(lambda: len(got) + sum(len(p) for h, p in guest.inbox if h.op == OP_RW)
               >= len(payload))
    assert got + guest.data(9) == payload


def test_guest_data_is_buffered_for_a_slow_host_and_credit_is_returned(guest: Guest,
                                                                        uds: Path) -> None:
    sock, local = host_connect(guest, uds, 11)
    conn = next(iter(guest.dev.conns.values()))
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = b""
    chunk = bytes(range(256)) * 256  # 64 KiB
    for _ in range(BUF_ALLOC // len(chunk)):
        guest.send(OP_RW, 11, local, chunk)
        sent += chunk
    assert len(conn.to_host) > BUF_ALLOC // 2  # the host has not read: kvmpy holds it
    sock.settimeout(5)
    got = b""
    while len(got) < len(sent):  # the host reads; kvmpy passes the rest on...
        got += sock.recv(1 << 16)
        guest.pump(timeout=0.01)
    assert got == sent and not conn.to_host
    updates = [h.fwd_cnt for h, _ in guest.inbox if h.op == OP_CREDIT_UPDATE]
    assert updates and updates == sorted(updates)  # ...and gives the guest credit back
    guest.send(OP_CREDIT_REQUEST, 11, local)
    guest.inbox.clear()
    hdr, _ = guest.take(OP_CREDIT_UPDATE)
    assert (hdr.buf_alloc, hdr.fwd_cnt) == (BUF_ALLOC, len(sent))


def test_a_guest_that_sends_past_its_credit_is_reset(guest: Guest, uds: Path) -> None:
    sock, local = host_connect(guest, uds, 12)
    conn = next(iter(guest.dev.conns.values()))
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    chunk = bytes(64 * 1024)
    for _ in range(BUF_ALLOC // len(chunk) + 1):  # one chunk more than kvmpy buffers
        guest.send(OP_RW, 12, local, chunk)
    guest.take(OP_RST)
    assert not guest.dev.conns
    sock.settimeout(5)
    got = b""
    while data := sock.recv(1 << 16):
        got += data
    assert len(got) < BUF_ALLOC + len(chunk)  # the excess never reached the host


def test_credit_updates_follow_forwarded_bytes(guest: Guest, uds: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(f"{uds}_77")
    server.listen()
    guest.send(OP_REQUEST, 4000, 77)
    guest.take(OP_RESPONSE)
    conn, _ = server.accept()
    for _ in range(5):
        guest.send(OP_RW, 4000, 77, bytes(32 * 1024))
    hdr, _ = guest.take(OP_CREDIT_UPDATE)
    assert hdr.fwd_cnt >= BUF_ALLOC // 4 and hdr.buf_alloc == BUF_ALLOC
    conn.settimeout(5)
    got = 0
    while got < 5 * 32 * 1024:
        got += len(conn.recv(1 << 16))
        guest.pump(timeout=0.01)
    guest.inbox.clear()
    guest.send(OP_CREDIT_REQUEST, 4000, 77)
    assert guest.take(OP_CREDIT_UPDATE)[0].fwd_cnt == 5 * 32 * 1024
    conn.close()
    server.close()


def test_receive_buffers_running_out_pauses_and_resumes(guest: Guest, uds: Path) -> None:
    sock, _ = host_connect(guest, uds, 13)
    payload = bytes(range(256)) * 2048  # 512 KiB: more than 64 receive buffers hold
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    deadline = time.monotonic() + 10
    while not guest.dev.rx_starved and time.monotonic() < deadline:
        guest.io.run_once(0.01)  # the guest reads nothing: its buffers run out
    assert guest.dev.rx_starved
    guest.pump(lambda: sum(len(p) for h, p in guest.inbox if h.op == OP_RW) >= len(payload),
               timeout=20)
    sender.join()
    assert guest.data(13) == payload


def test_restore_resets_connections_and_sends_the_reset_event(guest: Guest, uds: Path) -> None:
    sock, _ = host_connect(guest, uds, 15)
    assert guest.dev.state() == {"cid": CID}
    with pytest.raises(SnapshotError, match="the guest had CID 99"):
        guest.dev.restore(StateReader({"cid": 99}, "vsock"))
    guest.dev.restore(StateReader({"cid": CID}, "vsock"))
    assert not guest.d.used(EVENT)  # (the queues are not restored yet)
    guest.t.process_all()  # what a restored machine does before its vCPUs run
    ((_, length, (event,)),) = guest.d.used(EVENT)
    assert (length, event) == (4, struct.pack("<I", 0))  # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    assert not guest.dev.conns
    sock.settimeout(5)
    assert sock.recv(10) == b""


def test_a_short_packet_breaks_the_ring(guest: Guest) -> None:
    guest.d.add_chain(TX, [b"short"], [])
    assert guest.t.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET


def test_a_payload_length_past_the_buffer_is_dropped(guest: Guest) -> None:
    hdr = HDR.pack(CID, HOST_CID, 1, 2, 1000, TYPE_STREAM, OP_RW, 0, 0, 0)
    guest.d.add_chain(TX, [hdr, b"only ten b"], [])
    guest.pump(timeout=0.1)
    assert not guest.inbox and not guest.t.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET


def test_guest_side_rst_closes_the_host_socket(guest: Guest, uds: Path) -> None:
    sock, local = host_connect(guest, uds, 17)
    guest.send(OP_RST, 17, local)
    sock.settimeout(5)
    assert sock.recv(10) == b""
    assert not guest.dev.conns


def test_shutdown_rcv_stops_reading_the_host(guest: Guest, uds: Path) -> None:
    sock, local = host_connect(guest, uds, 19)
    guest.send(OP_SHUTDOWN, 19, local, flags=SHUTDOWN_RCV)
    sock.sendall(b"nobody reads this")
    guest.pump(timeout=0.2)
    assert guest.data(19) == b""
