"""virtio-blk (virtio 1.2 §5.2) over a raw image file.

What it is: one request queue served synchronously. Reads and writes move
data with preadv/pwritev straight between the image file and the request's
guest buffers, given to the kernel as an iovec array of host addresses
(kvmpy.virtio.hostio): no intermediate copy, no memoryview per page. FLUSH is
`fsync`; GET_ID returns a 20-byte serial; DISCARD punches a hole and
WRITE_ZEROES zeroes a range (fallocate PUNCH_HOLE / ZERO_RANGE, or plain
zero writes where the file system has no ZERO_RANGE). DISCARD is offered only
if a probe at open shows the file system can punch holes; WRITE_ZEROES is
offered for every writable disk. A read-only disk
offers VIRTIO_BLK_F_RO and fails every write-type request with
VIRTIO_BLK_S_IOERR.

A request that is well formed but asks for the impossible (sectors past the
end, a length that is not a multiple of 512, a write to a read-only disk)
completes with IOERR; an unknown type with UNSUPP. A request the device cannot
even answer (no 16-byte header, no status byte) is a broken ring: the device
asks for a reset.

What it is not: asynchronous (no io_uring/AIO; requests complete in order on
the calling thread), multiqueue, zoned, or a qcow2 reader.

Learned from Firecracker's devices/virtio/block and QEMU's hw/block/virtio-blk.c
(config values Linux is known to be happy with).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from kvmpy.errors import ConfigError
from kvmpy.libc import fallocate, preadv, pwritev
from kvmpy.memory import GuestMemory
from kvmpy.ratelimit import NO_LIMITS, Limits, RateLimiter
from kvmpy.state.values import StateReader
from kvmpy.virtio.device import VIRTIO_ID_BLOCK, VirtioDevice, bit
from kvmpy.virtio.hostio import IovecOp, Iovecs, iovec_transfer
from kvmpy.virtio.iov import iov_read, iov_write, span_slice
from kvmpy.virtio.queue import DescriptorChain, VirtqueueError

# A scatter list still as guest addresses and lengths (columns); see DescriptorChain.spans
Span = tuple[Sequence[int], Sequence[int]]

# §5.2.3 feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# §5.2.6 request types and status values
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR_SIZE = 512  # the protocol's unit, whatever blk_size says (§5.2.5)
VIRTIO_BLK_ID_BYTES = 20
REQUESTQ = 0

# struct virtio_blk_req header: type, reserved, sector
_REQ_HEADER = struct.Struct("<IIQ")
# struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags
_SEGMENT = struct.Struct("<QII")
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

# Limits offered in the configuration space (the same values QEMU offers).
MAX_DISCARD_SECTORS = (1 << 30) // SECTOR_SIZE - 1
MAX_DISCARD_SEG = 1
MAX_WRITE_ZEROES_SECTORS = (1 << 30) // SECTOR_SIZE - 1
MAX_WRITE_ZEROES_SEG = 1

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ZEROES = bytes(1 << 20)


def can_punch_holes(fd: int, size: int) -> bool:
    """Can this file system punch holes? Tried on a page past EOF, where it changes nothing.

    (ZERO_RANGE is not probed the same way: past EOF it would preallocate
    blocks. WRITE_ZEROES tries it on first use and falls back to writing zeros.)
    """
    start = (size + 4095) // 4096 * 4096
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, 4096)
    except OSError:
        return False
    return True


class BlockIoError(Exception):
    """A request that completes with a status other than OK."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


# A request's chain, header and status included, may not be longer than the queue
# (§2.7.5.3.1), so the queue size bounds seg_max. 1024 lets Linux send a 1 MiB
# transfer of scattered 4 KiB pages as one request rather than two; the rings cost
# the guest 24 KiB.
QUEUE_SIZE = 1024


class Block(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    name = "virtio-blk"

    def __init__(self, path: str, *, read_only: bool = False, serial: str | None = None,
                 queue_size: int = QUEUE_SIZE, limits: Limits = NO_LIMITS) -> None:
        super().__init__((queue_size,))
        if limits:  # (bytes moved, requests: `drain` asks it before each request)
            self.limiters[REQUESTQ] = RateLimiter(limits)
        self.path = path
        self.read_only = read_only
        self.name = f"virtio-blk {os.path.basename(path)}"
        self.fd = self._open(path, read_only)
        try:
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
            self.capacity = self.size // SECTOR_SIZE  # in 512-byte sectors
            if self.size:
                os.pread(self.fd, min(self.size, SECTOR_SIZE), 0)
        except OSError as e:
            os.close(self.fd)
            raise ConfigError(f"disk {path}: cannot read it: {e.strerror}") from None
        if self.size % SECTOR_SIZE:
            self.warn("size", "size %d is not a multiple of 512; the tail is not visible",
                      self.size)
        self.can_punch = not read_only and can_punch_holes(self.fd, self.size)
        self.can_zero_range = not read_only  # until the file system says otherwise
        ident = serial if serial is not None else os.path.basename(path)
        self.serial = ident.encode("ascii", "replace")[:VIRTIO_BLK_ID_BYTES]
        self.queue_size = queue_size
        self.iovecs: Iovecs | None = None  # for the guest memory the requests come from

    @staticmethod
    def _open(path: str, read_only: bool) -> int:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as e:
            hint = " (add ,ro for a read-only disk)" if e.errno in (errno.EACCES, errno.EROFS) \
                and not read_only else ""
            raise ConfigError(f"disk {path}: {e.strerror}{hint}") from None
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(fd)
            raise ConfigError(f"disk {path}: not a regular file or block device")
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- state --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The disk as the driver knows it. Requests are served whole under the device
        lock, so a saved block device has none in flight; the image's content is saved
        apart (kvmpy.state.disks)."""
        return {"capacity": self.capacity, "read_only": self.read_only}

    def restore(self, reader: StateReader) -> None:
        capacity = reader.int("capacity")
        read_only = reader.bool("read_only")
        reader.done()
        if capacity != self.capacity:
            raise reader.fail("capacity", f"{capacity} sectors, but this disk has "
                              f"{self.capacity}")
        if read_only != self.read_only:
            raise reader.fail("read_only", f"the driver knows this disk as "
                              f"{'read-only' if read_only else 'writable'}")

    # -- what the driver sees ---------------------------------------------------------------
    def device_features(self) -> int:
        features = bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE) | bit(VIRTIO_BLK_F_FLUSH)
        if self.read_only:
            features |= bit(VIRTIO_BLK_F_RO)
        else:
            features |= bit(VIRTIO_BLK_F_WRITE_ZEROES)
            if self.can_punch:
                features |= bit(VIRTIO_BLK_F_DISCARD)
        return features

    def config_space(self) -> bytes:
        """§5.2.4 struct virtio_blk_config, up to write_zeroes_may_unmap and its padding."""
        return struct.pack(
            "<QII4sI8sBBHIIIIIB3x",
            self.capacity,
            0,  # size_max (VIRTIO_BLK_F_SIZE_MAX not offered)
            self.queue_size - 2,  # seg_max: a request also needs a header and a status
            b"",  # geometry
            SECTOR_SIZE,  # blk_size
            b"",  # topology
            0,  # writeback
            0,  # unused0
            0,  # num_queues (no VIRTIO_BLK_F_MQ)
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            4096 // SECTOR_SIZE,  # discard_sector_alignment: the host's page-size holes
            MAX_WRITE_ZEROES_SECTORS,
            MAX_WRITE_ZEROES_SEG,
            int(self.can_punch),  # write_zeroes_may_unmap
        )

    # -- requests -----------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        if index == REQUESTQ:
            self.drain(REQUESTQ, self._request)

    def rate_cost(self, chain: DescriptorChain) -> int:
        """The data a request moves: not its header and status byte."""
        return max(0, chain.readable_bytes - _REQ_HEADER.size + chain.writable_bytes - 1)

    def _request(self, chain: DescriptorChain) -> int:
        """Serve one request; returns the used length (bytes written to the driver)."""
        r_gpas, r_lens, w_gpas, w_lens = chain.spans()
        if chain.readable_bytes < _REQ_HEADER.size:
            raise VirtqueueError("block request without its 16-byte header")
        if chain.writable_bytes < 1:
            raise VirtqueueError("block request without a status byte")
        out_len = chain.readable_bytes - _REQ_HEADER.size  # driver -> device payload
        in_len = chain.writable_bytes - 1  # device -> driver payload
        mem = chain.mem
        data_out: Span
        data_in: Span
        if r_lens[0] == _REQ_HEADER.size and w_lens[-1] == 1:
            # Linux's layout: the header and the status byte in descriptors of their own
            header: bytes | memoryview = mem.read_view(r_gpas[0], _REQ_HEADER.size)
            data_out, data_in = (r_gpas[1:], r_lens[1:]), (w_gpas[:-1], w_lens[:-1])
            status_at: Span = (w_gpas[-1:], w_lens[-1:])
        else:  # any other split of the same bytes is as valid (§2.7.4)
            head = span_slice(r_gpas, r_lens, 0, _REQ_HEADER.size)
            header = iov_read(mem.views(*head), 0, _REQ_HEADER.size)
            data_out = span_slice(r_gpas, r_lens, _REQ_HEADER.size)
            data_in = span_slice(w_gpas, w_lens, 0, in_len)
            status_at = span_slice(w_gpas, w_lens, in_len)
        status_byte = mem.views(*status_at)  # checked now: no I/O for a request it fails
        rtype, _, sector = _REQ_HEADER.unpack(header)
        try:
            written = self._serve(mem, rtype, sector, data_out, out_len, data_in, in_len)
            status = VIRTIO_BLK_S_OK
        except BlockIoError as e:
            self.warn("req-failed", "request type %d failed: %s", rtype, e)
            written, status = 0, e.status
        iov_write(status_byte, bytes([status]))
        return written + 1

    def _serve(self, mem: GuestMemory, rtype: int, sector: int, data_out: Span, out_len: int,
               data_in: Span, in_len: int) -> int:
        """Do the request; returns bytes written into data_in; raises BlockIoError."""
        if rtype == VIRTIO_BLK_T_IN:
            offset = self._check_range(sector, in_len)
            self._transfer(preadv, self._iovec(mem, data_in), offset, in_len)
            return in_len
        if rtype == VIRTIO_BLK_T_OUT:
            self._check_writable()
            offset = self._check_range(sector, out_len)
            self._transfer(pwritev, self._iovec(mem, data_out), offset, out_len)
            return 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            self._os(os.fsync, self.fd)
            return 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            return iov_write(mem.views(*data_in), self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0"))
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            self._discard_or_zero(rtype, mem.views(*data_out), out_len)
            return 0
        raise BlockIoError(VIRTIO_BLK_S_UNSUPP, f"unsupported request type {rtype}")

    def _iovec(self, mem: GuestMemory, span: Span) -> array[int]:
        """The buffers of `span` as an iovec array of host addresses (kvmpy.virtio.hostio)."""
        if self.iovecs is None or self.iovecs.memory is not mem:
            self.iovecs = Iovecs(mem)
        return self.iovecs.iovec(*span)

    def _check_writable(self) -> None:
        if self.read_only:
            raise BlockIoError(VIRTIO_BLK_S_IOERR, "write to a read-only disk")

    def _check_range(self, sector: int, length: int) -> int:
        if length % SECTOR_SIZE:
            raise BlockIoError(VIRTIO_BLK_S_IOERR, f"length {length} is not whole sectors")
        if sector + length // SECTOR_SIZE > self.capacity:
            raise BlockIoError(VIRTIO_BLK_S_IOERR,
                               f"sectors {sector}+{length // SECTOR_SIZE} past {self.capacity}")
        return sector * SECTOR_SIZE

    def _transfer(self, op: IovecOp, iov: array[int], offset: int, length: int) -> None:
        """preadv/pwritev between the image and guest buffers, all of it or IOERR."""
        try:
            done = iovec_transfer(op, self.fd, iov, offset, length)
        except OSError as e:
            raise BlockIoError(VIRTIO_BLK_S_IOERR, f"{op.__name__}: {e.strerror}") from None
        if done != length:
            raise BlockIoError(VIRTIO_BLK_S_IOERR,
                               f"{op.__name__}: short transfer {done}/{length}")

    def _os(self, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except OSError as e:
            raise BlockIoError(VIRTIO_BLK_S_IOERR, f"{fn.__name__}: {e.strerror}") from None

    def _discard_or_zero(self, rtype: int, data_out: list[memoryview], length: int) -> None:
        discard = rtype == VIRTIO_BLK_T_DISCARD
        feature = VIRTIO_BLK_F_DISCARD if discard else VIRTIO_BLK_F_WRITE_ZEROES
        if not self.has_feature(feature):
            raise BlockIoError(VIRTIO_BLK_S_UNSUPP, "discard/write-zeroes not negotiated")
        self._check_writable()
        count = length // _SEGMENT.size
        if length == 0 or length % _SEGMENT.size:
            raise BlockIoError(VIRTIO_BLK_S_IOERR, f"segment list of {length} bytes")
        if count > (MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG):
            raise BlockIoError(VIRTIO_BLK_S_IOERR, f"{count} segments")
        limit = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        raw = iov_read(data_out, 0, length)
        for i in range(count):
            sector, num, flags = _SEGMENT.unpack_from(raw, i * _SEGMENT.size)
            # §5.2.6.2: unknown flags, or unmap on a discard, are UNSUPP.
            unmap = bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (discard and unmap):
                raise BlockIoError(VIRTIO_BLK_S_UNSUPP, f"segment flags {flags:#x}")
            if num > limit:
                raise BlockIoError(VIRTIO_BLK_S_IOERR, f"segment of {num} sectors")
            offset = self._check_range(sector, num * SECTOR_SIZE)
            length_bytes = num * SECTOR_SIZE
            if length_bytes == 0:
                continue
            if discard or (unmap and self.can_punch):
                self._os(fallocate, self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                         offset, length_bytes)
            else:
                self._zero_range(offset, length_bytes)

    def _zero_range(self, offset: int, length: int) -> None:
        if self.can_zero_range:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise BlockIoError(VIRTIO_BLK_S_IOERR, f"fallocate: {e.strerror}") from None
                self.can_zero_range = False
        self._write_zeroes(offset, length)

    def _write_zeroes(self, offset: int, length: int) -> None:
        zeroes = memoryview(_ZEROES)
        while length:
            try:
                n = os.pwrite(self.fd, zeroes[: min(length, len(zeroes))], offset)
            except OSError as e:
                raise BlockIoError(VIRTIO_BLK_S_IOERR, f"pwrite: {e.strerror}") from None
            if n <= 0:
                raise BlockIoError(VIRTIO_BLK_S_IOERR, "pwrite made no progress")
            offset += n
            length -= n
