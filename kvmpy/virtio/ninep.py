"""virtio-9p: a host directory shared with the guest over 9P2000.L (`--share DIR,tag=TAG`).

What it is: the virtio side of `kvmpy.ninep.server.NinePServer`. One request queue; each
chain is one 9P message in its device-readable buffers and room for the reply in its
device-writable ones (Linux's net/9p/trans_virtio.c). The configuration space holds the
mount tag (`struct virtio_9p_config`: tag_len, then the tag, with VIRTIO_9P_MOUNT_TAG
offered), which the guest names in `mount -t 9p -o trans=virtio TAG DIR`.

Bulk data is not copied: a Twrite's payload goes from guest pages to the host file, and
an Rread's data from the file into guest pages, with pwritev/preadv on iovec arrays of
host addresses (`kvmpy.virtio.hostio`), the way virtio-blk moves
sectors. Linux's zero-copy requests put the message header in one buffer and the
caller's pages after it; the device reads both sides as streams, so any split works.

A message the server cannot parse still gets an Rlerror (the server never raises); a
chain whose buffers are not in guest RAM is a broken ring (DEVICE_NEEDS_RESET). A reset
clunks every fid.

State: `state()` is the share's configuration and the 9P session (kvmpy.ninep.session: each
fid as the path it names, opened again by `restore()`), so a restored guest's mount goes
on working; a share whose files changed under those paths is refused.

What it is not: asynchronous (requests are served in order on the I/O thread), or a
virtio-fs/FUSE server.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from kvmpy.errors import ConfigError, GuestMemoryError
from kvmpy.libc import preadv, pwritev
from kvmpy.ninep import wire
from kvmpy.ninep.server import NinePServer, TransferError
from kvmpy.ninep.session import restore_session, session_state
from kvmpy.state.values import StateReader
from kvmpy.virtio.device import VIRTIO_ID_9P, VirtioDevice, bit
from kvmpy.virtio.hostio import IovecOp, Iovecs, iovec_transfer
from kvmpy.virtio.iov import iov_read, iov_write, span_slice
from kvmpy.virtio.queue import DescriptorChain, VirtqueueError

VIRTIO_9P_MOUNT_TAG = 0  # feature bit: the tag is in the configuration space
REQUESTQ = 0
QUEUE_SIZE = 128  # Linux's 9p transport uses at most 128 descriptors per request
MAX_TAG_LEN = 31  # QEMU's limit; Linux takes any length
TAG_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def check_tag(tag: str) -> bytes:
    """A mount tag as `mount -t 9p TAG` and a kernel command line can carry it."""
    raw = tag.encode()
    if not 0 < len(raw) <= MAX_TAG_LEN or not set(raw) <= TAG_CHARS:
        raise ConfigError(f"9p tag {tag!r}: 1 to {MAX_TAG_LEN} characters of A-Z a-z 0-9 _ - .")
    return raw


class ChainTransfer:
    """A `kvmpy.ninep.server.Transfer` over one chain's buffers, by guest address."""

    __slots__ = ("mem", "iovecs", "readable", "writable", "request_len", "reply_room")

    def __init__(self, iovecs: Iovecs, r_gpas: Sequence[int], r_lens: Sequence[int],
                 w_gpas: Sequence[int], w_lens: Sequence[int], request_len: int,
                 reply_room: int) -> None:
        self.mem = iovecs.memory
        self.iovecs = iovecs
        self.readable = (r_gpas, r_lens)
        self.writable = (w_gpas, w_lens)
        self.request_len = request_len
        self.reply_room = reply_room

    def read_file(self, fd: int, offset: int, start: int, count: int) -> int:
        return self._move(preadv, fd, offset, span_slice(*self.writable, start, start + count),
                          count)

    def write_file(self, fd: int, offset: int, start: int, count: int) -> int:
        return self._move(pwritev, fd, offset, span_slice(*self.readable, start, start + count),
                          count)

    def _move(self, op: IovecOp, fd: int, offset: int, spans: tuple[list[int], list[int]],
              count: int) -> int:
        try:
            iov = self.iovecs.iovec(*spans)
        except GuestMemoryError as e:
            raise TransferError(str(e)) from None
        return iovec_transfer(op, fd, iov, offset, count)

    def read_request(self, length: int) -> bytes:
        """The request's first `length` bytes (fewer if the chain has fewer)."""
        gpas, lens = self.readable
        if lens and lens[0] >= length:  # Linux's layout: the message in one buffer
            return self.mem.read(gpas[0], length)
        return iov_read(self.mem.views(*span_slice(gpas, lens, 0, length)), 0, length)

    def write_reply(self, data: bytes) -> None:
        gpas, lens = self.writable
        if lens and lens[0] >= len(data):  # the reply (or its header) fits the first buffer
            self.mem.write(gpas[0], data)
        else:
            iov_write(self.mem.views(*span_slice(gpas, lens, 0, len(data))), data)


class NinePDevice(VirtioDevice):
    device_id = VIRTIO_ID_9P
    name = "virtio-9p"

    def __init__(self, path: str, tag: str, *, read_only: bool = False,
                 queue_size: int = QUEUE_SIZE) -> None:
        super().__init__((queue_size,))
        self.tag = check_tag(tag)
        if not os.path.isdir(path):
            raise ConfigError(f"share {path}: not a directory")
        self.path = path
        self.read_only = read_only
        self.name = f"virtio-9p {tag}"
        self.server = NinePServer(path, read_only=read_only)
        self.iovecs: Iovecs | None = None  # for the guest memory the requests come from

    def device_features(self) -> int:
        return bit(VIRTIO_9P_MOUNT_TAG)

    def config_space(self) -> bytes:
        return struct.pack("<H", len(self.tag)) + self.tag

    def reset(self) -> None:
        self.server.reset()

    def close(self) -> None:
        self.server.close()

    def state(self) -> dict[str, object]:
        """The share, and the guest's session on it (its fids as paths)."""
        return {"path": self.path, "tag": self.tag.decode(), "read_only": self.read_only,
                "session": session_state(self.server)}

    def restore(self, reader: StateReader) -> None:
        """The same share under the same tag, and every fid open again on the same file,
        or a one-line error and nothing changed."""
        path, tag, read_only = reader.str("path", 4096), reader.str("tag"), reader.bool(
            "read_only")
        session = reader.sub("session")
        reader.done()
        if (path, tag, read_only) != (self.path, self.tag.decode(), self.read_only):
            raise reader.fail("path", f"the snapshot shares {path} as {tag}"
                              f"{' read-only' if read_only else ''}, this run "
                              f"{self.path} as {self.tag.decode()}"
                              f"{' read-only' if self.read_only else ''}")
        restore_session(self.server, session)

    def process_queue(self, index: int) -> None:
        if index == REQUESTQ:
            self.drain(REQUESTQ, self._request)

    def _request(self, chain: DescriptorChain) -> int:
        """Serve one message; returns the reply's length."""
        r_gpas, r_lens, w_gpas, w_lens = chain.spans()
        if self.iovecs is None or self.iovecs.memory is not chain.mem:
            self.iovecs = Iovecs(chain.mem)
        io = ChainTransfer(self.iovecs, r_gpas, r_lens, w_gpas, w_lens, chain.readable_bytes,
                           chain.writable_bytes)
        # what the first buffer holds, up to a header's worth when it is split oddly
        first = min(r_lens[0] if r_lens else 0, self.server.max_msize)
        msg = io.read_request(max(first, min(chain.readable_bytes, wire.HEADER_SIZE)))
        if len(msg) >= wire.HEADER_SIZE:
            size, mtype, _ = wire.HEADER.unpack_from(msg)
            # Twrite: the 23-byte header is enough, the payload stays in guest pages
            want = wire.TWRITE_HEADER if mtype == wire.TWRITE else size
            want = min(want, chain.readable_bytes, self.server.max_msize)
            if want > len(msg):
                msg = io.read_request(want)
        try:
            head, placed = self.server.handle(msg, io)
        except TransferError as e:
            raise VirtqueueError(f"9p data buffers: {e}") from None
        if head:
            io.write_reply(head)
        else:
            self.warn("no-room", "request with no room for a reply; completed empty")
        return len(head) + placed
