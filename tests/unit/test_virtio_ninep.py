"""virtio-9p through the MMIO transport: messages in chains laid out as Linux lays them.

Linux's net/9p/trans_virtio.c sends a small message as one readable buffer with one
writable buffer for the reply, and a large Tread/Twrite "zero-copy": the header in its
own buffer and the data in the caller's pages. The device must read both as streams.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from kvmpy.bus import NullIrq
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory
from kvmpy.ninep import wire
from kvmpy.ninep.client import pack, tmessage, unpack
from kvmpy.virtio.device import VIRTIO_STATUS_DEVICE_NEEDS_RESET
from kvmpy.virtio.driver import GuestDriver
from kvmpy.virtio.mmio import VirtioMmioTransport
from kvmpy.virtio.ninep import VIRTIO_9P_MOUNT_TAG, NinePDevice, check_tag
from kvmpy.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

ROOT = 1


@pytest.fixture
def share(tmp_path: Path) -> Path:
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "data.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    return tmp_path / "share"


def attach(path: Path, **kw: object) -> tuple[NinePDevice, GuestDriver, VirtioMmioTransport]:
    dev = NinePDevice(str(path), "hostshare", **kw)  # type: ignore[arg-type]
    mem = GuestMemory.from_buffer(bytearray(8 << 20))
    t = VirtioMmioTransport(dev, mem, NullIrq())
    d = GuestDriver(t, mem)
    assert d.init()
    return dev, d, t


def rpc(d: GuestDriver, msg: bytes, room: int = 8192, **kw: object) -> bytes:
    head = d.add_chain(0, [msg], [room], **kw)  # type: ignore[arg-type]
    ((got_head, length, (reply,)),) = d.used(0)
    assert got_head == head
    assert struct.unpack_from("<I", reply)[0] == length  # used length == size field
    return reply[:length]


def mount(d: GuestDriver) -> None:
    assert rpc(d, tmessage(wire.TVERSION, wire.NOTAG, pack("ds", 512000, b"9P2000.L")))[4] == \
        wire.TVERSION + 1
    assert rpc(d, tmessage(wire.TATTACH, 1, pack("ddssd", ROOT, wire.NOFID, b"", b"", 0)))[4] \
        == wire.TATTACH + 1


def test_config_space_holds_the_mount_tag(share: Path) -> None:
    dev, d, _ = attach(share)
    assert d.device_features() >> VIRTIO_9P_MOUNT_TAG & 1
    (n,) = struct.unpack("<H", d.config(0, 2))
    # Linux reads the tag a byte at a time (virtio_cread_bytes)
    assert n == len("hostshare") and b"".join(d.config(2 + i, 1) for i in range(n)) == \
        b"hostshare"


def test_tags_and_paths_are_checked(share: Path) -> None:
    for bad in ("", "a" * 32, "has space", "comma,tag", "ü"):
        with pytest.raises(ConfigError):
            check_tag(bad)
    with pytest.raises(ConfigError):
        NinePDevice(str(share / "data.bin"), "t")


def test_messages_in_one_buffer_each_way(share: Path) -> None:
    _, d, _ = attach(share)
    mount(d)
    reply = rpc(d, tmessage(wire.TWALK, 2, pack("ddws", ROOT, 2, 1, b"data.bin")), indirect=True)
    assert reply[4] == wire.TWALK + 1 and struct.unpack_from("<H", reply, 7)[0] == 1
    reply = rpc(d, tmessage(wire.TGETATTR, 3, pack("dq", 2, 0x7FF)))
    (values, _) = unpack("qQddd" + "q" * 15, reply, 7)
    assert values[7] == 1 << 20  # size


def _zero_copy_read(d: GuestDriver, fid: int, offset: int, count: int) -> tuple[int, bytes]:
    """Tread as Linux's zero-copy path sends it: the 11-byte reply header in its own
    buffer, then the data in separate 4 KiB pages."""
    q = d.queues[0]
    msg = tmessage(wire.TREAD, 9, pack("dqd", fid, offset, count))
    req = d.alloc(len(msg))
    d.mem.write(req, msg)
    hdr = d.alloc(11)
    pages = [d.alloc(4096, 4096) for _ in range((count + 4095) // 4096)]
    bufs = [(req, len(msg), 0), (hdr, 11, VIRTQ_DESC_F_WRITE)] + [
        (p, 4096, VIRTQ_DESC_F_WRITE) for p in pages]
    descs = [q.free.pop() for _ in bufs]
    for i, (gpa, n, flags) in enumerate(bufs):
        last = i + 1 == len(bufs)
        d._write_desc(q, descs[i], gpa, n, flags | (0 if last else VIRTQ_DESC_F_NEXT),
                      0 if last else descs[i + 1])
    q.chains[descs[0]] = (descs, [])
    d.publish(0, descs[0])
    ((_, length, _),) = d.used(0)
    size, rtype, tag, n = struct.unpack("<IBHI", d.mem.read(hdr, 11))
    assert (size, rtype, tag) == (length, wire.RREAD, 9) and size == 11 + n
    data = b"".join(d.mem.read(p, 4096) for p in pages)[:n]
    return n, data


def test_zero_copy_reads_land_in_the_pages(share: Path) -> None:
    _, d, _ = attach(share)
    mount(d)
    rpc(d, tmessage(wire.TWALK, 2, pack("ddws", ROOT, 2, 1, b"data.bin")))
    rpc(d, tmessage(wire.TLOPEN, 3, pack("dd", 2, 0)))
    expected = (share / "data.bin").read_bytes()
    for offset, count in ((0, 65536), (4095, 12289), ((1 << 20) - 100, 4096)):
        n, data = _zero_copy_read(d, 2, offset, count)
        assert data == expected[offset:offset + count] and n == len(data)
        d.reset_heap()


def test_zero_copy_writes_come_from_the_pages(share: Path) -> None:
    _, d, _ = attach(share)
    mount(d)
    rpc(d, tmessage(wire.TLCREATE, 2, pack("dsddd", ROOT, b"out.bin", 2, 0o644, 0)))
    payload = os.urandom(3 * 4096 + 17)
    header = tmessage(wire.TWRITE, 4, pack("dqd", ROOT, 100, len(payload)))
    header = struct.pack("<I", len(header) + len(payload)) + header[4:]
    pages = [payload[i:i + 4096] for i in range(0, len(payload), 4096)]
    head = d.add_chain(0, [header, *pages], [4096])
    ((got, length, (reply,)),) = d.used(0)
    assert got == head and struct.unpack_from("<IBHI", reply) == (11, wire.TWRITE + 1, 4,
                                                                   len(payload))
    assert (share / "out.bin").read_bytes() == bytes(100) + payload


def test_read_only_share_and_reset(share: Path) -> None:
    dev, d, t = attach(share, read_only=True)
    mount(d)
    reply = rpc(d, tmessage(wire.TLCREATE, 2, pack("dsddd", ROOT, b"x", 2, 0o644, 0)))
    assert reply == wire.lerror(2, 30)  # EROFS
    assert dev.server.fids
    d.init()  # a driver reset clunks everything
    assert not dev.server.fids
    state = dev.state()
    assert state.pop("session")["fids"] == []  # (the session: kvmpy.ninep.session)
    assert state == {"path": str(share), "tag": "hostshare", "read_only": True}


def test_garbage_gets_rlerror_and_no_room_gets_an_empty_reply(share: Path) -> None:
    _, d, t = attach(share)
    mount(d)
    assert rpc(d, b"\x01\x02\x03") == wire.lerror(wire.NOTAG, 22)
    assert rpc(d, tmessage(wire.TWALK, 5, b"\xff" * 9)) == wire.lerror(5, 22)
    d.add_chain(0, [tmessage(wire.TCLUNK, 6, pack("d", ROOT))], [4])
    ((_, length, _),) = d.used(0)
    assert length == 0 and not t.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET


def test_buffers_outside_guest_ram_are_a_broken_ring(share: Path) -> None:
    _, d, t = attach(share)
    mount(d)
    rpc(d, tmessage(wire.TWALK, 2, pack("ddws", ROOT, 2, 1, b"data.bin")))
    rpc(d, tmessage(wire.TLOPEN, 3, pack("dd", 2, 0)))
    q = d.queues[0]
    msg = tmessage(wire.TREAD, 9, pack("dqd", 2, 0, 8192))
    req = d.alloc(len(msg))
    d.mem.write(req, msg)
    hdr = d.alloc(11)
    descs = [q.free.pop() for _ in range(3)]
    d._write_desc(q, descs[0], req, len(msg), VIRTQ_DESC_F_NEXT, descs[1])
    d._write_desc(q, descs[1], hdr, 11, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, descs[2])
    d._write_desc(q, descs[2], 1 << 40, 8192, VIRTQ_DESC_F_WRITE, 0)  # far outside RAM
    d.publish(0, descs[0])
    assert t.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET


@pytest.mark.parametrize("cuts", [(1,), (4, 5, 9), (7,), (20,)])
def test_a_message_and_its_reply_split_anywhere(share: Path, cuts: tuple[int, ...]) -> None:
    """The device reads a chain as a stream (§2.7.4): a message and its reply room cut
    into any buffers give the same answer as one buffer each way."""
    _, d, _ = attach(share)
    mount(d)
    msg = tmessage(wire.TWALK, 2, pack("ddws", ROOT, 2, 1, b"data.bin"))
    whole = rpc(d, msg)
    rpc(d, tmessage(wire.TCLUNK, 3, pack("d", 2)))
    bounds = [0, *cuts, len(msg)]
    pieces = [msg[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    d.add_chain(0, pieces, [3, 5, 8192])
    ((_, length, replies),) = d.used(0)
    assert b"".join(replies)[:length] == whole
