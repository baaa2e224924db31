"""Split virtqueues (virtio 1.2 §2.7): the device's side of the three rings.

What it is: the descriptor table, available ring and used ring of one queue,
read and written through `GuestMemory` only. `Virtqueue.pop()` hands out a
`DescriptorChain`; iterating the chain validates every descriptor as it is
yielded (index inside its table, buffer inside guest RAM, chain no longer than
its table, no loop, indirect tables well formed, device-readable descriptors
before device-writable ones). Buffers come out as memoryviews on guest RAM, so
a device can `preadv` straight into them (zero copy). `add_used()` publishes
completions and `needs_notification()` applies EVENT_IDX / NO_INTERRUPT
suppression (§2.7.7, §2.7.10).

A broken rule raises `VirtqueueError`: the driver broke the ring, and the
transport then marks the device DEVICE_NEEDS_RESET (§2.1.2). No guest number is
ever used to index host memory: every access is a checked (gpa, length).

What it is not: the packed ring (§2.8), VIRTIO_F_IN_ORDER, or a transport; it
does not know about MMIO registers or interrupts.

Memory ordering. Guest vCPUs run concurrently with the device thread. On
x86-64 (TSO) stores become visible in program order and loads are not
reordered with other loads, so writing a used element and then `used.idx`
(§2.7.8: "set len prior to updating the used idx") needs no fence, and nor does
reading `avail.idx` before the ring entries and descriptors it covers. The one
reordering x86 does, a later load passing an earlier store, matters where the
spec asks for a full barrier: after publishing `used.idx` and before reading
`used_event`/`avail.flags`, and after writing `avail_event` and before
re-reading `avail.idx`. Python has no fence instruction, so `full_barrier()`
takes and releases an uncontended lock, which is a locked read-modify-write
(a full fence on x86). Other architectures would need a real fence here.

Learned from rust-vmm virtio-queue (queue.rs, chain.rs) and Linux's
include/uapi/linux/virtio_ring.h.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from kvmpy.errors import GuestMemoryError
from kvmpy.memory import GuestMemory
from kvmpy.state.values import U16, U32, StateReader
from kvmpy.virtio import linear_table
from kvmpy.virtio.ring import (
    CHAIN_BYTES_MAX,
    DESC_SIZE,
    QUEUE_SIZE_MAX,
    USED_ELEM_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Spans,
)

DEFAULT_QUEUE_SIZE = 256

_USED_ELEM = struct.Struct("<II")  # id, len
_U16 = struct.Struct("<H")
_DESC_WORDS = struct.Struct("<QQ")  # addr, then len | flags << 32 | next << 48

_barrier_lock = threading.Lock()
_NO_RING = memoryview(b"")  # a queue's rings before `activate`


def full_barrier() -> None:
    """A store-load fence for the device thread (see the module docstring)."""
    _barrier_lock.acquire()
    _barrier_lock.release()


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True if `event_idx` lies in [old_idx, new_idx) modulo 2^16 (virtio_ring.h)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class VirtqueueError(Exception):
    """The driver broke a split-virtqueue rule; the device must stop trusting the queue.

    Not a `KvmpyError`: it never leaves the virtio package. The transport turns
    it into DEVICE_NEEDS_RESET.
    """


class Descriptor(NamedTuple):
    """One validated descriptor: its buffer is `view`, a window on guest RAM."""

    addr: int
    length: int
    flags: int
    view: memoryview

    @property
    def writable(self) -> bool:
        return bool(self.flags & VIRTQ_DESC_F_WRITE)


class DescriptorChain:
    """The descriptors reachable from one available-ring head.

    Nothing is read until the chain is walked (`buffers()`, `spans()`,
    `descriptors()` or iteration), and a walk validates the whole chain before it
    returns anything: a bad descriptor at the end is found before any I/O is done
    for the request.
    """

    def __init__(
        self,
        mem: GuestMemory,
        desc_table: int,
        queue_size: int,
        head: int,
        indirect_ok: bool,
        table: tuple[memoryview, int] | None = None,
    ) -> None:
        self.mem = mem
        self.desc_table = desc_table
        self.queue_size = queue_size
        self.head = head
        self.indirect_ok = indirect_ok
        # the ring's descriptor table as `GuestMemory.window` gives it (the queue's, kept
        # from its activation), or None to look it up
        self.table = table
        # set by a walk: the bytes the device may read, and may write
        self.readable_bytes = self.writable_bytes = 0

    def _ring_table(self) -> tuple[memoryview, int]:
        if self.table is not None:
            return self.table
        try:
            return self.mem.window(self.desc_table, self.queue_size * DESC_SIZE)
        except GuestMemoryError as e:
            raise VirtqueueError(f"descriptor table not in guest RAM: {e}") from None

    def _walk(self) -> Spans:
        """The chain's buffers, validated, as columns: readable gpas and lengths, then
        writable gpas and lengths.

        The spans themselves are checked against guest RAM when their views are made;
        everything else about the chain is checked here, before anything is returned.
        """
        # The ring's table is read a descriptor at a time, in place (a chain from Linux
        # is one indirect descriptor); an indirect table is copied once and unpacked
        # whole. Words: addr, then len | flags << 32 | next << 48 (little-endian, as the
        # split ring is on x86).
        ring, ring_offset = self._ring_table()
        words: list[int] | None = None  # the indirect table's, once in one
        table_size, index = self.queue_size, self.head
        in_indirect = False
        visited = 0  # descriptors read from the current table
        r_gpas: list[int] = []
        r_lens: list[int] = []
        w_gpas: list[int] = []
        w_lens: list[int] = []
        while True:
            if index >= table_size:
                raise VirtqueueError(f"descriptor index {index} outside a table of {table_size}")
            visited += 1
            if visited > table_size:
                # §2.7.5.3.1 / §2.7.5.2: no chain longer than its table; a loop is one.
                raise VirtqueueError(f"chain longer than its table of {table_size} (a loop?)")
            if words is None:
                addr, word = _DESC_WORDS.unpack_from(ring, ring_offset + DESC_SIZE * index)
            else:
                addr, word = words[2 * index], words[2 * index + 1]
            flags = (word >> 32) & 0xFFFF
            if flags & VIRTQ_DESC_F_INDIRECT:
                length = word & 0xFFFFFFFF
                # §2.7.5.3: zero or more direct descriptors, then one indirect table.
                if in_indirect:
                    raise VirtqueueError("indirect descriptor inside an indirect table")
                if not self.indirect_ok:
                    raise VirtqueueError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError("descriptor has both INDIRECT and NEXT")
                if length == 0 or length % DESC_SIZE:
                    raise VirtqueueError(f"indirect table length {length} not a multiple of 16")
                entries = length // DESC_SIZE
                if entries > QUEUE_SIZE_MAX:
                    raise VirtqueueError(f"indirect table of {entries} entries")
                try:  # one copy: what is checked is what is used
                    table = self.mem.read(addr, length)
                except GuestMemoryError:
                    raise VirtqueueError(f"indirect table [{addr:#x}, +{length:#x}) not in RAM"
                                         ) from None
                # The WRITE flag of the descriptor naming the table is ignored (§2.7.5.3.2).
                if not r_gpas and not w_gpas:
                    # A table laid out as Linux lays them out is checked a column at a
                    # time, by the rules below (kvmpy.virtio.linear_table; tested to agree)
                    spans = linear_table.spans(table)
                    if spans is not None:
                        return spans
                words = memoryview(table).cast("Q").tolist()
                table_size, index = entries, 0
                in_indirect, visited = True, 0
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                w_gpas.append(addr)
                w_lens.append(word & 0xFFFFFFFF)
            elif w_gpas:
                raise VirtqueueError("device-readable descriptor after a device-writable one")
            else:
                r_gpas.append(addr)
                r_lens.append(word & 0xFFFFFFFF)
            if not flags & VIRTQ_DESC_F_NEXT:
                return r_gpas, r_lens, w_gpas, w_lens
            index = word >> 48

    def spans(self) -> Spans:
        """The whole chain, validated, as columns of guest addresses and lengths:
        (readable gpas, their lengths, writable gpas, their lengths).

        For a device that moves bulk data with `GuestMemory.iovec` rather than
        views; the spans are checked against guest RAM when they are used.
        Sets `readable_bytes` and `writable_bytes`, which §2.7.5.2 bounds below 2^32.
        """
        spans = self._walk()
        self.readable_bytes, self.writable_bytes = sum(spans[1]), sum(spans[3])
        if self.readable_bytes + self.writable_bytes >= CHAIN_BYTES_MAX:
            raise VirtqueueError("chain of 4 GiB or more")
        return spans

    def views(self, gpas: Sequence[int], lengths: Sequence[int],
               writable: bool = True) -> list[memoryview]:
        """Windows on the buffers; read-only ones when not `writable` (a device-readable
        buffer: the device cannot write there by mistake, and its pages need not be
        counted as written for a fast reset)."""
        try:
            if not writable:
                return self.mem.read_views(gpas, lengths)
            return self.mem.views(gpas, lengths)
        except GuestMemoryError:
            addr, length = next((g, n) for g, n in zip(gpas, lengths, strict=True)
                                if not self.mem.contains(g, n))
            raise VirtqueueError(f"buffer [{addr:#x}, +{length:#x}) is not in guest RAM") from None

    def require(self, gpas: Sequence[int], lengths: Sequence[int]) -> None:
        """That these buffers are in guest RAM, as `views` would, without windows on
        them: for buffers a device ignores, or uses a part of (a chain may name one
        buffer a thousand times: first one span that holds them all is tried, then each
        distinct buffer once)."""
        mem = self.mem
        if not gpas:
            return
        low = min(gpas)
        if mem.contains(low, max(gpas) + max(lengths) - low):
            return  # (a span in one region of RAM, and every buffer inside it)
        for gpa, length in dict.fromkeys(zip(gpas, lengths, strict=True)):
            if not mem.contains(gpa, length):
                raise VirtqueueError(f"buffer [{gpa:#x}, +{length:#x}) is not in guest RAM")

    def __iter__(self) -> Iterator[Descriptor]:
        return iter(self.descriptors())

    def descriptors(self) -> list[Descriptor]:
        """The whole chain, validated, a `Descriptor` per buffer."""
        r_gpas, r_lens, w_gpas, w_lens = self.spans()
        return [Descriptor(addr, length, flags, view)
                for gpas, lens, flags in ((r_gpas, r_lens, 0), (w_gpas, w_lens, VIRTQ_DESC_F_WRITE))
                for addr, length, view in zip(gpas, lens, self.views(gpas, lens, bool(flags)),
                                              strict=True)]

    def buffers(self) -> tuple[list[memoryview], list[memoryview]]:
        """The whole chain, validated: (device-readable views, device-writable views).

        What every device calls for a request: zero-copy windows on guest RAM that
        `preadv`/`pwritev` and sockets take as they are.
        """
        r_gpas, r_lens, w_gpas, w_lens = self.spans()
        return self.views(r_gpas, r_lens, writable=False), self.views(w_gpas, w_lens)


class Virtqueue:
    """One split virtqueue: driver-set configuration plus the device's cursors.

    The transport writes `size`, `desc_table`, `avail_ring`, `used_ring` and
    `ready` from the driver's register writes; `activate()` binds guest memory
    and the negotiated ring features once the driver sets DRIVER_OK.
    """

    # the driver's configuration and the device's cursors: what `reset` sets
    size: int
    ready: bool
    desc_table: int
    avail_ring: int
    used_ring: int
    next_avail: int
    next_used: int
    signalled_used: int | None  # used.idx at the last interrupt (EVENT_IDX)
    event_idx: bool
    indirect: bool
    mem: GuestMemory | None  # bound by `activate`
    # where the rings are (`GuestMemory.window`: region view, offset), from `activate`
    _desc: tuple[memoryview, int] | None
    _avail: memoryview
    _avail_at: int
    _used: memoryview
    _used_at: int

    def __init__(self, max_size: int = DEFAULT_QUEUE_SIZE) -> None:
        if not 0 < max_size <= QUEUE_SIZE_MAX or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two <= 32768")
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset (§2.4)."""
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.next_avail = 0
        self.next_used = 0
        self.signalled_used = None
        self.event_idx = False
        self.indirect = False
        self.mem = None
        self._desc = None
        self._avail = self._used = _NO_RING
        self._avail_at = self._used_at = 0

    # -- state --------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What the driver configured and where the device's cursors are. The ring
        features (EVENT_IDX, INDIRECT) and memory come back with `activate`."""
        return {"size": self.size, "ready": self.ready, "desc_table": self.desc_table,
                "avail_ring": self.avail_ring, "used_ring": self.used_ring,
                "next_avail": self.next_avail, "next_used": self.next_used,
                "signalled_used": self.signalled_used}

    def restore(self, reader: StateReader, mem: GuestMemory) -> None:
        """Take a `state()` (as read by the transport); a ready queue must pass `check`.
        The queue comes back inactive: the transport activates it as DRIVER_OK would."""
        self.restorer(reader, mem)()

    def restorer(self, reader: StateReader, mem: GuestMemory) -> Callable[[], None]:
        """`restore`, checked now: returns what puts the state back, as often as asked."""
        size = reader.int("size", 0, U32)  # any value the driver wrote, until QueueReady
        ready = reader.bool("ready")
        addresses = [reader.int(name) for name in ("desc_table", "avail_ring", "used_ring")]
        next_avail, next_used = reader.int("next_avail", 0, U16), reader.int("next_used", 0, U16)
        signalled_used = reader.optional_int("signalled_used", 0, U16)
        reader.done()
        restored = Virtqueue(self.max_size)
        restored.size = size
        restored.desc_table, restored.avail_ring, restored.used_ring = addresses
        problem = restored.check(mem) if ready else None
        if problem is not None:
            raise reader.fail("ready", f"a ready queue whose {problem}")

        def put() -> None:
            self.reset()
            self.size, self.ready = size, ready
            self.desc_table, self.avail_ring, self.used_ring = addresses
            self.next_avail, self.next_used, self.signalled_used = (next_avail, next_used,
                                                                    signalled_used)

        return put

    # -- configuration ----------------------------------------------------------
    def check(self, mem: GuestMemory) -> str | None:
        """Why this queue's configuration is unusable, or None (§2.7 size/alignment table)."""
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            return f"queue size {size} is not a power of two <= {self.max_size}"
        parts = (
            ("descriptor table", self.desc_table, 16, DESC_SIZE * size),
            ("available ring", self.avail_ring, 2, 6 + 2 * size),
            ("used ring", self.used_ring, 4, 6 + USED_ELEM_SIZE * size),
        )
        for name, gpa, align, length in parts:
            if gpa % align:
                return f"{name} at {gpa:#x} is not {align}-byte aligned"
            if not mem.contains(gpa, length):
                return f"{name} [{gpa:#x}, +{length:#x}) is not in guest RAM"
        return None

    def activate(self, mem: GuestMemory, *, event_idx: bool, indirect: bool) -> None:
        """Bind guest memory and the ring features; `check` has passed for this queue.

        The rings are found in guest RAM once, here: every later access is an unpack or
        pack at an offset of the region's view (`GuestMemory.window`). The driver cannot
        move them while the queue is ready (§4.2.2.3, refused by the transport).
        """
        self.mem = mem
        self.event_idx = event_idx
        self.indirect = indirect
        size = self.size
        self._desc = mem.window(self.desc_table, DESC_SIZE * size)
        self._avail, self._avail_at = mem.window(self.avail_ring, 6 + 2 * size)
        self._used, self._used_at = mem.window(self.used_ring, 6 + USED_ELEM_SIZE * size)

    def _memory(self) -> GuestMemory:
        if self.mem is None:
            raise VirtqueueError("queue used before the device was activated")
        return self.mem

    # -- available ring ---------------------------------------------------------
    def avail_idx(self) -> int:
        self._memory()
        return _U16.unpack_from(self._avail, self._avail_at + 2)[0]  # type: ignore[no-any-return]

    def has_available(self) -> bool:
        return self.avail_idx() != self.next_avail

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None when the driver has offered nothing new."""
        mem = self._memory()
        avail, at = self._avail, self._avail_at
        pending = (_U16.unpack_from(avail, at + 2)[0] - self.next_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            # §2.7.6: idx only moves forward, by at most the ring size.
            raise VirtqueueError(f"avail idx {pending} entries ahead of a ring of {self.size}")
        (head,) = _U16.unpack_from(avail, at + 4 + 2 * (self.next_avail % self.size))
        if head >= self.size:
            raise VirtqueueError(f"available ring names head {head} in a table of {self.size}")
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return DescriptorChain(mem, self.desc_table, self.size, head, self.indirect, self._desc)

    def undo_pop(self, count: int = 1) -> None:
        """Give back chains that were popped but not used (e.g. net rx ran short)."""
        self.next_avail = (self.next_avail - count) & 0xFFFF

    # -- used ring --------------------------------------------------------------
    def add_used(self, head: int, length: int) -> None:
        """One used element, published (`add_used_batch` of one, as one store each)."""
        self._record_used_write()
        used, at, slot = self._used, self._used_at, self.next_used % self.size
        _USED_ELEM.pack_into(used, at + 4 + USED_ELEM_SIZE * slot, head, length & 0xFFFFFFFF)
        self.next_used = (self.next_used + 1) & 0xFFFF
        _U16.pack_into(used, at + 2, self.next_used)  # after the element (TSO)

    def add_used_batch(self, entries: list[tuple[int, int]]) -> None:
        """Write used elements, then publish them with one `used.idx` store (§2.7.8).

        One store matters for net's mergeable buffers: the driver must never
        see the first buffer of a packet before the rest.
        """
        self._record_used_write()
        used, at, size = self._used, self._used_at, self.size
        for head, length in entries:
            _USED_ELEM.pack_into(used, at + 4 + USED_ELEM_SIZE * (self.next_used % size), head,
                                 length & 0xFFFFFFFF)
            self.next_used = (self.next_used + 1) & 0xFFFF
        # TSO keeps the element stores before this one; see the module docstring.
        _U16.pack_into(used, at + 2, self.next_used)

    def _record_used_write(self) -> None:
        """Writes to the used ring go through its window, which `GuestMemory.written`
        does not see: while it records, take a `view` of the ring, which does."""
        mem = self._memory()
        if mem.written is not None:
            mem.view(self.used_ring, 6 + USED_ELEM_SIZE * self.size)

    # -- notification suppression -------------------------------------------------
    def needs_notification(self) -> bool:
        """Should the device interrupt the driver for what it has used so far?

        §2.7.7: with EVENT_IDX, only when used.idx passes `used_event`;
        without it, unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT.
        """
        self._memory()
        full_barrier()  # used.idx store before the used_event / flags load
        avail, at = self._avail, self._avail_at
        if not self.event_idx:
            (flags,) = _U16.unpack_from(avail, at)
            return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
        new, old = self.next_used, self.signalled_used
        self.signalled_used = new
        if old is None:
            return True
        (used_event,) = _U16.unpack_from(avail, at + 4 + 2 * self.size)
        return vring_need_event(used_event, new, old)

    def enable_notification(self) -> bool:
        """Ask for a notification on the next buffer; True if one arrived meanwhile.

        With EVENT_IDX the device writes `avail_event` (§2.7.10); without it
        the device never suppresses (used.flags stays 0). The re-check after
        the barrier closes the race with a driver that published a buffer
        just before reading `avail_event`.
        """
        if self.event_idx:
            self._record_used_write()
            _U16.pack_into(self._used, self._used_at + 4 + USED_ELEM_SIZE * self.size,
                           self.next_avail)
        full_barrier()
        return self.has_available()


__all__ = ["DEFAULT_QUEUE_SIZE", "Descriptor", "DescriptorChain", "Spans", "Virtqueue",
           "VirtqueueError", "VIRTQ_AVAIL_F_NO_INTERRUPT", "VIRTQ_DESC_F_INDIRECT",
           "VIRTQ_DESC_F_NEXT", "VIRTQ_DESC_F_WRITE", "VIRTQ_USED_F_NO_NOTIFY", "full_barrier",
           "vring_need_event"]
