"""A fuzz input, decoded: the operations a hostile guest performs, in order.

What it is: `decode(data, windows)` turns any bytes into a list of `Op`s, the same
bytes always into the same list. There are three primitive kinds, the whole
vocabulary of the op interpreter (guests/tests/fuzz_interp.S) and of the KVM-free
executor alike:

    port I/O  read or write, 1/2/4 bytes, at an address inside a port window
    MMIO      read or write, 1/2/4/8 bytes, at an address inside an MMIO window
    RAM       fuzzer-chosen bytes written into guest RAM (inside the arena,
              layout.FUZZ_ARENA, which the interpreter's own code and tables are not in)

A read or write may repeat (`Op.times`), a write's value counting up by one: a guest
loop hammering one register in a single op.

The decoder is generic over windows (QEMU generic-fuzz's idea: addresses and sizes
drawn inside each device's window, values biased toward the registers and values a
driver uses) and knows one protocol more, virtio-mmio, as a driver does: for a
virtio window some ops are macros that expand into primitives — the driver's init
sequence (which puts each queue's rings in the arena and remembers where), a
well-formed request for that device, a hostile descriptor chain, an indirect table
of up to 1,024 descriptors naming one buffer, a status write — so RAM writes land on
the descriptor tables, rings and buffers a device will read (generic-fuzz's DMA
bias), and deep device states are a few bytes away rather than a lucky guess.

What it is not: a mutator (libFuzzer mutates the bytes; this gives them meaning) or
a model of what the device answers: a read's value is not seen by later ops, so the
list is fixed before anything runs and both executors run exactly the same accesses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from kvmpy import layout
from kvmpy.virtio import mmio
from kvmpy.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_STATUS_ACKNOWLEDGE,
    VIRTIO_STATUS_DRIVER,
    VIRTIO_STATUS_DRIVER_OK,
    VIRTIO_STATUS_FAILED,
    VIRTIO_STATUS_FEATURES_OK,
)
from kvmpy.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from kvmpy.virtio.vsock import HDR as VSOCK_HDR

PIO_WRITE, PIO_READ, MMIO_WRITE, MMIO_READ, RAM_WRITE = 1, 2, 3, 4, 5
END = 0
# kind, size, code, count, address, value (fuzz_interp.S: code, the interpreter's
# jump-table index, is kind << 4 | size, plus ONCE when count is 1)
HEADER = struct.Struct("<BBHIQQ")
ONCE = 0x80
_NEXT, _NEXT_AT = struct.Struct("<Q"), 16  # a RAM write's value: see `encode`
OP_SIZE = HEADER.size
MAX_OPS = 32  # decoded operations (a macro counts once) per input
# Repeats of one access in one op: 2^0..2^10 (most bursts short: through KVM each
# access is an exit of ~20 us)
MAX_BURST_LOG = 10


class Op(NamedTuple):
    kind: int
    size: int  # bytes per access (a RAM write: 0)
    times: int  # repeats; for a RAM write the length of `data`
    address: int
    value: int = 0
    data: bytes = b""


_new = tuple.__new__  # `Op(...)` without the Python frame of a NamedTuple's __new__


@dataclass(frozen=True)
class Window:
    """A device window the ops may hit: where it is, and what a driver writes there."""

    space: str  # "pio" or "mmio"
    base: int
    length: int
    label: str
    registers: tuple[int, ...] = ()  # offsets worth hitting more often than the others
    values: tuple[int, ...] = ()  # values worth writing more often than random ones
    virtio: VirtioFacts | None = None  # set for a virtio-mmio window


@dataclass(frozen=True)
class VirtioFacts:
    """What a driver learns from a virtio device before it talks to it."""

    kind: str  # "blk", "net", "console", "rng", "9p", "vsock"
    features: int  # offered
    queue_max: tuple[int, ...]  # QueueNumMax of each queue


# -- the input as a stream of numbers --------------------------------------------------
class Stream:
    """The fuzz bytes as integers; reads past the end give zeros (the bytes are kept
    with zeros after them, so most reads past the end need no test)."""

    def __init__(self, data: bytes) -> None:
        self.end = len(data)
        self.data = bytes(data) + _PADDING
        self.pos = 0

    @property
    def exhausted(self) -> bool:
        return self.pos >= self.end

    def take(self, n: int) -> bytes:
        pos = self.pos
        self.pos = pos + n
        chunk = self.data[pos : pos + n]
        return chunk if len(chunk) == n else chunk + bytes(n - len(chunk))

    def u8(self) -> int:
        pos = self.pos
        self.pos = pos + 1
        try:
            return self.data[pos]
        except IndexError:
            return 0

    def u16(self) -> int:
        pos = self.pos
        self.pos = pos + 2
        return int.from_bytes(self.data[pos : pos + 2], "little")

    def u32(self) -> int:
        pos = self.pos
        self.pos = pos + 4
        return int.from_bytes(self.data[pos : pos + 4], "little")

    def u64(self) -> int:
        pos = self.pos
        self.pos = pos + 8
        return int.from_bytes(self.data[pos : pos + 8], "little")

    def choice(self, options: tuple[int, ...]) -> int:
        return options[self.u8() % len(options)]


_PADDING = bytes(4096)
_ARENA_START, _ARENA_LIMIT = layout.FUZZ_ARENA, layout.FUZZ_ARENA_END


# -- encoding for the interpreter ------------------------------------------------------
def encode(ops: list[Op]) -> bytes:
    """The op list as fuzz_interp.S reads it, ended by an END op. The first RAM write of
    a run of them holds, as its value, the address of the op after the run: the
    copier does the whole run at one doorbell, and the interpreter goes on there."""
    out = bytearray()
    pack = HEADER.pack
    run = -1  # where the run of RAM writes being encoded starts
    for kind, size, times, address, value, data in ops:
        if kind == RAM_WRITE:
            if run < 0:
                run = len(out)
            out += pack(kind, size, kind << 4 | size, times, address, 0)
            out += data
            out += bytes(-len(data) % 8)
            continue
        if run >= 0:  # the interpreter goes on here after the run's doorbell
            _NEXT.pack_into(out, run + _NEXT_AT, layout.FUZZ_OPS + len(out))
            run = -1
        out += pack(kind, size, kind << 4 | size | (ONCE if times == 1 else 0), times,
                    address, value)
    if run >= 0:
        _NEXT.pack_into(out, run + _NEXT_AT, layout.FUZZ_OPS + len(out))
    out += pack(END, 0, 0, 0, 0, 0)
    if len(out) > layout.FUZZ_OPS_MAX:
        raise ValueError(f"op list of {len(out)} bytes does not fit at FUZZ_OPS")
    return bytes(out)


# -- decoding --------------------------------------------------------------------------
_INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
_SIZES = {"pio": (1, 1, 1, 2, 4), "mmio": (4, 4, 4, 1, 2, 8)}


class _Decoder:
    def __init__(self, data: bytes, windows: list[Window]) -> None:
        self.s = Stream(data)
        self.windows = windows
        self.ops: list[Op] = []
        self.drivers = {w.base: _Driver(w, self) for w in windows if w.virtio is not None}
        self.heap = _ARENA_BUFFERS  # bump allocator for buffers and tables, per input

    # primitives
    def write(self, space: str, address: int, size: int, value: int, count: int = 1) -> None:
        kind = PIO_WRITE if space == "pio" else MMIO_WRITE
        self.ops.append(_new(Op, (kind, size, count, address, value % (1 << (8 * size)), b"")))

    def read(self, space: str, address: int, size: int, count: int = 1) -> None:
        self.ops.append(_new(Op, (PIO_READ if space == "pio" else MMIO_READ, size, count,
                                  address, 0, b"")))

    def ram(self, gpa: int, data: bytes) -> None:
        """A RAM write, clipped to the arena (the interpreter's own memory is not a target);
        one that starts where the RAM write just before it ended extends that one (the
        same bytes land: consecutive descriptors are one write, not one each)."""
        end = gpa + len(data)
        if _ARENA_START <= gpa and end <= _ARENA_LIMIT:  # (most are: nothing to clip)
            start, chunk = gpa, bytes(data)
        else:
            start, end = max(gpa, _ARENA_START), min(end, _ARENA_LIMIT)
            chunk = bytes(data[start - gpa : end - gpa])
        if start < end:
            ops = self.ops
            if ops and (last := ops[-1]).kind == RAM_WRITE and \
                    last.address + last.times == start:
                ops[-1] = _new(Op, (RAM_WRITE, 0, last.times + end - start, last.address, 0,
                                    last.data + chunk))
            else:
                ops.append(_new(Op, (RAM_WRITE, 0, end - start, start, 0, chunk)))

    def alloc(self, length: int, align: int = 16) -> int:
        gpa = -(-self.heap // align) * align
        if gpa + length > layout.FUZZ_ARENA_END:
            gpa = _ARENA_BUFFERS  # wrap: an old buffer is overwritten, as a guest may
        self.heap = gpa + length
        return gpa

    # generic ops on any window
    def access(self, window: Window) -> None:
        s = self.s
        offset = (s.choice(window.registers) if window.registers and s.u8() < 200
                  else s.u16() % window.length)
        size = s.choice(_SIZES[window.space])
        address = window.base + min(offset, window.length - 1)
        if s.u8() & 1:
            self.read(window.space, address, size)
        else:
            self.write(window.space, address, size, self.value(window))

    def burst(self, window: Window) -> None:
        """One register written up to 2^MAX_BURST_LOG times, the value counting up: a
        guest loop."""
        s = self.s
        offset = s.choice(window.registers) if window.registers else s.u16() % window.length
        size = 4 if window.space == "mmio" else s.choice((1, 2, 4))
        self.write(window.space, window.base + offset, size, self.value(window),
                   count=1 + s.u16() % (1 << s.u8() % (MAX_BURST_LOG + 1)))

    def value(self, window: Window) -> int:
        s = self.s
        b = s.u8()
        if b < 80 and window.values:
            return s.choice(window.values)
        if b < 160:
            return s.choice(_INTERESTING)
        if b < 220:
            return s.u8()
        return s.u64()

    def prelude(self) -> list[Op]:
        """What runs once before the mark: every virtio device set up by its driver
        (all features, queues of up to 256), so an input starts from a live device
        and spends its operations past the init sequence (Nyx's snapshot after boot)."""
        for driver in self.drivers.values():
            driver.init(default=True)
        return self.ops

    def decode(self) -> list[Op]:
        s = self.s
        for driver in self.drivers.values():  # where the prelude left it
            driver.queues = driver.layout(8)
        if s.u8() < 32:  # some inputs set each device up again, their own way
            for driver in self.drivers.values():
                driver.reinit()
        steps = 0
        while s.pos < s.end and steps < MAX_OPS:  # (`exhausted`, written out)
            steps += 1
            window = self.windows[s.u8() % len(self.windows)]
            virtio = self.drivers.get(window.base)
            pick = s.u8()
            if virtio is not None and pick < 150:
                virtio.macro(pick)
            elif pick < 240:
                self.access(window)
            elif pick < 246:
                self.burst(window)
            else:
                self.ram(_arena_address(s), s.take(s.u8() % 64))
        return self.ops


_ARENA_QUEUES = layout.FUZZ_ARENA  # a 16 KiB block of rings per (device, queue)
_QUEUE_BLOCK = 0x4000
_ARENA_BUFFERS = layout.FUZZ_ARENA + 0x10_0000
_DESC = struct.Struct("<QIHH")


def _arena_address(s: Stream) -> int:
    return layout.FUZZ_ARENA + s.u32() % (layout.FUZZ_ARENA_END - layout.FUZZ_ARENA)


@dataclass
class _Queue:
    index: int
    size: int
    desc: int
    avail: int
    used: int
    avail_idx: int = 0
    next_desc: int = 0


@dataclass
class _Driver:
    """A virtio-mmio driver's view of one device, as the decoder builds the ops."""

    window: Window
    d: _Decoder
    queues: list[_Queue] = field(default_factory=list)

    @property
    def facts(self) -> VirtioFacts:
        assert self.window.virtio is not None
        return self.window.virtio

    def w32(self, offset: int, value: int, count: int = 1) -> None:
        self.d.ops.append(_new(Op, (MMIO_WRITE, 4, count, self.window.base + offset,
                                    value & 0xFFFFFFFF, b"")))

    def init(self, partial: bool = False, default: bool = False) -> None:
        """§3.1.1 over §4.2.3.2: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, the
        queues (rings in the arena), DRIVER_OK (not when `partial`). `default`: every
        feature and queues of up to 256, whatever the input says."""
        s, facts = self.d.s, self.facts
        self.w32(mmio.STATUS, 0)
        self.w32(mmio.STATUS, VIRTIO_STATUS_ACKNOWLEDGE)
        self.w32(mmio.STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER)
        drop = 255 if default else s.u8()
        features = facts.features
        if drop < 128:  # some inputs drop a few features (EVENT_IDX, INDIRECT, MRG_RXBUF..)
            for i, bit in enumerate((29, 28, 15, 1, 0, 7)):
                if drop >> i & 1:
                    features &= ~(1 << bit)
            if drop == 127:  # rarely a legacy driver, which FEATURES_OK must refuse
                features &= ~(1 << VIRTIO_F_VERSION_1)
        for sel in (0, 1):
            self.w32(mmio.DRIVER_FEATURES_SEL, sel)
            self.w32(mmio.DRIVER_FEATURES, features >> (32 * sel))
        ok = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK
        self.w32(mmio.STATUS, ok)
        self.queues = self.layout(8 if default else s.u8() % 9)
        for q in self.queues:
            self.w32(mmio.QUEUE_SEL, q.index)
            self.w32(mmio.QUEUE_NUM, q.size)
            for low, gpa in ((mmio.QUEUE_DESC_LOW, q.desc), (mmio.QUEUE_DRIVER_LOW, q.avail),
                             (mmio.QUEUE_DEVICE_LOW, q.used)):
                self.w32(low, gpa)
                self.w32(low + 4, 0)
            self.w32(mmio.QUEUE_READY, 1)
        if not partial:
            self.w32(mmio.STATUS, ok | VIRTIO_STATUS_DRIVER_OK)

    def layout(self, size_log: int) -> list[_Queue]:
        """Where `init` puts each queue's rings (a 16 KiB block per device and queue in
        the arena), queues of up to 2^size_log: what a decode starts from, as the
        prelude's `init(default=True)` left the device, without its ops."""
        slot = (self.window.base - layout.VIRTIO_MMIO_BASE) // layout.VIRTIO_MMIO_SIZE
        queues = []
        for index, max_size in enumerate(self.facts.queue_max):
            block = _ARENA_QUEUES + (slot * 8 + index % 8) * _QUEUE_BLOCK
            queues.append(_Queue(index, min(1 << size_log, max_size), block, block + 0x1000,
                                 block + 0x2000))
        return queues

    def macro(self, pick: int) -> None:
        _MACROS[pick % len(_MACROS)](self)

    def notify(self) -> None:
        s = self.d.s
        self.w32(mmio.QUEUE_NOTIFY, s.u8() % 4 if s.u8() < 230 else s.u32())

    def ack(self) -> None:
        self.w32(mmio.INTERRUPT_ACK, self.d.s.choice((1, 2, 3, 0xFFFFFFFF)))

    def scribble(self) -> None:
        """A RAM write over this device's rings or buffers."""
        s = self.d.s
        bases = [_ARENA_BUFFERS] + [a for q in self.queues for a in (q.desc, q.avail, q.used)]
        self.d.ram(s.choice(tuple(bases)) + s.u16() % 512, s.take(s.u8() % 64))

    def reinit(self) -> None:
        self.init(partial=self.d.s.u8() < 64)

    def status(self) -> None:
        """A Status write, mostly one a confused or failing driver might make."""
        ok = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK
        f = VIRTIO_STATUS_FAILED
        self.w32(mmio.STATUS, self.d.s.choice((0, 1, 3, ok, ok | VIRTIO_STATUS_DRIVER_OK,
                                               f, ok | f, ok | f | VIRTIO_STATUS_DRIVER_OK,
                                               0x40 | ok | VIRTIO_STATUS_DRIVER_OK,
                                               self.d.s.u8())))

    # -- chains -------------------------------------------------------------------------
    def _queue(self) -> _Queue | None:
        return self.queues[self.d.s.u8() % len(self.queues)] if self.queues else None

    def _publish(self, q: _Queue, head: int, step: int = 1) -> None:
        """`head` in the available ring, its idx moved on by `step`, and a notify."""
        self.d.ram(q.avail + 4 + 2 * (q.avail_idx % q.size), struct.pack("<H", head))
        q.avail_idx = (q.avail_idx + step) & 0xFFFF
        self.d.ram(q.avail + 2, struct.pack("<H", q.avail_idx))
        self.w32(mmio.QUEUE_NOTIFY, q.index)

    def _chain(self, q: _Queue, buffers: list[tuple[bytes, int]], indirect: bool) -> None:
        """Offer one well-formed chain: (bytes to read, 0) or (b"", length to write)."""
        descs = []
        for data, length in buffers:
            gpa = self.d.alloc(max(len(data), length, 1))
            if data:
                self.d.ram(gpa, data)
            descs.append((gpa, len(data) or length, 0 if data else VIRTQ_DESC_F_WRITE))
        s = self.d.s
        if s.u8() < 64:  # a well-formed request with one lying buffer: address or length
            i = s.u8() % len(descs)
            gpa, length, flags = descs[i]
            descs[i] = (s.choice(_WILD_ADDRESSES), length, flags) if s.u8() & 1 \
                else (gpa, _length(s), flags)
        if indirect or len(descs) > q.size:
            table = self.d.alloc(16 * len(descs))
            self.d.ram(table, _table(descs))
            head = q.next_desc % q.size
            self.d.ram(q.desc + 16 * head, _DESC.pack(table, 16 * len(descs),
                                                      VIRTQ_DESC_F_INDIRECT, 0))
            q.next_desc += 1
        else:
            head = q.next_desc % q.size
            indices = [(head + i) % q.size for i in range(len(descs))]
            raw = b"".join(_DESC.pack(gpa, n, flags | (VIRTQ_DESC_F_NEXT if i + 1 < len(descs)
                                                       else 0), indices[(i + 1) % len(indices)])
                           for i, (gpa, n, flags) in enumerate(descs))
            for i, index in enumerate(indices):
                self.d.ram(q.desc + 16 * index, raw[16 * i : 16 * i + 16])
            q.next_desc += len(descs)
        self._publish(q, head)

    def valid_request(self) -> None:
        if (q := self._queue()) is None:
            return
        s = self.d.s
        kind = self.facts.kind
        buffers: list[tuple[bytes, int]]
        if kind in ("blk",):
            rtype = s.choice((0, 0, 1, 1, 4, 8, 11, 13, 2, 99))
            n = s.u8() % 5
            buffers = [(struct.pack("<IIQ", rtype, 0, s.u8() % 160), 0)]
            if rtype == 1:
                buffers.append((s.take(512 * n) or b"\0", 0))
            elif rtype in (11, 13):
                buffers.append((struct.pack("<QII", s.u8(), s.u8() % 16, s.u8() % 3), 0))
            if rtype in (0, 8) and (n or rtype == 8):  # Linux's layout: data, then status
                buffers.append((b"", 512 * n if rtype == 0 else 20))
            buffers.append((b"", 1))
        elif kind == "net":
            buffers = ([(b"", 12 + s.u16() % 3000)] if q.index % 2 == 0
                       else [(bytes(12), 0), (s.take(s.u8() + 1), 0)])
        elif kind == "console":
            buffers = ([(b"", 1 + s.u8())] if q.index % 2 == 0
                       else [(s.take(1 + s.u8() % 64), 0)])
        elif kind == "9p":
            buffers = [(_ninep_message(s), 0), (b"", s.choice((8192, 8192, 11, 4, 64)))]
        elif kind == "vsock" and q.index == 1:
            header = VSOCK_HDR.pack(3 if s.u8() < 230 else s.u8(), 2, s.u8(), s.u8() % 4,
                                    s.u8(), 1 if s.u8() < 230 else 2, s.u8() % 9, s.u8() % 4,
                                    s.u32(), s.u32())
            buffers = [(header, 0), (s.take(s.u8()), 0)]
        else:
            buffers = [(b"", s.choice((4096, 44, 4, 1)) if kind == "vsock" else 1 + s.u8())]
        self._chain(q, buffers, indirect=bool(s.u8() & 1))

    def hostile_chain(self) -> None:
        """Descriptors with chosen addr/len/flags/next (in RAM, near its edge, far outside
        it), sometimes an indirect table, published (sometimes with a wild idx)."""
        if (q := self._queue()) is None:
            return
        s = self.d.s
        head = s.u8() % q.size
        for i in range(1 + s.u8() % 6):
            index = (head + i) % q.size if s.u8() < 200 else s.u8() % q.size
            addr, length, flags = _address(s), _length(s), _flags(s)
            nxt = s.u8()
            nxt = nxt % q.size if nxt < 240 else s.u16()
            self.d.ram(q.desc + 16 * index, _DESC.pack(addr, length, flags, nxt))
            if flags & VIRTQ_DESC_F_INDIRECT and s.u8() & 1:
                entries = 1 + s.u8() % 4
                self.d.ram(addr, b"".join(_DESC.pack(_address(s), _length(s), _flags(s),
                                                     s.u8() % entries) for _ in range(entries)))
        self._publish(q, head, 1 if s.u8() < 230 else s.u16())

    def repeat_chain(self) -> None:
        """An indirect table of up to 1,024 descriptors that all name one buffer of up to
        128 KiB: a chain that claims far more bytes than guest RAM holds."""
        if (q := self._queue()) is None:
            return
        s = self.d.s
        entries = s.u16() % 1024 + 1
        length = s.u32() % 0x20000 + 1
        flags = VIRTQ_DESC_F_WRITE if s.u8() & 1 else 0
        buffer = self.d.alloc(length)
        table = self.d.alloc(16 * entries)
        self.d.ram(table, _repeated(buffer, length, flags, entries))
        head = s.u8() % q.size
        self.d.ram(q.desc + 16 * head, _DESC.pack(table, 16 * entries, VIRTQ_DESC_F_INDIRECT, 0))
        self._publish(q, head)


# the virtio macros, by weight
_MACROS = (_Driver.reinit, *[_Driver.status] * 2, *[_Driver.valid_request] * 4,
           *[_Driver.hostile_chain] * 4, _Driver.repeat_chain, *[_Driver.notify] * 3,
           _Driver.ack, *[_Driver.scribble] * 2)


def _table(descs: list[tuple[int, int, int]]) -> bytes:
    """An indirect table (or a chain from index 0): descriptor i's next is i + 1."""
    fields: list[int] = []
    for i, (gpa, n, flags) in enumerate(descs):
        fields += (gpa, n, flags | (VIRTQ_DESC_F_NEXT if i + 1 < len(descs) else 0), i + 1)
    return struct.pack("<" + "QIHH" * len(descs), *fields)


def _repeated(gpa: int, length: int, flags: int, entries: int) -> bytes:
    """`_table` of `entries` copies of one descriptor, built at C speed (a table of 1,024
    packed one by one is most of a decode): each byte column of the records is one
    strided slice assignment."""
    record = _DESC.pack(gpa, length, flags | VIRTQ_DESC_F_NEXT, 0)
    table = bytearray(16 * entries)
    for column in range(14):
        table[column::16] = record[column : column + 1] * entries
    table[14::16] = _NEXT_LOW[:entries]
    table[15::16] = _NEXT_HIGH[:entries]
    _DESC.pack_into(table, 16 * (entries - 1), gpa, length, flags, entries)
    return bytes(table)


_NEXT_LOW = bytes((i + 1) & 0xFF for i in range(1024))  # descriptor i's next: i + 1
_NEXT_HIGH = bytes((i + 1) >> 8 & 0xFF for i in range(1024))


_WILD_ADDRESSES = (layout.FUZZ_RAM - 1, layout.FUZZ_RAM - 8, layout.FUZZ_RAM - 16,
                   layout.FUZZ_RAM - 512, layout.FUZZ_RAM - 4096, layout.FUZZ_RAM,
                   layout.FUZZ_ARENA_END - 1, 2**64 - 1, 2**63, 2**32, 0xFFFFFFF0,
                   layout.VIRTIO_MMIO_BASE, 0, layout.FUZZ_OPS)
_WILD_LENGTHS = (0, 1, 15, 16, 17, 512, 513, 2**31, 2**32 - 1, 0x10_0000)


def _address(s: Stream) -> int:
    b = s.u8()
    if b < 200:
        return _arena_address(s)
    return s.choice(_WILD_ADDRESSES) if b < 250 else s.u64()


def _length(s: Stream) -> int:
    b = s.u8()
    if b < 128:
        return s.u8()
    if b < 200:
        return s.u16() % 4096
    if b < 230:
        return s.u16()
    return s.choice(_WILD_LENGTHS)


def _flags(s: Stream) -> int:
    b = s.u8()
    return b & 7 if b < 240 else s.u16()


NINEP_REQUESTS = (  # well-formed 9P2000.L: version, attach, walk, open, read, getattr, clunk
    struct.pack("<IBHIH8s", 21, 100, 0xFFFF, 8192, 8, b"9P2000.L"),
    struct.pack("<IBHIIHHI", 23, 104, 1, 1, 0xFFFFFFFF, 0, 0, 0),
    struct.pack("<IBHIIHH4s", 23, 110, 2, 1, 2, 1, 4, b"file"),
    struct.pack("<IBHII", 15, 12, 3, 2, 0),
    struct.pack("<IBHIQI", 23, 116, 4, 2, 0, 100),
    struct.pack("<IBHIQ", 19, 24, 5, 1, 0x7FF),
    struct.pack("<IBHI", 11, 120, 6, 2),
)


def _ninep_message(s: Stream) -> bytes:
    data = bytearray(NINEP_REQUESTS[s.u8() % len(NINEP_REQUESTS)])
    if s.u8() >= 160:  # a byte changed: a lying size, a wild fid, a long string...
        data[s.u8() % len(data)] = s.u8()
    return bytes(data)


def decode(data: bytes, windows: list[Window]) -> list[Op]:
    """The operations `data` stands for, against these windows (deterministic), run
    after `prelude(windows)`."""
    if not windows:
        raise ValueError("a fuzz target needs at least one device window")
    return _Decoder(data, windows).decode()


def prelude(windows: list[Window]) -> list[Op]:
    """The operations that run once, before the machine is marked (`_Decoder.prelude`)."""
    return _Decoder(b"", windows).prelude()
