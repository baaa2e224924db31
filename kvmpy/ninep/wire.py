"""The 9P2000.L wire format: message numbers, a checked reader, reply packing.

Every message is `size[4] type[1] tag[2]` then its fields, little-endian. Strings are
`len[2]` then that many bytes (no NUL); a qid is `type[1] version[4] path[8]`. The field
lists are those of Linux's client (net/9p/client.c, include/net/9p/9p.h), which is the
specification of 9P2000.L in practice.

What it is: `Reader`, which takes fields from one message and raises `Malformed` at the
first field that would run past the message's end, so a handler never sees a short or
overlong field; `reply()` and `lerror()`, which frame a reply; the constants. What it is
not: the server (kvmpy.ninep.server).
"""

from __future__ import annotations

import errno
import struct

# Message types (include/net/9p/9p.h enum p9_msg_t); an R-message is its T-message + 1.
TLERROR = 6
RLERROR = 7
TSTATFS = 8
TLOPEN = 12
TLCREATE = 14
TSYMLINK = 16
TMKNOD = 18
TRENAME = 20
TREADLINK = 22
TGETATTR = 24
TSETATTR = 26
TXATTRWALK = 30
TXATTRCREATE = 32
TREADDIR = 40
TFSYNC = 50
TLOCK = 52
TGETLOCK = 54
TLINK = 70
TMKDIR = 72
TRENAMEAT = 74
TUNLINKAT = 76
TVERSION = 100
TAUTH = 102
TATTACH = 104
TFLUSH = 108
TWALK = 110
TREAD = 116
RREAD = 117
TWRITE = 118
TCLUNK = 120
TREMOVE = 122

VERSION_9P2000_L = b"9P2000.L"
NOTAG = 0xFFFF
NOFID = 0xFFFFFFFF
MAXWELEM = 16  # names in one Twalk

HEADER = struct.Struct("<IBH")  # size, type, tag
HEADER_SIZE = HEADER.size  # 7
# Tread/Treaddir and Rread/Rreaddir: the data starts after these bytes. Linux's zero-copy
# path puts exactly them in its own buffer and the data straight into the caller's pages.
RREAD_HEADER = HEADER_SIZE + 4  # size, type, tag, count
TWRITE_HEADER = HEADER_SIZE + 16  # size, type, tag, fid, offset, count

# qid.type bits
QTDIR = 0x80
QTSYMLINK = 0x02
QTFILE = 0x00
QID = struct.Struct("<BIQ")

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class NineError(Exception):
    """A request that fails with an errno: the server answers it with Rlerror."""

    def __init__(self, code: int, why: str = "") -> None:
        super().__init__(why or errno.errorcode.get(code, str(code)))
        self.errno = code


class Malformed(NineError):
    """A message whose fields do not fit in it, or break the protocol's rules."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.EINVAL, why)


class Reader:
    """The fields of one message, from just after its 7-byte header to `end`.

    `end` is the message's own size field, already checked against the bytes present;
    nothing past it is ever read.
    """

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, end: int, pos: int = HEADER_SIZE) -> None:
        self.data = data
        self.pos = pos
        self.end = end

    def _take(self, fmt: struct.Struct) -> int:
        pos = self.pos
        if pos + fmt.size > self.end:
            raise Malformed(f"field at byte {pos} runs past the message's {self.end} bytes")
        self.pos = pos + fmt.size
        value: int = fmt.unpack_from(self.data, pos)[0]
        return value

    def u8(self) -> int:
        return self._take(_U8)

    def u16(self) -> int:
        return self._take(_U16)

    def u32(self) -> int:
        return self._take(_U32)

    def u64(self) -> int:
        return self._take(_U64)

    def fields(self, fmt: struct.Struct) -> tuple[int, ...]:
        """Several fixed-size fields at once (`fmt` little-endian, no padding)."""
        pos = self.pos
        if pos + fmt.size > self.end:
            raise Malformed(f"{fmt.size} bytes at byte {pos} run past the message's "
                            f"{self.end} bytes")
        self.pos = pos + fmt.size
        return fmt.unpack_from(self.data, pos)

    def string(self) -> bytes:
        n = self.u16()
        pos = self.pos
        if pos + n > self.end:
            raise Malformed(f"string of {n} bytes at byte {pos} runs past the message's "
                            f"{self.end} bytes")
        self.pos = pos + n
        return bytes(self.data[pos:pos + n])


def pack_string(s: bytes) -> bytes:
    if len(s) > 0xFFFF:
        raise NineError(errno.ENAMETOOLONG, "string longer than 65535 bytes")
    return _U16.pack(len(s)) + s


def reply(rtype: int, tag: int, body: bytes = b"") -> bytes:
    """A whole R-message: header then `body`."""
    return HEADER.pack(HEADER_SIZE + len(body), rtype, tag) + body


def lerror(tag: int, code: int) -> bytes:
    """Rlerror: the errno the request failed with (11 bytes, which fit Linux's
    zero-copy reply header too)."""
    return reply(RLERROR, tag, _U32.pack(code))


def pack_qid(qtype: int, version: int, path: int) -> bytes:
    return QID.pack(qtype, version, path)
