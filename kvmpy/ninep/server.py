"""A 9P2000.L server for one host directory: one request's bytes in, its reply out.

What it is: `NinePServer.handle(msg, io)`, a state machine over a fid table. `msg` is
the start of one T-message as the driver wrote it; `io` (`Transfer`) says how many bytes
the driver gave in all, how many the reply may take, and moves file data straight
between a host file and the request or reply (Twrite's payload, Rread's data), which is
how the virtio device avoids copying them. Every field is read through
`kvmpy.ninep.wire.Reader`, which checks it against the message's own size, itself checked
against the bytes the driver gave; anything malformed, any failed host call and any
unknown message is answered with Rlerror(errno). `handle` does not raise.

The message set is what Linux's 9p client sends with version=9p2000.L: Tversion,
Tattach, Twalk, Tlopen, Tlcreate, Tread, Twrite, Tclunk, Tremove, Tgetattr, Tsetattr,
Treaddir, Tstatfs, Tmkdir, Tsymlink, Tmknod, Treadlink, Tlink, Trename, Trenameat,
Tunlinkat, Tfsync, Tflush, Txattrwalk, Txattrcreate, Tlock, Tgetlock. Requests are
served one at a time, in order, so Tflush finds nothing left to cancel.

The security model (docs/9p.md): names are resolved beneath their parent one component
at a time and symlinks are never followed (kvmpy.ninep.hostdir); the guest sees host
uids, gids and modes as they are; files are created with kvmpy's credentials, then given
the requested mode and, where the host allows it, the guest's uid/gid (QEMU's
security_model=none); set-user-ID and set-group-ID bits never reach a regular file on the
host; device nodes are never opened and never created (FIFOs and sockets may be); hard
links are made only between names inside the share; extended attributes: an empty list,
no attribute, none can be set. A read-only share answers every change with EROFS.

What it is not: a transport (kvmpy.virtio.ninep), 9P2000 or 9P2000.u, or asynchronous.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

from kvmpy.log import get_logger
from kvmpy.ninep import wire
from kvmpy.ninep.hostdir import HostDir, Node, raise_fd_limit
from kvmpy.ninep.wire import Malformed, NineError, Reader

log = get_logger(__name__)

MIN_MSIZE = 4096  # Linux's client refuses less
MAX_MSIZE = 1 << 20  # Linux's virtio transport uses at most 512000
MAX_FIDS = 1 << 17  # host fds one guest may hold through this share
V9FS_MAGIC = 0x01021997  # Rstatfs type: what statfs shows in the guest

# Tlopen/Tlcreate flags (P9_DOTL_*) -> host open(2) flags. Left out: CREATE and EXCL
# (Tlcreate adds its own), NOCTTY, FASYNC, DIRECT (guest buffers are not aligned for the
# host), NOFOLLOW (nodes are reopened through /proc/self/fd), NOATIME (needs ownership),
# CLOEXEC (always set) and NONBLOCK (meaningless for the regular files served).
_DOTL_FLAGS = {
    0o1000: os.O_TRUNC,
    0o2000: os.O_APPEND,
    0o10000: os.O_DSYNC,
    0o200000: os.O_DIRECTORY,
    0o4000000: os.O_SYNC,
}
_DOTL_ACCMODE = 3
_DOTL_EXCL = 0o200
_ACCESS = {0: os.O_RDONLY, 1: os.O_WRONLY, 2: os.O_RDWR}
AT_REMOVEDIR = 0x200  # P9_DOTL_AT_REMOVEDIR

# Tsetattr valid bits (P9_ATTR_*)
ATTR_MODE = 1 << 0
ATTR_UID = 1 << 1
ATTR_GID = 1 << 2
ATTR_SIZE = 1 << 3
ATTR_ATIME = 1 << 4
ATTR_MTIME = 1 << 5
ATTR_ATIME_SET = 1 << 7
ATTR_MTIME_SET = 1 << 8
NO_ID = 0xFFFFFFFF  # "leave unchanged" for a uid/gid

GETATTR_BASIC = 0x7FF  # P9_STATS_BASIC: mode..blocks
# Tlock: types, flags, Rlock status (P9_LOCK_*)
LOCK_RDLCK, LOCK_WRLCK, LOCK_UNLCK = 0, 1, 2
LOCK_SUCCESS, LOCK_BLOCKED, LOCK_ERROR = 0, 1, 2
_FCNTL_LOCK = {LOCK_RDLCK: fcntl.F_RDLCK, LOCK_WRLCK: fcntl.F_WRLCK, LOCK_UNLCK: fcntl.F_UNLCK}
_P9_LOCK = {v: k for k, v in _FCNTL_LOCK.items()}
_FLOCK = struct.Struct("hh4xqqi4x")  # struct flock: type, whence, start, len, pid
_F_OFD_GETLK, _F_OFD_SETLK = 36, 37  # open-file-description locks (<fcntl.h>)

# d_type values for Treaddir (<dirent.h>)
_DT = {stat.S_IFIFO: 1, stat.S_IFCHR: 2, stat.S_IFDIR: 4, stat.S_IFBLK: 6, stat.S_IFREG: 8,
       stat.S_IFLNK: 10, stat.S_IFSOCK: 12}
DT_DIR, DT_REG, DT_LNK = 4, 8, 10

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_U16 = struct.Struct("<H")
_U64_MASK = (1 << 64) - 1
_TGETATTR = struct.Struct("<IQ")  # fid, request_mask
_QID = wire.QID
_HEADER, _HEADER_SIZE, _NOTAG = wire.HEADER, wire.HEADER_SIZE, wire.NOTAG
_TWRITE = wire.TWRITE
_TVERSION = struct.Struct("<I")
_TWALK = struct.Struct("<IIH")
_TIO = struct.Struct("<IQI")  # fid, offset, count (Tread, Twrite, Treaddir)
_TSETATTR = struct.Struct("<IIIIIQQQQQ")
_TLOCK = struct.Struct("<IBIQQI")
_TGETLOCK = struct.Struct("<IBQQI")
_RGETATTR = struct.Struct("<Q13sIIIQQQQQ" + "Q" * 10)
_RSTATFS = struct.Struct("<IIQQQQQQI")
_RGETLOCK = struct.Struct("<BQQI")
_DIRENT = struct.Struct("<13sQBH")  # qid, offset, type, name length (then the name)


class Transfer(Protocol):
    """The request and reply buffers of one message, as the transport holds them."""

    request_len: int  # bytes the driver gave for the request (the message is the first `size`)
    reply_room: int  # bytes the reply may take

    def read_file(self, fd: int, offset: int, start: int, count: int) -> int:
        """Read up to `count` bytes of `fd` at `offset` into reply bytes [start, ...).
        Raises OSError from the host, TransferError for the transport's own failure."""
        ...

    def write_file(self, fd: int, offset: int, start: int, count: int) -> int:
        """Write request bytes [start, start + count) to `fd` at `offset` (same errors)."""
        ...


class TransferError(Exception):
    """The transport could not move a request's data (the driver's buffers are bad).

    Not the request's failure but the transport's: `handle` lets it through.
    """


class BufferTransfer:
    """A `Transfer` over Python buffers: for tests, fuzzing and any byte-stream transport."""

    def __init__(self, request: bytes, reply_room: int) -> None:
        self.request = request
        self.request_len = len(request)
        self.reply = bytearray(reply_room)
        self.reply_room = reply_room

    def read_file(self, fd: int, offset: int, start: int, count: int) -> int:
        return os.preadv(fd, [memoryview(self.reply)[start:start + count]], offset)

    def write_file(self, fd: int, offset: int, start: int, count: int) -> int:
        return os.pwrite(fd, self.request[start:start + count], offset)


class Data(NamedTuple):
    """A reply whose last `placed` bytes the handler already put in place (`io.read_file`)."""

    body: bytes
    placed: int


class Fid:
    """What one fid names: a node, and once opened a host fd (or an xattr's bytes)."""

    __slots__ = ("node", "uid", "fd", "flags", "writable", "entries", "xattr")

    def __init__(self, node: Node, uid: int) -> None:
        self.node = node.hold()
        self.uid = uid
        self.fd = -1  # open file or directory (Tlopen, Tlcreate)
        self.flags = 0  # the host open(2) flags of `fd` (a restore opens it again so)
        self.writable = False
        self.entries: list[bytes] | None = None  # a directory's Treaddir snapshot
        self.xattr: bytes | None = None  # an xattr fid (Txattrwalk): its value

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.node.release()


def check_name(name: bytes) -> bytes:
    """One path component as the guest may name a new or existing entry."""
    if not name or b"/" in name or b"\0" in name:
        raise NineError(errno.EINVAL, f"bad file name {name[:64]!r}")
    if name in (b".", b".."):
        raise NineError(errno.EEXIST, "'.' and '..' always exist")
    return name


def _strip_set_id(mode: int, is_dir: bool) -> int:
    """Permission bits for the host: no set-user-ID or set-group-ID on regular files."""
    mode &= 0o7777
    return mode if is_dir else mode & ~(stat.S_ISUID | stat.S_ISGID)


class NinePServer:
    """One 9P session over `HostDir(root)`; reset by Tversion (and by the transport)."""

    def __init__(self, root: str, *, read_only: bool = False, max_msize: int = MAX_MSIZE,
                 use_openat2: bool | None = None) -> None:
        self.dir = HostDir(root, use_openat2=use_openat2)
        self.read_only = read_only
        self.max_msize = max_msize
        self.msize = 0  # 0 until Tversion
        self.fids: dict[int, Fid] = {}
        self._warned: set[int] = set()  # message types already logged as malformed
        raise_fd_limit()
        self._handlers: dict[int, Callable[[Reader, Transfer], bytes | Data]] = {
            wire.TVERSION: self._version, wire.TATTACH: self._attach, wire.TWALK: self._walk,
            wire.TLOPEN: self._lopen, wire.TLCREATE: self._lcreate, wire.TREAD: self._read,
            wire.TWRITE: self._write, wire.TCLUNK: self._clunk, wire.TREMOVE: self._remove,
            wire.TGETATTR: self._getattr, wire.TSETATTR: self._setattr,
            wire.TREADDIR: self._readdir, wire.TSTATFS: self._statfs, wire.TMKDIR: self._mkdir,
            wire.TSYMLINK: self._symlink, wire.TMKNOD: self._mknod,
            wire.TREADLINK: self._readlink, wire.TLINK: self._link,
            wire.TRENAME: self._rename, wire.TRENAMEAT: self._renameat,
            wire.TUNLINKAT: self._unlinkat, wire.TFSYNC: self._fsync,
            wire.TFLUSH: self._flush, wire.TXATTRWALK: self._xattrwalk,
            wire.TXATTRCREATE: self._xattrcreate, wire.TLOCK: self._lock,
            wire.TGETLOCK: self._getlock,
        }

    # -- the session --------------------------------------------------------------------
    def reset(self) -> None:
        """Clunk every fid (Tversion, or the transport was reset)."""
        for fid in self.fids.values():
            fid.close()
        self.fids.clear()
        self.msize = 0

    def close(self) -> None:
        self.reset()
        self.dir.close()

    def handle(self, msg: bytes, io: Transfer) -> tuple[bytes, int]:
        """Serve one request: (reply bytes, data bytes already placed right after them).

        `msg` is the message's first bytes: all of it, except that Twrite's payload may
        be left in `io` (its 23-byte header is enough). The reply never exceeds
        `io.reply_room` or the negotiated msize; if not even an Rlerror fits, the
        answer is (b"", 0).
        """
        tag, mtype = _NOTAG, -1
        try:
            got = len(msg)
            if got < _HEADER_SIZE:
                raise Malformed(f"{got}-byte message: no room for its header")
            size, mtype, tag = _HEADER.unpack_from(msg)
            msize = self.msize
            limit = msize or self.max_msize
            if not _HEADER_SIZE <= size <= io.request_len:
                raise Malformed(f"size field {size} for {io.request_len} bytes given")
            if size > limit:
                raise Malformed(f"{size}-byte message, larger than msize {limit}")
            if got < size and mtype != _TWRITE:
                raise Malformed(f"{size}-byte message, {got} bytes copied")
            handler = self._handlers.get(mtype)
            if handler is None:
                raise NineError(errno.EOPNOTSUPP, f"message type {mtype}")
            if not msize and mtype != wire.TVERSION:
                raise NineError(errno.EPROTO, "request before Tversion")
            answer = handler(Reader(msg, size if size < got else got), io)
            count = 0
            if isinstance(answer, Data):
                answer, count = answer
            length = _HEADER_SIZE + len(answer) + count
            # (Linux's client takes a reply of msize bytes or more for a broken one;
            # Tversion may just have set msize)
            if length > io.reply_room or length >= (self.msize or limit + 1):
                raise NineError(errno.EMSGSIZE, f"{length}-byte reply")
            return _HEADER.pack(length, mtype + 1, tag) + answer, count
        except TransferError:
            raise
        except NineError as e:
            if isinstance(e, Malformed) and mtype not in self._warned:
                self._warned.add(mtype)  # once per message type: guests can repeat it
                log.warning("9p: malformed message of type %d: %s", mtype, e)
            code = e.errno
        except OSError as e:
            code = e.errno or errno.EIO
        except Exception:  # a bug in the server: the guest gets EIO, the log says where
            log.exception("9p: request failed inside the server")
            code = errno.EIO
        reply = wire.lerror(tag, code)
        return (reply, 0) if len(reply) <= io.reply_room else (b"", 0)

    # -- fids ---------------------------------------------------------------------------
    def _fid(self, number: int) -> Fid:
        fid = self.fids.get(number)
        if fid is None:
            raise NineError(errno.EBADF, f"unknown fid {number}")
        return fid

    def _new_fid(self, number: int, node: Node, uid: int) -> Fid:
        if number == wire.NOFID or number in self.fids:
            raise NineError(errno.EINVAL, f"fid {number} is in use")
        if len(self.fids) >= MAX_FIDS:
            raise NineError(errno.EMFILE, f"{MAX_FIDS} fids in use")
        fid = self.fids[number] = Fid(node, uid)
        return fid

    def _writable(self) -> None:
        if self.read_only:
            raise NineError(errno.EROFS)

    def _qid(self, st: os.stat_result) -> bytes:
        return _QID.pack(*self.dir.qid(st))

    def _new_node(self, parent: Node, name: bytes) -> Node:
        """The node for an entry just made in `parent` (not yet held by a fid)."""
        return self.dir.lookup(parent, name)

    # -- session messages ----------------------------------------------------------------
    def _version(self, r: Reader, io: Transfer) -> bytes:
        (msize,) = r.fields(_TVERSION)
        version = r.string()
        self.reset()
        if msize < MIN_MSIZE:
            raise NineError(errno.EMSGSIZE, f"msize {msize} below {MIN_MSIZE}")
        if version != wire.VERSION_9P2000_L:
            return _U32.pack(min(msize, self.max_msize)) + wire.pack_string(b"unknown")
        self.msize = min(msize, self.max_msize)
        return _U32.pack(self.msize) + wire.pack_string(version)

    def _attach(self, r: Reader, io: Transfer) -> bytes:
        fid, _afid = r.u32(), r.u32()
        r.string()  # uname
        r.string()  # aname: there is one tree
        uid = r.u32()
        root = self.dir.root
        self._new_fid(fid, root, uid)
        return self._qid(os.fstat(root.fd))

    def _flush(self, r: Reader, io: Transfer) -> bytes:
        r.u16()  # oldtag: requests complete in order, so it has already been answered
        return b""

    def _clunk(self, r: Reader, io: Transfer) -> bytes:
        number = r.u32()
        fid = self.fids.pop(number, None)
        if fid is None:
            raise NineError(errno.EBADF, f"unknown fid {number}")
        fid.close()
        return b""

    # -- walking ----------------------------------------------------------------------------
    def _walk(self, r: Reader, io: Transfer) -> bytes:
        number, newnumber, count = r.fields(_TWALK)
        if count > wire.MAXWELEM:
            raise Malformed(f"Twalk of {count} names (at most {wire.MAXWELEM})")
        names = [r.string() for _ in range(count)]
        src = self._fid(number)
        if newnumber != number and (newnumber in self.fids or newnumber == wire.NOFID):
            raise NineError(errno.EINVAL, f"newfid {newnumber} is in use")
        for name in names:
            if not name or b"/" in name or b"\0" in name:
                raise NineError(errno.ENOENT, f"bad name {name[:64]!r} in Twalk")
        if newnumber == number and src.fd >= 0 and names:
            raise NineError(errno.EINVAL, "walking an open fid")
        node = src.node
        qids: list[bytes] = []
        made: list[Node] = []  # nodes opened by this walk, in order: parents first
        lookup, qid = self.dir.lookup, self.dir.qid
        try:
            for name in names:
                try:
                    nxt = lookup(node, name)
                    if nxt.parent is node:  # not "." or "..": a node just opened
                        made.append(nxt)
                    st = os.fstat(nxt.fd)
                except OSError:
                    if not qids:
                        raise
                    break  # a partial walk: the qids so far, and newfid stays unused
                node = nxt
                qids.append(_QID.pack(*qid(st)))
            if len(qids) == count:
                if newnumber != number:
                    self._new_fid(newnumber, node, src.uid)
                elif node is not src.node:
                    node.hold()
                    src.node.release()
                    src.node = node
        finally:
            for n in made:  # close what no fid took (a child's release closes its parents)
                if not n.refs:
                    self._drop(n)
        return _U16.pack(len(qids)) + b"".join(qids)

    @staticmethod
    def _drop(node: Node) -> None:
        """Close the nodes a walk made that no fid took."""
        node.hold()
        node.release()

    # -- opening ------------------------------------------------------------------------------
    def _open_flags(self, flags: int) -> int:
        access = flags & _DOTL_ACCMODE
        if access not in _ACCESS:
            raise NineError(errno.EINVAL, f"open access mode {access}")
        host = _ACCESS[access]
        for dotl, flag in _DOTL_FLAGS.items():
            if flags & dotl:
                host |= flag
        if self.read_only and (access != 0 or host & (os.O_TRUNC | os.O_APPEND)):
            raise NineError(errno.EROFS)
        return host

    def _lopen(self, r: Reader, io: Transfer) -> bytes:
        fid = self._fid(r.u32())
        flags = self._open_flags(r.u32())
        if fid.fd >= 0 or fid.xattr is not None:
            raise NineError(errno.EINVAL, "fid already open")
        st = os.fstat(fid.node.fd)
        if stat.S_ISDIR(st.st_mode):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
                raise NineError(errno.EISDIR)
            flags = os.O_RDONLY | os.O_DIRECTORY
            fid.fd = self.dir.reopen(fid.node, flags)
        elif stat.S_ISREG(st.st_mode):
            if flags & os.O_DIRECTORY:
                raise NineError(errno.ENOTDIR)
            fid.fd = self.dir.reopen(fid.node, flags)
        else:
            # the guest opens its own device for a device node and its own pipe for a
            # FIFO; the server never opens a host device, FIFO, socket or symlink
            raise NineError(errno.ELOOP if stat.S_ISLNK(st.st_mode) else errno.EPERM,
                            "not a regular file or directory")
        fid.flags = flags
        fid.writable = bool(flags & (os.O_WRONLY | os.O_RDWR))
        return self._qid(st) + _U32.pack(0)  # iounit 0: the client uses msize

    def _lcreate(self, r: Reader, io: Transfer) -> bytes:
        fid = self._fid(r.u32())
        name = check_name(r.string())
        dotl_flags, mode, gid = r.u32(), r.u32(), r.u32()
        self._writable()
        flags = self._open_flags(dotl_flags) & ~os.O_DIRECTORY
        if fid.fd >= 0 or fid.xattr is not None:
            raise NineError(errno.EINVAL, "fid already open")
        parent = fid.node
        mode = _strip_set_id(mode, False)
        try:
            # O_EXCL first: an existing name is checked to be a regular file before it is
            # opened, so a host device or FIFO there is never opened
            fd = self.dir.open_beneath(parent.fd, name, flags | os.O_CREAT | os.O_EXCL, mode)
            created = True
        except FileExistsError:
            if dotl_flags & _DOTL_EXCL:
                raise
            fd, created = -1, False
        node = None
        try:
            node = self._new_node(parent, name)
            if created:
                self._set_owner(node, fid.uid, gid)
                os.fchmod(fd, mode)  # the exact mode, whatever kvmpy's umask
            else:
                st = os.fstat(node.fd)
                if not stat.S_ISREG(st.st_mode):
                    raise NineError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EEXIST)
                fd = self.dir.reopen(node, flags)
            qid = self._qid(os.fstat(fd))
        except BaseException:
            if fd >= 0:
                os.close(fd)
            if node is not None:
                self._drop(node)
            raise
        node.hold()
        fid.node.release()
        fid.node = node
        fid.fd = fd
        fid.flags = flags
        fid.writable = bool(flags & (os.O_WRONLY | os.O_RDWR))
        return qid + _U32.pack(0)

    def _set_owner(self, node: Node, uid: int, gid: int) -> None:
        """Give a new entry the guest's uid/gid where the host lets kvmpy (security
        model "none": kvmpy not being root is not an error)."""
        try:
            os.chown(self.dir.proc_name(node), uid if uid != NO_ID else -1,
                     gid if gid != NO_ID else -1, dir_fd=self.dir.proc_fd)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EINVAL):
                raise

    # -- data -----------------------------------------------------------------------------
    def _data_room(self, count: int, io: Transfer) -> int:
        """How many data bytes an Rread/Rreaddir may carry."""
        # (Linux takes a reply of msize bytes or more for a broken one)
        room = min(io.reply_room, self.msize - 1) - wire.RREAD_HEADER
        return max(0, min(count, room))

    def _read(self, r: Reader, io: Transfer) -> Data:
        fid_number, offset, count = r.fields(_TIO)
        fid = self._fid(fid_number)
        count = self._data_room(count, io)
        if fid.xattr is not None:
            data = fid.xattr[offset:offset + count]
            return Data(_U32.pack(len(data)) + data, 0)
        if fid.fd < 0:
            raise NineError(errno.EBADF, "fid not open")
        if offset >= 1 << 63:
            raise NineError(errno.EINVAL, f"offset {offset}")
        n = io.read_file(fid.fd, offset, wire.RREAD_HEADER, count) if count else 0
        return Data(_U32.pack(n), n)

    def _write(self, r: Reader, io: Transfer) -> bytes:
        fid_number, offset, count = r.fields(_TIO)
        fid = self._fid(fid_number)
        self._writable()
        if fid.fd < 0 or not fid.writable:
            raise NineError(errno.EBADF, "fid not open for writing")
        if offset >= 1 << 63:
            raise NineError(errno.EINVAL, f"offset {offset}")
        # Linux's zero-copy path packs the count it asked for before it knows how many
        # pages it pinned; what the message carries is what is written
        size = min(wire.HEADER.unpack_from(r.data)[0], io.request_len)
        count = min(count, size - wire.TWRITE_HEADER)
        n = io.write_file(fid.fd, offset, wire.TWRITE_HEADER, count) if count > 0 else 0
        return _U32.pack(n)

    def _fsync(self, r: Reader, io: Transfer) -> bytes:
        fid = self._fid(r.u32())
        datasync = r.u32()
        if fid.fd < 0:
            raise NineError(errno.EBADF, "fid not open")
        (os.fdatasync if datasync else os.fsync)(fid.fd)
        return b""

    # -- directories ------------------------------------------------------------------------
    def _readdir(self, r: Reader, io: Transfer) -> bytes:
        fid_number, offset, count = r.fields(_TIO)
        fid = self._fid(fid_number)
        if fid.fd < 0 or not stat.S_ISDIR(os.fstat(fid.fd).st_mode):
            raise NineError(errno.EBADF if fid.fd < 0 else errno.ENOTDIR, "not an open dir")
        if offset == 0 or fid.entries is None:
            fid.entries = self._list(fid)
        room = self._data_room(count, io)
        out: list[bytes] = []
        used = 0
        for entry in fid.entries[offset:] if offset < len(fid.entries) else ():
            if used + len(entry) > room:
                break
            out.append(entry)
            used += len(entry)
        if not out and offset < len(fid.entries) and room:
            raise NineError(errno.EINVAL, f"Treaddir count {count} too small for an entry")
        data = b"".join(out)
        return _U32.pack(len(data)) + data

    def _list(self, fid: Fid) -> list[bytes]:
        """A snapshot of an open directory's entries, each packed for Rreaddir; an entry's
        offset is the index of the next one (what the client sends back to go on)."""
        dev = os.fstat(fid.fd).st_dev
        here = os.fstat(fid.node.fd)
        parent = os.fstat((fid.node.parent or fid.node).fd)
        raw = [(b".", self._qid(here), DT_DIR), (b"..", self._qid(parent), DT_DIR)]
        with os.scandir(fid.fd) as entries:
            for e in entries:
                name = os.fsencode(e.name)
                if e.is_dir(follow_symlinks=False):
                    qtype, dtype = wire.QTDIR, DT_DIR
                elif e.is_symlink():
                    qtype, dtype = wire.QTSYMLINK, DT_LNK
                elif e.is_file(follow_symlinks=False):
                    qtype, dtype = wire.QTFILE, DT_REG
                else:
                    qtype, dtype = wire.QTFILE, _DT.get(stat.S_IFMT(
                        e.stat(follow_symlinks=False).st_mode), 0)
                raw.append((name, wire.QID.pack(qtype, 0, self.dir.qid_path(dev, e.inode())),
                            dtype))
        return [_DIRENT.pack(qid, i + 1, dtype, len(name)) + name
                for i, (name, qid, dtype) in enumerate(raw)]

    def _mkdir(self, r: Reader, io: Transfer) -> bytes:
        parent = self._fid(r.u32())
        name = check_name(r.string())
        mode, gid = r.u32(), r.u32()
        self._writable()
        mode = _strip_set_id(mode, True)
        os.mkdir(name, mode, dir_fd=parent.node.fd)
        return self._finish_new(parent, name, mode, gid)

    def _finish_new(self, parent: Fid, name: bytes, mode: int | None, gid: int) -> bytes:
        """Owner and exact mode for an entry just made; its qid."""
        node = self._new_node(parent.node, name)
        try:
            self._set_owner(node, parent.uid, gid)
            st = os.fstat(node.fd)
            if mode is not None and not stat.S_ISLNK(st.st_mode):
                os.chmod(self.dir.proc_name(node), mode, dir_fd=self.dir.proc_fd)
                st = os.fstat(node.fd)
            return self._qid(st)
        finally:
            self._drop(node)

    def _symlink(self, r: Reader, io: Transfer) -> bytes:
        parent = self._fid(r.u32())
        name = check_name(r.string())
        target, gid = r.string(), r.u32()
        self._writable()
        if not target or b"\0" in target:
            raise NineError(errno.ENOENT if not target else errno.EINVAL, "symlink target")
        os.symlink(target, name, dir_fd=parent.node.fd)  # stored, never followed here
        return self._finish_new(parent, name, None, gid)

    def _mknod(self, r: Reader, io: Transfer) -> bytes:
        parent = self._fid(r.u32())
        name = check_name(r.string())
        mode, _major, _minor, gid = r.u32(), r.u32(), r.u32(), r.u32()
        self._writable()
        kind = stat.S_IFMT(mode)
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            raise NineError(errno.EPERM, "device nodes are not created on the host")
        if kind not in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFREG):
            raise NineError(errno.EINVAL, f"mknod of type {kind:#o}")
        perm = _strip_set_id(mode, False)
        os.mknod(name, kind | perm, dir_fd=parent.node.fd)
        return self._finish_new(parent, name, perm, gid)

    def _readlink(self, r: Reader, io: Transfer) -> bytes:
        fid = self._fid(r.u32())
        return wire.pack_string(os.readlink(b"", dir_fd=fid.node.fd))

    def _link(self, r: Reader, io: Transfer) -> bytes:
        parent = self._fid(r.u32())
        target = self._fid(r.u32())
        name = check_name(r.string())
        self._writable()
        # the exact inode the fid holds (a symlink links as itself), never a path
        os.link(self.dir.proc_name(target.node), name, src_dir_fd=self.dir.proc_fd,
                dst_dir_fd=parent.node.fd, follow_symlinks=True)
        return b""

    # -- renaming and removing -------------------------------------------------------------
    def _where(self, node: Node) -> Node:
        """The parent `node` was reached from, if its name there still names it."""
        parent = node.parent
        if parent is None:
            raise NineError(errno.EBUSY, "the share's root")
        there = os.stat(node.name, dir_fd=parent.fd, follow_symlinks=False)
        here = os.fstat(node.fd)
        if (there.st_dev, there.st_ino) != (here.st_dev, here.st_ino):
            raise NineError(errno.ESTALE, "renamed or removed on the host since it was walked")
        return parent

    def _rename(self, r: Reader, io: Transfer) -> bytes:
        fid = self._fid(r.u32())
        newparent = self._fid(r.u32())
        name = check_name(r.string())
        self._writable()
        node = fid.node
        parent = self._where(node)
        os.rename(node.name, name, src_dir_fd=parent.fd, dst_dir_fd=newparent.node.fd)
        newparent.node.hold()
        node.parent, node.name = newparent.node, name
        parent.release()
        return b""

    def _renameat(self, r: Reader, io: Transfer) -> bytes:
        old = self._fid(r.u32())
        oldname = _unlink_name(r.string())
        new = self._fid(r.u32())
        newname = _unlink_name(r.string())
        self._writable()
        os.rename(oldname, newname, src_dir_fd=old.node.fd, dst_dir_fd=new.node.fd)
        return b""

    def _unlinkat(self, r: Reader, io: Transfer) -> bytes:
        parent = self._fid(r.u32())
        name = _unlink_name(r.string())
        flags = r.u32()
        self._writable()
        if flags & ~AT_REMOVEDIR:
            raise NineError(errno.EINVAL, f"unlinkat flags {flags:#x}")
        if flags & AT_REMOVEDIR:
            os.rmdir(name, dir_fd=parent.node.fd)
        else:
            os.unlink(name, dir_fd=parent.node.fd)
        return b""

    def _remove(self, r: Reader, io: Transfer) -> bytes:
        number = r.u32()
        fid = self._fid(number)
        try:  # Tremove clunks the fid whether or not the remove works
            self._writable()
            parent = self._where(fid.node)
            if stat.S_ISDIR(os.fstat(fid.node.fd).st_mode):
                os.rmdir(fid.node.name, dir_fd=parent.fd)
            else:
                os.unlink(fid.node.name, dir_fd=parent.fd)
        finally:
            del self.fids[number]
            fid.close()
        return b""

    # -- attributes ----------------------------------------------------------------------
    def _getattr(self, r: Reader, io: Transfer) -> bytes:
        number, _mask = r.fields(_TGETATTR)  # the basic fields are always there
        fid = self.fids.get(number)
        if fid is None:
            raise NineError(errno.EBADF, f"unknown fid {number}")
        st = os.fstat(fid.node.fd)
        rdev = st.st_rdev
        if rdev:  # Linux's new_decode_dev() encoding of the device number
            major, minor = os.major(rdev), os.minor(rdev)
            rdev = (major & 0xFFF) << 8 | (minor & 0xFF) | (minor & ~0xFF) << 12
        # times as (tv_sec as the wire's u64, two's complement before 1970; tv_nsec)
        atime, atime_ns = divmod(st.st_atime_ns, 1_000_000_000)
        mtime, mtime_ns = divmod(st.st_mtime_ns, 1_000_000_000)
        ctime, ctime_ns = divmod(st.st_ctime_ns, 1_000_000_000)
        return _RGETATTR.pack(
            GETATTR_BASIC, _QID.pack(*self.dir.qid(st)), st.st_mode, st.st_uid, st.st_gid,
            st.st_nlink, rdev, st.st_size, st.st_blksize, st.st_blocks,
            atime & _U64_MASK, atime_ns, mtime & _U64_MASK, mtime_ns, ctime & _U64_MASK,
            ctime_ns, 0, 0, 0, 0)  # btime, gen, data_version: not in the valid mask

    def _setattr(self, r: Reader, io: Transfer) -> bytes:
        (number, valid, mode, uid, gid, size, atime_s, atime_ns, mtime_s,
         mtime_ns) = r.fields(_TSETATTR)
        fid = self._fid(number)
        if valid & (ATTR_MODE | ATTR_UID | ATTR_GID | ATTR_SIZE | ATTR_ATIME | ATTR_MTIME):
            self._writable()
        node, proc, proc_fd = fid.node, self.dir.proc_name(fid.node), self.dir.proc_fd
        st = os.fstat(node.fd)
        if valid & ATTR_MODE:
            os.chmod(proc, _strip_set_id(mode, stat.S_ISDIR(st.st_mode)), dir_fd=proc_fd)
        if valid & (ATTR_UID | ATTR_GID):
            os.chown(proc, uid if valid & ATTR_UID else -1, gid if valid & ATTR_GID else -1,
                     dir_fd=proc_fd)
        if valid & ATTR_SIZE:
            if not stat.S_ISREG(st.st_mode):
                raise NineError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL)
            if size >= 1 << 63:
                raise NineError(errno.EFBIG)
            if fid.fd >= 0 and fid.writable:
                os.ftruncate(fid.fd, size)
            else:
                fd = self.dir.reopen(node, os.O_WRONLY)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
        if valid & (ATTR_ATIME | ATTR_MTIME):
            now = time.time_ns()
            st = os.fstat(node.fd)
            times = [st.st_atime_ns, st.st_mtime_ns]
            for i, (bit, given, s, ns) in enumerate(((ATTR_ATIME, ATTR_ATIME_SET, atime_s,
                                                      atime_ns),
                                                     (ATTR_MTIME, ATTR_MTIME_SET, mtime_s,
                                                      mtime_ns))):
                if valid & bit:
                    s -= (s >> 63) << 64  # tv_sec is signed: before 1970 is negative
                    if valid & given and not (0 <= ns < 10**9 and abs(s) < 1 << 62):
                        raise NineError(errno.EINVAL, "time out of range")
                    times[i] = s * 10**9 + ns if valid & given else now
            os.utime(proc, ns=(times[0], times[1]), dir_fd=proc_fd)
        return b""

    def _statfs(self, r: Reader, io: Transfer) -> bytes:
        fid = self._fid(r.u32())
        s = os.fstatvfs(fid.node.fd)
        return _RSTATFS.pack(V9FS_MAGIC, s.f_bsize, s.f_blocks, s.f_bfree, s.f_bavail,
                             s.f_files, s.f_ffree, s.f_fsid & 0xFFFFFFFFFFFFFFFF,
                             s.f_namemax)

    def _xattrwalk(self, r: Reader, io: Transfer) -> bytes:
        fid = self._fid(r.u32())
        newnumber = r.u32()
        name = r.string()
        if name:  # no file on the share has an extended attribute
            raise NineError(errno.ENODATA)
        self._new_fid(newnumber, fid.node, fid.uid).xattr = b""  # the (empty) list of names
        return _U64.pack(0)

    def _xattrcreate(self, r: Reader, io: Transfer) -> bytes:
        self._fid(r.u32())
        raise NineError(errno.EOPNOTSUPP, "extended attributes cannot be set")

    # -- locks ---------------------------------------------------------------------------------
    def _lock(self, r: Reader, io: Transfer) -> bytes:
        number, ltype, flags, start, length, _pid = r.fields(_TLOCK)
        r.string()  # client_id
        fid = self._fid(number)
        if ltype not in _FCNTL_LOCK or fid.fd < 0 or start >= 1 << 63 or length >= 1 << 63:
            return bytes([LOCK_ERROR])
        # an open-file-description lock, so two guest opens conflict like two host ones;
        # never blocking: BLOCKED makes Linux's client wait and ask again (F_SETLKW)
        try:
            fcntl.fcntl(fid.fd, _F_OFD_SETLK, _FLOCK.pack(_FCNTL_LOCK[ltype], os.SEEK_SET,
                                                          start, length, 0))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return bytes([LOCK_BLOCKED])
            return bytes([LOCK_ERROR])
        return bytes([LOCK_SUCCESS])

    def _getlock(self, r: Reader, io: Transfer) -> bytes:
        number, ltype, start, length, pid = r.fields(_TGETLOCK)
        client = r.string()
        fid = self._fid(number)
        if ltype not in _FCNTL_LOCK or fid.fd < 0 or start >= 1 << 63 or length >= 1 << 63:
            raise NineError(errno.EINVAL, "lock query")
        got = fcntl.fcntl(fid.fd, _F_OFD_GETLK, _FLOCK.pack(_FCNTL_LOCK[ltype], os.SEEK_SET,
                                                            start, length, 0))
        gtype, _whence, gstart, glen, gpid = _FLOCK.unpack(got)
        if gtype == fcntl.F_UNLCK:
            gstart, glen, gpid = start, length, pid
        return _RGETLOCK.pack(_P9_LOCK[gtype], gstart, glen, gpid & 0xFFFFFFFF) \
            + wire.pack_string(client)


def _unlink_name(name: bytes) -> bytes:
    """A name to unlink or rename: one component, neither '.' nor '..'."""
    if name in (b".", b".."):
        raise NineError(errno.EINVAL, "cannot unlink or rename '.' or '..'")
    return check_name(name)
