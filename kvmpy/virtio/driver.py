"""A guest-side virtio driver in Python, for tests, fuzzing and benchmarks only.

What it is: what Linux's virtio_mmio.c and virtio_ring.c do, reduced to the
steps a test needs: reset, ACKNOWLEDGE, DRIVER, feature negotiation,
FEATURES_OK, queue setup, DRIVER_OK (§3.1.1, §4.2.3), then placing
descriptor chains (direct or indirect) and notifying, and reading the used
ring back. It talks to a transport only through `read`/`write` at register
offsets, exactly as a guest would through the MMIO bus, and lays out its
rings and buffers in a `GuestMemory` with a bump allocator.

What it is not: used by the VMM, or careful about anything a real driver must
be careful about (it never frees buffer memory; `reset_heap()` does, all at once).
"""

from __future__ import annotations

import os
import socket
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvmpy.bus import Bus, Device
from kvmpy.memory import GuestMemory
from kvmpy.virtio import mmio
from kvmpy.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_STATUS_ACKNOWLEDGE,
    VIRTIO_STATUS_DRIVER,
    VIRTIO_STATUS_DRIVER_OK,
    VIRTIO_STATUS_FEATURES_OK,
)
from kvmpy.virtio.queue import (
    DESC_SIZE,
    USED_ELEM_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)

_DESC = struct.Struct("<QIHH")


@dataclass
class DriverQueue:
    index: int
    size: int
    desc: int
    avail: int
    used: int
    free: list[int]
    avail_idx: int = 0
    last_used: int = 0
    chains: dict[int, tuple[list[int], list[tuple[int, int]]]] = field(default_factory=dict)


class BusWindow:
    """A device's window seen through a `Bus`: offsets in, bus addresses out.

    Lets a test reach the transport the way a vCPU's MMIO exit does, through
    the bus's dispatch, rather than by calling the transport directly.
    """

    def __init__(self, bus: Bus, base: int) -> None:
        self.bus = bus
        self.base = base

    def read(self, offset: int, size: int) -> bytes:
        return self.bus.read(self.base + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.bus.write(self.base + offset, data)


class GuestDriver:
    """Drive a virtio-mmio window `t` as a guest would, with rings and buffers in `mem`."""

    def __init__(self, transport: Device, mem: GuestMemory,
                 heap: tuple[int, int] | None = None) -> None:
        self.t = transport
        self.mem = mem
        self.acked = 0  # the features `init` acknowledged
        start, end = heap if heap is not None else (mem.regions[0].gpa, mem.end)
        self.heap_start, self.heap_end = start, end
        self.heap = start
        self.queues: list[DriverQueue] = []
        self.ring_heap_end = start

    # -- registers -----------------------------------------------------------------------
    def r32(self, offset: int) -> int:
        return struct.unpack("<I", self.t.read(offset, 4))[0]

    def w32(self, offset: int, value: int) -> None:
        self.t.write(offset, struct.pack("<I", value & 0xFFFFFFFF))

    def config(self, offset: int, size: int) -> bytes:
        return self.t.read(mmio.CONFIG + offset, size)

    @property
    def status(self) -> int:
        return self.r32(mmio.STATUS)

    # -- memory --------------------------------------------------------------------------
    def alloc(self, size: int, align: int = 16) -> int:
        gpa = (self.heap + align - 1) // align * align
        if gpa + size > self.heap_end:
            raise MemoryError("test driver heap exhausted")
        self.heap = gpa + size
        return gpa

    def reset_heap(self) -> None:
        """Forget every buffer (rings stay)."""
        self.heap = self.ring_heap_end

    # -- initialisation (§3.1.1) -------------------------------------------------------------
    def device_features(self) -> int:
        features = 0
        for sel in (1, 0):
            self.w32(mmio.DEVICE_FEATURES_SEL, sel)
            features = (features << 32) | self.r32(mmio.DEVICE_FEATURES)
        return features

    def init(self, features: int | None = None, queue_sizes: list[int] | None = None) -> bool:
        """The whole init sequence; False if the device refused FEATURES_OK."""
        self.heap = self.heap_start
        self.queues = []
        self.w32(mmio.STATUS, 0)
        self.w32(mmio.STATUS, VIRTIO_STATUS_ACKNOWLEDGE)
        self.w32(mmio.STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER)
        offered = self.device_features()
        acked = offered if features is None else features
        for sel in (0, 1):
            self.w32(mmio.DRIVER_FEATURES_SEL, sel)
            self.w32(mmio.DRIVER_FEATURES, acked >> (32 * sel))
        status = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK
        self.w32(mmio.STATUS, status)
        if not self.status & VIRTIO_STATUS_FEATURES_OK:
            return False
        self.acked = acked
        index = 0
        while True:
            self.w32(mmio.QUEUE_SEL, index)
            max_size = self.r32(mmio.QUEUE_NUM_MAX)
            if max_size == 0:
                break
            wanted = queue_sizes[index] if queue_sizes and index < len(queue_sizes) else max_size
            self.queues.append(self._setup_queue(index, min(wanted, max_size)))
            index += 1
        self.ring_heap_end = self.heap
        self.w32(mmio.STATUS, status | VIRTIO_STATUS_DRIVER_OK)
        return True

    def _setup_queue(self, index: int, size: int) -> DriverQueue:
        desc = self.alloc(DESC_SIZE * size, 16)
        avail = self.alloc(6 + 2 * size, 2)
        used = self.alloc(6 + USED_ELEM_SIZE * size, 4)
        for gpa, length in ((desc, DESC_SIZE * size), (avail, 6 + 2 * size),
                            (used, 6 + USED_ELEM_SIZE * size)):
            self.mem.fill(gpa, length, 0)
        self.w32(mmio.QUEUE_NUM, size)
        for low, gpa in ((mmio.QUEUE_DESC_LOW, desc), (mmio.QUEUE_DRIVER_LOW, avail),
                         (mmio.QUEUE_DEVICE_LOW, used)):
            self.w32(low, gpa)
            self.w32(low + 4, gpa >> 32)
        self.w32(mmio.QUEUE_READY, 1)
        return DriverQueue(index, size, desc, avail, used, list(range(size)))

    # -- requests ------------------------------------------------------------------------------
    def add_chain(self, qi: int, out: list[bytes], in_: list[int], *,
                  indirect: bool = False, kick: bool = True) -> int:
        """Offer one chain: device-readable buffers `out`, device-writable sizes `in_`.

        Returns the head index. Writable buffers are zero-filled first.
        """
        q = self.queues[qi]
        bufs: list[tuple[int, int, int]] = []  # gpa, len, flags
        for data in out:
            gpa = self.alloc(max(len(data), 1))
            self.mem.write(gpa, data)
            bufs.append((gpa, len(data), 0))
        writable = []
        for length in in_:
            gpa = self.alloc(max(length, 1))
            self.mem.fill(gpa, length, 0)
            bufs.append((gpa, length, VIRTQ_DESC_F_WRITE))
            writable.append((gpa, length))
        if indirect:
            table = self.alloc(DESC_SIZE * len(bufs), 16)
            for i, (gpa, length, flags) in enumerate(bufs):
                nxt = VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
                self.mem.write(table + DESC_SIZE * i, _DESC.pack(gpa, length, flags | nxt, i + 1))
            used_desc = [q.free.pop()]
            self._write_desc(q, used_desc[0], table, DESC_SIZE * len(bufs),
                             VIRTQ_DESC_F_INDIRECT, 0)
        else:
            if len(bufs) > len(q.free):
                raise MemoryError("test driver ran out of descriptors")
            used_desc = [q.free.pop() for _ in bufs]
            for i, (gpa, length, flags) in enumerate(bufs):
                last = i + 1 == len(bufs)
                self._write_desc(q, used_desc[i], gpa, length,
                                 flags | (0 if last else VIRTQ_DESC_F_NEXT),
                                 0 if last else used_desc[i + 1])
        head = used_desc[0]
        q.chains[head] = (used_desc, writable)
        self.publish(qi, head, kick=kick)
        return head

    def _write_desc(self, q: DriverQueue, index: int, gpa: int, length: int, flags: int,
                    nxt: int) -> None:
        self.mem.write(q.desc + DESC_SIZE * index, _DESC.pack(gpa, length, flags, nxt))

    def publish(self, qi: int, head: int, *, kick: bool = True) -> None:
        """Put `head` in the available ring, bump avail.idx, ask for an interrupt, notify."""
        q = self.queues[qi]
        self.mem.write_u16(q.avail + 4 + 2 * (q.avail_idx % q.size), head)
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(q.avail + 2, q.avail_idx)
        if self.acked & (1 << VIRTIO_F_EVENT_IDX):
            self.mem.write_u16(q.avail + 4 + 2 * q.size, q.last_used)  # used_event
        if kick:
            self.kick(qi)

    def kick(self, qi: int) -> None:
        self.w32(mmio.QUEUE_NOTIFY, qi)

    def used(self, qi: int, *, strict: bool = True) -> list[tuple[int, int, list[bytes]]]:
        """New used entries: (head, len, contents of each writable buffer); frees descriptors.

        `strict`: a used id that is not a chain this driver offered and has not had back
        fails, as Linux's virtio_ring does ("id N is not a head!"); a fuzzer that wrote
        rings behind the driver's back turns it off."""
        q = self.queues[qi]
        out = []
        used_idx = self.mem.read_u16(q.used + 2)
        while q.last_used != used_idx:
            slot = q.last_used % q.size
            head, length = struct.unpack("<II", self.mem.read(q.used + 4 + 8 * slot, 8))
            if strict and head not in q.chains:
                raise AssertionError(f"queue {qi}: used id {head} is not a head the "
                                     "driver offered (or it came back twice)")
            descs, writable = q.chains.pop(head, ([], []))
            q.free.extend(descs)
            out.append((head, length, [self.mem.read(gpa, n) for gpa, n in writable]))
            q.last_used = (q.last_used + 1) & 0xFFFF
        return out

    def ack_interrupt(self) -> int:
        status = self.r32(mmio.INTERRUPT_STATUS)
        self.w32(mmio.INTERRUPT_ACK, status)
        return status


# -- network backends for tests ------------------------------------------------------------
class SocketPairBackend:
    """A virtio-net backend over a SOCK_SEQPACKET socketpair: `peer` is the other host.

    Frames keep their boundaries, as on a tap; the fd is non-blocking and
    pollable, so it also works with the I/O thread.
    """

    def __init__(self, offload_capable: bool = False) -> None:
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.setblocking(False)
        self.offload_capable = offload_capable
        self.offload_flags: list[int] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_frame(self, buf: bytearray | memoryview) -> int | None:
        try:
            return self.sock.recv_into(buf)
        except BlockingIOError:
            return None

    def write_frame(self, views: Sequence[memoryview]) -> None:
        self.sock.sendmsg(list(views))

    def set_offload(self, flags: int) -> None:
        self.offload_flags.append(flags)

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


class MemoryBackend:
    """A virtio-net backend with no fd traffic: `inbox` feeds rx, `sent` collects tx."""

    offload_capable = True

    def __init__(self) -> None:
        self.inbox: deque[bytes] = deque()
        self.sent: list[bytes] = []
        self.offload_flags: list[int] = []
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        return self._fd

    def read_frame(self, buf: bytearray | memoryview) -> int | None:
        if not self.inbox:
            return None
        frame = self.inbox.popleft()[: len(buf)]
        buf[: len(frame)] = frame
        return len(frame)

    def write_frame(self, views: Sequence[memoryview]) -> None:
        self.sent.append(b"".join(bytes(v) for v in views))

    def set_offload(self, flags: int) -> None:
        self.offload_flags.append(flags)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
