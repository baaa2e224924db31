"""A 9P session in a snapshot: the fid table as paths, opened again on restore.

Why: a guest that has a share mounted holds fids (its root, its cwd, open files), and a
restore that forgot them would leave the mount dead (every request EBADF). A fid is a
host file descriptor, which no snapshot can hold, but every node the server has is
reached from the share's root by a chain of names (kvmpy.ninep.hostdir.Node), so a fid
is saved as that path, the file's identity (st_dev, st_ino) and how it was open, and a
restore walks the path again, one component at a time under the same rules as Twalk,
and opens the file the same way.

What it refuses: the share must be the same directory with the same files. A path that
no longer leads anywhere, or leads to another file than the one saved (renamed, replaced,
deleted, including a file the guest unlinked while it still held it open), is refused in
one line, and the restore with it; the guest's view of the share is never silently
changed under it.

What it does not keep: a directory listing in progress (Treaddir's snapshot of entries;
the directory is listed again at the next read), and POSIX locks the guest held through
the share (the reopened descriptors hold none). A file that was opened with O_TRUNC is
reopened without it.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, Any

from kvmpy.ninep import wire
from kvmpy.ninep.hostdir import Node
from kvmpy.state.values import U32, U64, StateReader, b64

if TYPE_CHECKING:
    from kvmpy.ninep.server import Fid, NinePServer

MAX_PATH = 1 << 20  # bytes of one fid's path (names joined by "/")
MAX_XATTR = 1 << 16
# the host flags a fid can have been opened with (kvmpy.ninep.server._open_flags)
OPEN_FLAGS = (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_DSYNC | os.O_SYNC
              | os.O_DIRECTORY)


def session_state(server: NinePServer) -> dict[str, Any]:
    """The session: msize, every fid, and the qid numbering the guest has seen."""
    qids = server.dir.qid_path
    return {
        "msize": server.msize,
        "fids": [_fid_state(number, fid) for number, fid in sorted(server.fids.items())],
        "qid_devices": [[dev, prefix] for dev, prefix in qids.prefixes.items()],
        "qid_assigned": [[dev, ino, path] for (dev, ino), path in qids.assigned.items()],
    }


def _fid_state(number: int, fid: Fid) -> dict[str, Any]:
    st = os.fstat(fid.node.fd)
    return {"fid": number, "path": b64(b"/".join(fid.node.path())), "uid": fid.uid,
            "file": [st.st_dev, st.st_ino], "open": fid.flags if fid.fd >= 0 else None,
            "xattr": None if fid.xattr is None else b64(fid.xattr)}


def restore_session(server: NinePServer, r: StateReader) -> None:
    """Replace the server's session with the saved one, or raise SnapshotError (one line)
    and change nothing."""
    from kvmpy.ninep.server import MAX_FIDS, MIN_MSIZE, Fid

    msize = r.int("msize", 0, server.max_msize)
    if 0 < msize < MIN_MSIZE:
        raise r.fail("msize", f"{msize} is below {MIN_MSIZE}")
    fid_states = r.subs("fids", MAX_FIDS)
    devices = [_ints(r, "qid_devices", i, v, 2) for i, v in enumerate(r.list(
        "qid_devices", 1 << 16))]
    assigned = [_ints(r, "qid_assigned", i, v, 3) for i, v in enumerate(r.list(
        "qid_assigned", MAX_FIDS))]
    r.done()
    fids: dict[int, Fid] = {}
    nodes: dict[bytes, Node] = {b"": server.dir.root}
    try:
        for f in fid_states:
            number = f.int("fid", 0, wire.NOFID - 1)
            if number in fids:
                raise f.fail("fid", f"fid {number} saved twice")
            node = _walk(server, f, nodes)
            fid = fids[number] = Fid(node, f.int("uid", 0, U32))
            flags = f.optional_int("open", 0, U32)
            if flags is not None:
                _open(server, f, fid, flags)
            if not f.null("xattr"):
                fid.xattr = f.bytes("xattr", MAX_XATTR)
            f.done()
    except BaseException:
        for fid in fids.values():
            fid.close()
        _drop_unheld(nodes)
        raise
    _drop_unheld(nodes)
    server.reset()
    server.fids, server.msize = fids, msize
    server.dir.qid_path.prefixes = {dev: prefix for dev, prefix in devices}
    server.dir.qid_path.assigned = {(dev, ino): path for dev, ino, path in assigned}


def _walk(server: NinePServer, f: StateReader, nodes: dict[bytes, Node]) -> Node:
    """The fid's node: its path walked again from the root, and checked to be the file
    it was (nodes already walked are shared, as the server's own walks share parents)."""
    path = f.bytes("path", MAX_PATH)
    node = nodes[b""]
    names = path.split(b"/") if path else []
    for depth, name in enumerate(names):
        if not name or b"\0" in name or name in (b".", b".."):
            raise f.fail("path", f"{_show(path)}: not a path of names")
        prefix = b"/".join(names[:depth + 1])
        nxt = nodes.get(prefix)
        if nxt is None:
            try:
                nxt = nodes[prefix] = server.dir.lookup(node, name)
            except OSError as e:
                raise f.fail("path", f"{_shown(server, prefix)}: {e.strerror}: the shared "
                             "directory changed since the snapshot") from None
        node = nxt
    dev, ino = f.ints("file", 2, 0, U64, exact=2)
    st = os.fstat(node.fd)
    if (st.st_dev, st.st_ino) != (dev, ino):
        raise f.fail("file", f"{_shown(server, path)} is another file than at the snapshot "
                     "(replaced or renamed since)")
    return node


def _open(server: NinePServer, f: StateReader, fid: Fid, flags: int) -> None:
    """Open the fid's file as it was open (a directory for reading; O_TRUNC not again)."""
    if flags & ~OPEN_FLAGS:
        raise f.fail("open", f"{flags:#x} is not a set of flags a fid is opened with")
    writable = flags & (os.O_WRONLY | os.O_RDWR)
    if server.read_only and (writable or flags & (os.O_TRUNC | os.O_APPEND)):
        raise f.fail("open", "open for writing on a read-only share")
    mode = os.fstat(fid.node.fd).st_mode
    if stat.S_ISDIR(mode) != bool(flags & os.O_DIRECTORY) or not (
            stat.S_ISDIR(mode) or stat.S_ISREG(mode)) or (stat.S_ISDIR(mode) and writable):
        raise f.fail("open", f"{flags:#x} is not how a fid opens this kind of file")
    try:
        fid.fd = server.dir.reopen(fid.node, flags & ~os.O_TRUNC)
    except OSError as e:
        raise f.fail("open", f"cannot open it again: {e.strerror}") from None
    fid.flags = flags
    fid.writable = bool(writable)


def _drop_unheld(nodes: dict[bytes, Node]) -> None:
    """Close the nodes the walks made that no fid and no other node holds."""
    for path, node in nodes.items():
        if path and node.refs == 0 and node.fd >= 0:  # (a closed one: released by a child)
            node.hold()
            node.release()


def _ints(r: StateReader, key: str, index: int, value: object, n: int) -> list[int]:
    return StateReader({"v": value}, f"{r.where}.{key}[{index}]").ints("v", n, 0, U64,
                                                                          exact=n)


def _show(path: bytes) -> str:
    return repr(path[:200].decode(errors="replace"))


def _shown(server: NinePServer, path: bytes) -> str:
    return os.path.join(server.dir.path, path[:200].decode(errors="replace"))
