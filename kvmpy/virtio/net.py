"""virtio-net (virtio 1.2 §5.1): one receive and one transmit queue over a frame backend.

What it is: the device side of Linux's virtio_net driver. Transmit chains
(12-byte `virtio_net_hdr` then the Ethernet frame) go to the backend with one
gathered write straight from guest memory. Received frames (the backend puts
the same header first) are read into one bounce buffer, because their size is
unknown until read, and copied into one receive chain or, with
VIRTIO_NET_F_MRG_RXBUF, spread over as many as needed with `num_buffers` set
(§5.1.6.4). The MAC address is in the configuration space
(VIRTIO_NET_F_MAC) with the link always up (VIRTIO_NET_F_STATUS). Checksum
and segmentation offloads are offered when the backend can do them
(`offload_capable`), and what the driver accepts for receive is passed to the
backend (`set_offload`) so it never sends the guest what it cannot take.

When the guest has no receive buffers the device keeps the one frame it
has read, stops watching the backend (`pause_reader`) and asks for a
notification; the guest's next receive-queue notify resumes it.

What it is not: multiqueue, a control queue (no promiscuous/VLAN/MAC
filtering commands), or vhost. The backend is any object with the
`NetBackend` shape: the tap in `kvmpy.virtio.tap`, or a socketpair in tests.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from kvmpy.errors import ConfigError
from kvmpy.ratelimit import NO_LIMITS, Limits, RateLimiter
from kvmpy.state.values import StateReader, b64
from kvmpy.virtio.device import VIRTIO_ID_NET, VirtioDevice, bit
from kvmpy.virtio.iov import iov_len, iov_write
from kvmpy.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError
from kvmpy.virtio.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO, VNET_HDR_LEN

# §5.1.3 feature bits
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1

RECEIVEQ = 0
TRANSMITQ = 1
# A GSO frame is at most 64 KiB of IP plus Ethernet/VLAN headers, after the vnet header.
MAX_FRAME = VNET_HDR_LEN + 65535 + 14 + 4
RX_BATCH = 64  # frames per backend wakeup, so one busy backend cannot starve the rest

_OFFLOAD_FEATURES = (
    bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6) | bit(VIRTIO_NET_F_GUEST_UFO)
    | bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6) | bit(VIRTIO_NET_F_HOST_UFO)
)
# §5.1.3.1: each needs the checksum feature of its direction.
_NEEDS = {
    VIRTIO_NET_F_GUEST_TSO4: VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO6: VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_UFO: VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_HOST_TSO4: VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO6: VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_UFO: VIRTIO_NET_F_CSUM,
}


class NetBackend(Protocol):
    """Where frames go: each frame is a 12-byte virtio_net_hdr then Ethernet."""

    offload_capable: bool

    def fileno(self) -> int: ...

    def read_frame(self, buf: bytearray | memoryview) -> int | None: ...

    def write_frame(self, views: Sequence[memoryview]) -> None: ...

    def set_offload(self, flags: int) -> None: ...

    def close(self) -> None: ...


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes; ConfigError if malformed or multicast."""
    parts = text.split(":")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        mac = b""
    if len(parts) != 6 or len(mac) != 6 or any(len(p) != 2 for p in parts):
        raise ConfigError(f"MAC address {text!r} is not six hex bytes like 52:54:00:12:34:56")
    if mac[0] & 1:
        raise ConfigError(f"MAC address {text} is multicast")
    return mac


def random_mac() -> bytes:
    """A locally administered unicast address in the 52:54:00 range."""
    return b"\x52\x54\x00" + os.urandom(3)


class Net(VirtioDevice):
    device_id = VIRTIO_ID_NET
    name = "virtio-net"

    def __init__(self, backend: NetBackend, mac: bytes | str | None = None, *,
                 queue_size: int = 256, mrg_rxbuf: bool = True,
                 limits: Limits = NO_LIMITS) -> None:
        super().__init__((queue_size, queue_size))
        # the same rate each way, each with its bucket: transmit through `drain`, receive
        # in `_receive` (a throttled frame waits in rx_buf, the tap unwatched meanwhile)
        self.rx_limiter = RateLimiter(limits) if limits else None
        if limits:
            self.limiters[TRANSMITQ] = RateLimiter(limits)
        self.backend = backend
        if isinstance(mac, str):
            mac = parse_mac(mac)
        if mac is not None and len(mac) != 6:
            raise ConfigError(f"MAC address {mac.hex(':')} is not 6 bytes")
        self.mac = mac if mac is not None else random_mac()
        self.offer_mrg_rxbuf = mrg_rxbuf
        self.rx_buf = bytearray(MAX_FRAME)
        self.rx_len = 0  # a frame read from the backend but not yet given to the guest
        self.rx_paused = False
        self.stats = {"rx_frames": 0, "rx_dropped": 0, "tx_frames": 0, "tx_dropped": 0}

    # -- negotiation and configuration ----------------------------------------------------
    def device_features(self) -> int:
        features = bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS)
        if self.offer_mrg_rxbuf:
            features |= bit(VIRTIO_NET_F_MRG_RXBUF)
        if self.backend.offload_capable:
            features |= _OFFLOAD_FEATURES
        return features

    def accept_features(self, acked: int) -> bool:
        return all(not acked & bit(f) or acked & bit(need) for f, need in _NEEDS.items())

    def config_space(self) -> bytes:
        """§5.1.4 struct virtio_net_config: mac, status, max_virtqueue_pairs."""
        return self.mac + struct.pack("<HH", VIRTIO_NET_S_LINK_UP, 1)

    def io_sources(self) -> list[tuple[int, Callable[[], None]]]:
        return [(self.backend.fileno(), self.on_backend_readable)]

    def _tap_offload(self) -> int:
        if not self.has_feature(VIRTIO_NET_F_GUEST_CSUM):
            return 0
        flags = TUN_F_CSUM
        for feature, tun_flag in ((VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
                                  (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
                                  (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO)):
            if self.has_feature(feature):
                flags |= tun_flag
        return flags

    def activate(self) -> None:
        if self.backend.offload_capable:
            try:
                self.backend.set_offload(self._tap_offload())
            except OSError as e:  # the backend then sends plain, fully checksummed frames
                self.warn("offload", "backend refused offloads: %s", e)
        self.rx_paused = False
        self.resume_reader(self.backend.fileno())

    def reset(self) -> None:
        self.rx_len = 0
        if self.backend.offload_capable:
            try:
                self.backend.set_offload(0)
            except OSError:
                pass

    def close(self) -> None:
        self.backend.close()

    def state(self) -> dict[str, Any]:
        """The MAC the driver read, a frame read from the backend but not yet given to
        the guest, and whether the backend is paused for want of receive buffers. The
        backend itself (a tap) is not state: a restored device is given its own."""
        return {"mac": self.mac.hex(":"), "rx_frame": b64(self.rx_buf[: self.rx_len]),
                "rx_paused": self.rx_paused}

    def restore(self, reader: StateReader) -> None:
        """Take a `state()`; a live device's backend gets the guest's offloads again and
        is watched unless the device was waiting for buffers."""
        try:
            mac = parse_mac(reader.str("mac", 17))
        except ConfigError as e:
            raise reader.fail("mac", str(e)) from None
        frame = reader.bytes("rx_frame", MAX_FRAME)
        if 0 < len(frame) <= VNET_HDR_LEN:
            raise reader.fail("rx_frame", f"{len(frame)} bytes: no frame after the header")
        rx_paused = reader.bool("rx_paused")
        reader.done()
        self.mac = mac
        self.rx_buf[: len(frame)] = frame
        self.rx_len = len(frame)
        self.rx_paused = rx_paused
        if self.active and self.backend.offload_capable:
            try:
                self.backend.set_offload(self._tap_offload())
            except OSError as e:
                self.warn("offload", "backend refused offloads: %s", e)
        if self.active and not rx_paused:
            self.resume_reader(self.backend.fileno())
        else:
            self.pause_reader(self.backend.fileno())

    # -- queues --------------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        if index == TRANSMITQ:
            self.drain(TRANSMITQ, self._transmit)
        elif index == RECEIVEQ:
            # New receive buffers: deliver what waits, and listen to the backend again.
            if self.rx_paused:
                self.rx_paused = False
                self.resume_reader(self.backend.fileno())
            self._receive()

    def _transmit(self, chain: DescriptorChain) -> int:
        readable, writable = chain.buffers()
        if writable:
            self.warn("tx-writable", "transmit chain with device-writable buffers; ignored")
        length = iov_len(readable)
        if not VNET_HDR_LEN < length <= MAX_FRAME:
            self.warn("tx-len", "transmit frame of %d bytes dropped", length)
            self.stats["tx_dropped"] += 1
            return 0
        try:
            self.backend.write_frame(readable)
            self.stats["tx_frames"] += 1
        except OSError as e:
            self.warn("tx-failed", "backend write failed: %s", e)
            self.stats["tx_dropped"] += 1
        return 0

    def on_backend_readable(self) -> None:
        """The backend fd is readable (I/O thread)."""
        with self.lock:
            if not self.active:
                # Nobody to deliver to: stop the level-triggered wakeups until activate().
                self.pause_reader(self.backend.fileno())
                return
        self.run_guarded(self._receive)

    def _receive(self) -> None:
        q = self.queues[RECEIVEQ]
        if not q.ready:
            return
        published = q.next_used
        for _ in range(RX_BATCH):
            if not self.rx_len:
                try:
                    n = self.backend.read_frame(self.rx_buf)
                except OSError as e:
                    self.warn("rx-failed", "backend read failed: %s", e)
                    break
                if n is None:
                    break
                if n == 0:  # end of file: the backend went away; stop watching it
                    self.warn("rx-eof", "backend closed")
                    self.rx_paused = True
                    self.pause_reader(self.backend.fileno())
                    break
                if n <= VNET_HDR_LEN:
                    self.stats["rx_dropped"] += 1
                    continue
                self.rx_len = n
            if self.rx_limiter is not None and self._rx_throttled():
                break
            if not self._deliver(q):
                if self.rx_limiter is not None:  # the frame is paid for when it goes
                    self.rx_limiter.refund(self.rx_len - VNET_HDR_LEN)
                if not self.rx_paused:
                    self.rx_paused = True
                    self.pause_reader(self.backend.fileno())
                break
        if q.next_used != published:
            self.signal_used(q)

    def _rx_throttled(self) -> bool:
        """Over the receive rate: stop reading the tap until the limiter's retry."""
        assert self.rx_limiter is not None
        wait = self.rx_limiter.consume(self.rx_len - VNET_HDR_LEN)
        if not wait:
            return False
        if not self.rx_paused:
            self.rx_paused = True
            self.pause_reader(self.backend.fileno())
        if RECEIVEQ not in self._retrying and self.call_later is not None:
            self._retrying.add(RECEIVEQ)
            self.call_later(wait, lambda: self._retry(RECEIVEQ))
        return True

    def rate_cost(self, chain: DescriptorChain) -> int:
        return max(0, chain.readable_bytes - VNET_HDR_LEN)

    @staticmethod
    def _pop_rx(q: Virtqueue) -> tuple[int, list[memoryview]] | None:
        """The head and writable buffers of the next receive chain, or None."""
        chain = q.pop()
        if chain is None and q.enable_notification():
            chain = q.pop()
        if chain is None:
            return None
        readable, writable = chain.buffers()
        if readable:
            raise VirtqueueError("receive chain with device-readable buffers")
        return chain.head, writable

    def _deliver(self, q: Virtqueue) -> bool:
        """Give the pending frame to the guest; False (frame kept) if it has no room."""
        frame = memoryview(self.rx_buf)[: self.rx_len]
        if not self.has_feature(VIRTIO_NET_F_GUEST_CSUM):
            frame[0] = 0  # §5.1.6.4.1: flags are zero without GUEST_CSUM
        mergeable = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        buffers: list[tuple[int, list[memoryview]]] = []
        room = 0
        while room < len(frame):
            popped = self._pop_rx(q)
            if popped is None:
                q.undo_pop(len(buffers))
                return False
            buffers.append(popped)
            room += iov_len(popped[1])
            if not mergeable:
                break
        first = buffers[0][1]
        if iov_len(first) < VNET_HDR_LEN:
            raise VirtqueueError("receive buffer smaller than the 12-byte virtio_net_hdr")
        self.rx_len = 0
        if room < len(frame):  # one buffer without MRG_RXBUF, and it is too small
            q.undo_pop(1)
            self.warn("rx-small", "receive buffer of %d bytes for a %d-byte frame; dropped",
                      room, len(frame))
            self.stats["rx_dropped"] += 1
            return True
        used = []
        offset = 0
        for head, writable in buffers:
            n = iov_write(writable, frame[offset:])
            used.append((head, n))
            offset += n
        # num_buffers (§5.1.6.4): how many buffers this frame took; 1 without MRG_RXBUF.
        iov_write(first, struct.pack("<H", len(buffers)), 10)
        q.add_used_batch(used)
        self.stats["rx_frames"] += 1
        return True
