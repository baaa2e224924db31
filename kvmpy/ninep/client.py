"""A 9P2000.L client for tests, fuzzing and benchmarks: messages built and parsed in Python.

What it is: `pack`/`unpack` over Linux's format letters (b u8, w u16, d u32, q u64,
s string, Q qid), `tmessage` to frame a T-message, and `Client`, which sends messages to
a `NinePServer` through a `BufferTransfer` and returns the parsed reply or raises
`RemoteError(errno)` for an Rlerror. What it is not: used by the VMM, or a 9P client for
a real transport (Linux's is the one the device is written for).
"""

from __future__ import annotations

import errno
import os
import struct

from kvmpy.ninep import wire
from kvmpy.ninep.server import BufferTransfer, NinePServer

_FIXED = {"b": struct.Struct("<B"), "w": struct.Struct("<H"), "d": struct.Struct("<I"),
          "q": struct.Struct("<Q")}

Qid = tuple[int, int, int]


class RemoteError(OSError):
    """The server answered Rlerror."""


def pack(fmt: str, *values: object) -> bytes:
    out = []
    for letter, value in zip(fmt, values, strict=True):
        if letter == "s":
            data = value if isinstance(value, bytes) else str(value).encode()
            out.append(struct.pack("<H", len(data)) + data)
        elif letter == "Q":
            out.append(wire.QID.pack(*value))  # type: ignore[misc]
        else:
            out.append(_FIXED[letter].pack(value))
    return b"".join(out)


def unpack(fmt: str, data: bytes, pos: int = 0) -> tuple[list[object], int]:
    """Values for `fmt` from `data` at `pos`, and where they end; struct.error if short."""
    values: list[object] = []
    for letter in fmt:
        if letter == "s":
            (n,) = struct.unpack_from("<H", data, pos)
            if pos + 2 + n > len(data):
                raise struct.error("string past the end")
            values.append(bytes(data[pos + 2:pos + 2 + n]))
            pos += 2 + n
        elif letter == "Q":
            values.append(list(wire.QID.unpack_from(data, pos)))
            pos += wire.QID.size
        else:
            values.append(_FIXED[letter].unpack_from(data, pos)[0])
            pos += _FIXED[letter].size
    return values, pos


def tmessage(mtype: int, tag: int, body: bytes) -> bytes:
    return wire.HEADER.pack(wire.HEADER_SIZE + len(body), mtype, tag) + body


class Client:
    """Talks to `server` directly; each method returns the reply's fields."""

    def __init__(self, server: NinePServer, msize: int = 65536) -> None:
        self.server = server
        self.msize = msize
        self.tag = 0

    def call(self, mtype: int, fmt: str, *values: object, reply_fmt: str = "",
             reply_room: int | None = None) -> list[object]:
        raw = self.checked(tmessage(mtype, self._next_tag(), pack(fmt, *values)), reply_room)
        rtype = raw[4]
        if rtype != mtype + 1:
            raise AssertionError(f"reply type {rtype} to {mtype}")
        fields, end = unpack(reply_fmt, raw, wire.HEADER_SIZE)
        if end != len(raw):
            raise AssertionError(f"{len(raw) - end} bytes left over in reply {rtype}")
        return fields

    def raw(self, msg: bytes, reply_room: int | None = None) -> bytes:
        """One message as bytes in, the whole reply (data included) out."""
        io = BufferTransfer(msg, self.msize if reply_room is None else reply_room)
        head, placed = self.server.handle(msg, io)
        return head + bytes(io.reply[len(head):len(head) + placed])

    def checked(self, msg: bytes, reply_room: int | None = None) -> bytes:
        """`raw`, with the reply's size field checked and an Rlerror raised."""
        raw = self.raw(msg, reply_room)
        size, rtype, _tag = wire.HEADER.unpack_from(raw)
        if size != len(raw):
            raise AssertionError(f"reply size field {size} for {len(raw)} bytes")
        if rtype == wire.RLERROR:
            (code,) = struct.unpack_from("<I", raw, wire.HEADER_SIZE)
            raise RemoteError(code, os.strerror(code))
        return raw

    def _next_tag(self) -> int:
        self.tag = (self.tag + 1) % wire.NOTAG
        return self.tag

    # -- the messages ----------------------------------------------------------------------
    def version(self, msize: int | None = None, version: bytes = wire.VERSION_9P2000_L
                ) -> tuple[int, bytes]:
        m, v = self.call(wire.TVERSION, "ds", msize or self.msize, version, reply_fmt="ds")
        return m, v  # type: ignore[return-value]

    def attach(self, fid: int, uid: int = 0) -> Qid:
        return self.call(wire.TATTACH, "ddssd", fid, wire.NOFID, b"root", b"", uid,
                         reply_fmt="Q")[0]  # type: ignore[return-value]

    def walk(self, fid: int, newfid: int, *names: bytes) -> list[Qid]:
        raw = self.checked(tmessage(wire.TWALK, self._next_tag(),
                                pack("ddw", fid, newfid, len(names))
                                + b"".join(pack("s", n) for n in names)))
        (n,) = struct.unpack_from("<H", raw, wire.HEADER_SIZE)
        return [wire.QID.unpack_from(raw, wire.HEADER_SIZE + 2 + 13 * i) for i in range(n)]

    def lopen(self, fid: int, flags: int = 0) -> Qid:
        return self.call(wire.TLOPEN, "dd", fid, flags, reply_fmt="Qd")[0]  # type: ignore

    def lcreate(self, fid: int, name: bytes, flags: int = 2, mode: int = 0o644,
                gid: int = 0) -> Qid:
        return self.call(wire.TLCREATE, "dsddd", fid, name, flags, mode, gid,
                         reply_fmt="Qd")[0]  # type: ignore[return-value]

    def read(self, fid: int, offset: int = 0, count: int = 4096) -> bytes:
        raw = self.checked(tmessage(wire.TREAD, self._next_tag(), pack("dqd", fid, offset, count)))
        (n,) = struct.unpack_from("<I", raw, wire.HEADER_SIZE)
        return raw[wire.RREAD_HEADER:wire.RREAD_HEADER + n]

    def write(self, fid: int, data: bytes, offset: int = 0) -> int:
        raw = self.checked(tmessage(wire.TWRITE, self._next_tag(),
                                    pack("dqd", fid, offset, len(data)) + data))
        return int(struct.unpack_from("<I", raw, wire.HEADER_SIZE)[0])

    def clunk(self, fid: int) -> None:
        self.call(wire.TCLUNK, "d", fid)

    def remove(self, fid: int) -> None:
        self.call(wire.TREMOVE, "d", fid)

    def getattr(self, fid: int) -> dict[str, object]:
        names = ("valid", "qid", "mode", "uid", "gid", "nlink", "rdev", "size", "blksize",
                 "blocks", "atime_sec", "atime_nsec", "mtime_sec", "mtime_nsec", "ctime_sec",
                 "ctime_nsec", "btime_sec", "btime_nsec", "gen", "data_version")
        values = self.call(wire.TGETATTR, "dq", fid, 0x3FFF, reply_fmt="qQddd" + "q" * 15)
        return dict(zip(names, values, strict=True))

    def setattr(self, fid: int, valid: int, mode: int = 0, uid: int = 0, gid: int = 0,
                size: int = 0, atime: tuple[int, int] = (0, 0),
                mtime: tuple[int, int] = (0, 0)) -> None:
        self.call(wire.TSETATTR, "dddddqqqqq", fid, valid, mode, uid, gid, size, *atime,
                  *mtime)

    def readdir(self, fid: int, offset: int = 0, count: int = 8192
                ) -> list[tuple[Qid, int, int, bytes]]:
        raw = self.checked(tmessage(wire.TREADDIR, self._next_tag(),
                                pack("dqd", fid, offset, count)))
        (n,) = struct.unpack_from("<I", raw, wire.HEADER_SIZE)
        data, pos, out = raw[wire.RREAD_HEADER:wire.RREAD_HEADER + n], 0, []
        while pos < len(data):
            (qid, off, dtype, name), pos = unpack("Qqbs", data, pos)
            out.append((qid, off, dtype, name))  # type: ignore[arg-type]
        return out  # type: ignore[return-value]

    def listdir(self, fid: int) -> list[bytes]:
        names, offset = [], 0
        while entries := self.readdir(fid, offset):
            names += [e[3] for e in entries]
            offset = entries[-1][1]
        return names

    def statfs(self, fid: int) -> list[object]:
        return self.call(wire.TSTATFS, "d", fid, reply_fmt="ddqqqqqqd")

    def mkdir(self, fid: int, name: bytes, mode: int = 0o755, gid: int = 0) -> Qid:
        return self.call(wire.TMKDIR, "dsdd", fid, name, mode, gid,
                         reply_fmt="Q")[0]  # type: ignore[return-value]

    def symlink(self, fid: int, name: bytes, target: bytes, gid: int = 0) -> Qid:
        return self.call(wire.TSYMLINK, "dssd", fid, name, target, gid,
                         reply_fmt="Q")[0]  # type: ignore[return-value]

    def mknod(self, fid: int, name: bytes, mode: int, major: int = 0, minor: int = 0,
              gid: int = 0) -> Qid:
        return self.call(wire.TMKNOD, "dsdddd", fid, name, mode, major, minor, gid,
                         reply_fmt="Q")[0]  # type: ignore[return-value]

    def readlink(self, fid: int) -> bytes:
        return self.call(wire.TREADLINK, "d", fid, reply_fmt="s")[0]  # type: ignore

    def link(self, dfid: int, fid: int, name: bytes) -> None:
        self.call(wire.TLINK, "dds", dfid, fid, name)

    def rename(self, fid: int, dfid: int, name: bytes) -> None:
        self.call(wire.TRENAME, "dds", fid, dfid, name)

    def renameat(self, olddir: int, oldname: bytes, newdir: int, newname: bytes) -> None:
        self.call(wire.TRENAMEAT, "dsds", olddir, oldname, newdir, newname)

    def unlinkat(self, dfid: int, name: bytes, flags: int = 0) -> None:
        self.call(wire.TUNLINKAT, "dsd", dfid, name, flags)

    def fsync(self, fid: int, datasync: int = 0) -> None:
        self.call(wire.TFSYNC, "dd", fid, datasync)

    def flush(self, oldtag: int) -> None:
        self.call(wire.TFLUSH, "w", oldtag)

    def xattrwalk(self, fid: int, newfid: int, name: bytes) -> int:
        return self.call(wire.TXATTRWALK, "dds", fid, newfid, name,
                         reply_fmt="q")[0]  # type: ignore[return-value]

    def xattrcreate(self, fid: int, name: bytes, size: int, flags: int = 0) -> None:
        self.call(wire.TXATTRCREATE, "dsqd", fid, name, size, flags)

    def lock(self, fid: int, ltype: int, start: int = 0, length: int = 0, flags: int = 0
             ) -> int:
        return self.call(wire.TLOCK, "dbdqqds", fid, ltype, flags, start, length, 1,
                         b"guest", reply_fmt="b")[0]  # type: ignore[return-value]

    def getlock(self, fid: int, ltype: int, start: int = 0, length: int = 0
                ) -> list[object]:
        return self.call(wire.TGETLOCK, "dbqqds", fid, ltype, start, length, 1, b"guest",
                         reply_fmt="bqqds")


def mount(server: NinePServer, fid: int = 1, msize: int = 65536) -> Client:
    """A client that has done Tversion and attached `fid` to the share's root."""
    client = Client(server, msize)
    got, version = client.version()
    if version != wire.VERSION_9P2000_L:
        raise RemoteError(errno.EPROTO, f"version {version!r}")
    client.msize = got
    client.attach(fid)
    return client
