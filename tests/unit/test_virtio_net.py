"""virtio-net over a socketpair backend (and, where possible, a real tap in a netns)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.bus import NullIrq
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory
from kvmpy.virtio.device import VIRTIO_STATUS_DEVICE_NEEDS_RESET, VIRTIO_STATUS_FEATURES_OK
from kvmpy.virtio.driver import GuestDriver, MemoryBackend, SocketPairBackend
from kvmpy.virtio.mmio import VirtioMmioTransport
from kvmpy.virtio.net import (
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_MRG_RXBUF,
    Net,
    parse_mac,
)
from kvmpy.virtio.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO

RX, TX = 0, 1
HDR = 12
MAC = "52:54:00:12:34:56"


def attach(backend: object, features_off: int = 0, **kw: object
           ) -> tuple[Net, GuestDriver, NullIrq]:
    dev = Net(backend, MAC, **kw)  # type: ignore[arg-type]
    mem = GuestMemory.from_buffer(bytearray(2 << 20))
    irq = NullIrq()
    d = GuestDriver(VirtioMmioTransport(dev, mem, irq), mem)
    assert d.init(d.device_features() & ~features_off)
    return dev, d, irq


def frame(n: int) -> bytes:
    return bytes(HDR) + os.urandom(n)


def test_config_space_mac_and_link() -> None:
    backend = SocketPairBackend()
    _, d, _ = attach(backend)
    assert b"".join(d.config(i, 1) for i in range(6)) == parse_mac(MAC)  # as Linux reads it
    assert struct.unpack("<H", d.config(6, 2))[0] == 1  # VIRTIO_NET_S_LINK_UP
    backend.close()


def test_transmit_reaches_the_backend_unchanged() -> None:
    backend = SocketPairBackend()
    dev, d, _ = attach(backend)
    packet = frame(100)
    d.add_chain(TX, [packet[:HDR], packet[HDR:50], packet[50:]], [])
    assert backend.peer.recv(4096) == packet
    assert [length for _, length, _ in d.used(TX)] == [0]
    assert dev.stats["tx_frames"] == 1
    backend.close()


def test_receive_into_one_buffer_sets_num_buffers() -> None:
    backend = SocketPairBackend()
    dev, d, irq = attach(backend, 1 << VIRTIO_NET_F_MRG_RXBUF)
    d.add_chain(RX, [], [1526])
    packet = frame(60)
    backend.peer.send(packet)
    dev.on_backend_readable()
    [(_, length, [buf])] = d.used(RX)
    assert length == len(packet)
    assert buf[HDR : len(packet)] == packet[HDR:]
    assert struct.unpack_from("<H", buf, 10)[0] == 1
    assert irq.level
    backend.close()


def test_mergeable_receive_spreads_a_frame() -> None:
    backend = SocketPairBackend()
    dev, d, _ = attach(backend)
    assert d.acked & (1 << VIRTIO_NET_F_MRG_RXBUF)
    for _ in range(4):
        d.add_chain(RX, [], [1000])
    packet = frame(2500)  # 2512 bytes: three buffers
    backend.peer.send(packet)
    dev.on_backend_readable()
    used = d.used(RX)
    assert [length for _, length, _ in used] == [1000, 1000, 512]
    data = b"".join(bufs[0][:length] for _, length, bufs in used)
    assert data[HDR:] == packet[HDR:]
    assert struct.unpack_from("<H", used[0][2][0], 10)[0] == 3
    backend.close()


def test_no_buffers_defers_the_frame_and_pauses_the_backend() -> None:
    backend = SocketPairBackend()
    dev, d, _ = attach(backend)
    paused: list[int] = []
    resumed: list[int] = []
    dev.pause_reader, dev.resume_reader = paused.append, resumed.append
    packet = frame(200)
    backend.peer.send(packet)
    dev.on_backend_readable()
    assert paused == [backend.fileno()] and dev.rx_len == len(packet)
    d.add_chain(RX, [], [2048])  # the notify delivers the kept frame
    [(_, length, [buf])] = d.used(RX)
    assert buf[HDR:length] == packet[HDR:]
    assert resumed[-1] == backend.fileno()
    backend.close()


def test_too_small_buffer_without_mrg_drops_the_frame() -> None:
    backend = SocketPairBackend()
    dev, d, _ = attach(backend, 1 << VIRTIO_NET_F_MRG_RXBUF)
    d.add_chain(RX, [], [64])
    backend.peer.send(frame(500))
    dev.on_backend_readable()
    assert d.used(RX) == [] and dev.stats["rx_dropped"] == 1
    backend.peer.send(frame(20))  # the buffer is still there for the next frame
    dev.on_backend_readable()
    assert len(d.used(RX)) == 1
    backend.close()


def test_flags_cleared_without_guest_csum() -> None:
    backend = MemoryBackend()
    dev, d, _ = attach(backend, 0xFFFF & ~(1 << VIRTIO_NET_F_MRG_RXBUF))
    assert not d.acked & (1 << VIRTIO_NET_F_GUEST_CSUM)
    assert backend.offload_flags[-1] == 0
    backend.inbox.append(b"\x01" + bytes(HDR - 1) + b"payload")
    d.add_chain(RX, [], [100])
    dev.on_backend_readable()
    [(_, _, [buf])] = d.used(RX)
    assert buf[0] == 0
    backend.close()


def test_offloads_follow_what_the_driver_acked() -> None:
    backend = MemoryBackend()
    _, d, _ = attach(backend)
    assert backend.offload_flags[-1] == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO
    d.w32(0x70, 0)  # reset gives the backend its plain mode back
    assert backend.offload_flags[-1] == 0
    backend.close()


def test_tso_without_csum_is_refused() -> None:
    backend = MemoryBackend()
    dev = Net(backend, MAC)
    mem = GuestMemory.from_buffer(bytearray(1 << 20))
    d = GuestDriver(VirtioMmioTransport(dev, mem), mem)
    offered = d.device_features()
    assert not d.init(offered & ~(1 << VIRTIO_NET_F_GUEST_CSUM))
    assert not d.status & VIRTIO_STATUS_FEATURES_OK
    assert offered & (1 << VIRTIO_NET_F_GUEST_TSO4)
    backend.close()


def test_receive_chain_with_readable_part_needs_reset() -> None:
    backend = MemoryBackend()
    dev, d, _ = attach(backend)
    d.add_chain(RX, [b"oops"], [100])
    backend.inbox.append(frame(10))
    dev.on_backend_readable()
    assert d.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET
    backend.close()


def test_parse_mac() -> None:
    assert parse_mac("02:00:00:00:00:01") == b"\x02\0\0\0\0\x01"
    for bad in ("02:00:00:00:00", "zz:00:00:00:00:01", "01:00:00:00:00:01", "2:0:0:0:0:1"):
        with pytest.raises(ConfigError):
            parse_mac(bad)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("rx"), st.lists(st.integers(HDR, 3000), min_size=1, max_size=3)),
    st.tuples(st.just("tx"), st.lists(st.integers(0, 3000), min_size=1, max_size=3)),
    st.tuples(st.just("frame"), st.integers(1, 70000)),
), max_size=20), mrg=st.booleans())
def test_random_traffic(ops, mrg) -> None:  # type: ignore[no-untyped-def]
    backend = MemoryBackend()
    dev, d, _ = attach(backend, 0 if mrg else 1 << VIRTIO_NET_F_MRG_RXBUF)
    for op, arg in ops:
        if op == "rx" and d.queues[RX].free:
            d.add_chain(RX, [], arg[:1])
        elif op == "tx" and len(d.queues[TX].free) >= len(arg):
            d.add_chain(TX, [bytes(n) for n in arg], [])
        elif op == "frame":
            backend.inbox.append(bytes(arg))
            dev.on_backend_readable()
        for _, length, bufs in d.used(RX):
            assert length <= sum(len(b) for b in bufs)
        d.used(TX)
        if not d.queues[RX].chains and not d.queues[TX].chains:
            d.reset_heap()
    assert not d.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET
    assert all(HDR < len(f) <= 65535 + 30 for f in backend.sent)
    backend.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("rx"), st.integers(HDR, 3000)),
    st.tuples(st.just("tx"), st.integers(HDR + 1, 3000)),
    st.tuples(st.just("frame"), st.integers(HDR + 1, 6000)),
    st.tuples(st.just("kick"), st.just(0)),
    st.tuples(st.just("time"), st.integers(0, 20)),  # milliseconds, then due timers run
    st.tuples(st.just("reset"), st.just(0)),  # the driver resets and sets up the device
), max_size=40), mrg=st.booleans())
def test_random_traffic_under_a_rate_limit(ops, mrg) -> None:  # type: ignore[no-untyped-def]
    """Throttled, deferred and retried both ways, and reset meanwhile: every used id is a
    chain the driver offered and has not had back (the test driver checks, as Linux's
    virtio_ring does), and every frame gets through, whole and in order, once there are
    buffers and time (but the one a reset drops)."""
    from kvmpy.ratelimit import Limits, RateLimiter

    backend = MemoryBackend()
    dev, d, _ = attach(backend, 0 if mrg else 1 << VIRTIO_NET_F_MRG_RXBUF,
                       limits=Limits(bw=100_000))
    clock = FakeClock()
    dev.rx_limiter = RateLimiter(Limits(bw=100_000), clock)  # 10 kB of burst
    dev.limiters[TX] = RateLimiter(Limits(bw=100_000), clock)
    timers: list[tuple[float, object]] = []
    dev.call_later = lambda delay, fn: timers.append((clock.now + delay, fn))
    sent: list[bytes] = []
    received: list[bytes] = []
    resets = 0

    def collect() -> None:
        used = d.used(RX)
        while used:  # a frame: num_buffers entries, the first with the header
            _, length, [first] = used[0]
            count = struct.unpack_from("<H", first, 10)[0] if mrg else 1
            parts = [bufs[0][:n] for _, n, bufs in used[:count]]
            assert len(parts) == count
            received.append(b"".join(parts)[HDR:])
            used = used[count:]
        d.used(TX)

    def run_timers() -> None:
        while due := [t for t in timers if t[0] <= clock.now]:
            for t in due:
                timers.remove(t)
                t[1]()  # type: ignore[operator]

    for op, arg in ops:
        if op == "rx" and d.queues[RX].free:
            d.add_chain(RX, [], [arg if mrg else 6000])
        elif op == "tx" and d.queues[TX].free:
            d.add_chain(TX, [bytes(arg)], [])
        elif op == "frame":
            packet = frame(arg - HDR)
            sent.append(packet[HDR:])
            backend.inbox.append(packet)
            dev.on_backend_readable()
        elif op == "kick":
            d.kick(RX)
        elif op == "reset":
            resets += 1
            assert d.init(d.acked)
        elif op == "time":
            clock.now += arg / 1000
            run_timers()
        collect()
    for _ in range(len(sent) * 4):  # room and time enough for what is still waiting
        if len(d.queues[RX].free) > 4:
            d.add_chain(RX, [], [3000 if mrg else 6000])
        clock.now += 0.1
        run_timers()
        collect()
    assert not d.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET
    assert dev.stats["rx_dropped"] == 0
    missing = iter(sent)  # (what arrived, in the order sent, with at most a frame a reset lost)
    assert all(any(got == s for s in missing) for got in received)
    assert len(sent) - resets <= len(received) <= len(sent)
    backend.close()


TAP_SCRIPT = textwrap.dedent("""
    import os, select, struct, subprocess, sys
    from kvmpy.virtio.tap import Tap
    tap = Tap("kvmpyt0")
    assert tap.name == "kvmpyt0", tap.name
    subprocess.run(["ip", "addr", "add", "10.0.2.1/24", "dev", "kvmpyt0"], check=True)
    subprocess.run(["ip", "link", "set", "kvmpyt0", "up"], check=True)
    guest_mac = bytes.fromhex("525400123456")
    # An ARP request from the "guest" for 10.0.2.1: the host stack must answer it.
    arp = (b"\\xff" * 6 + guest_mac + b"\\x08\\x06" + bytes.fromhex("0001080006040001")
           + guest_mac + bytes([10, 0, 2, 15]) + bytes(6) + bytes([10, 0, 2, 1]))
    tap.write_frame([memoryview(bytes(12)), memoryview(arp)])
    buf = bytearray(70000)
    for _ in range(50):
        select.select([tap.fileno()], [], [], 0.1)
        n = tap.read_frame(buf)
        eth = buf[12:n or 12]  # after the vnet header
        if eth[12:14] == b"\\x08\\x06" and eth[20:22] == b"\\x00\\x02":  # ARP reply
            print("ARP-REPLY", tap.offload_capable)
            sys.exit(0)
    sys.exit("no ARP reply")
""")


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun")
                    or shutil.which("unshare") is None or shutil.which("ip") is None,
                    reason="needs root, /dev/net/tun, unshare and ip")
def test_real_tap_in_a_private_network_namespace() -> None:
    # unshare -n: the tap and its address exist only in a namespace that dies with the child.
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", TAP_SCRIPT],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ARP-REPLY", "True"]


def test_socketpair_backend_frames_keep_boundaries() -> None:
    backend = SocketPairBackend()
    backend.peer.send(b"a" * 20)
    backend.peer.send(b"b" * 30)
    buf = bytearray(100)
    assert backend.read_frame(buf) == 20
    assert backend.read_frame(buf) == 30
    assert backend.read_frame(buf) is None
    assert isinstance(backend.sock, socket.socket)
    backend.close()
