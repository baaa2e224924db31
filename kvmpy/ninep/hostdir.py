"""A shared host directory as O_PATH file descriptors, each name resolved beneath its parent.

What it is: `HostDir`, the share's root and the rules for reaching anything under it, and
`Node`, one host file the guest has reached (an O_PATH fd, the node it was reached from
and its name there). A node is never found again by a path string: every later operation
uses its fd (`fstat`, `*at` calls with it as the directory, or a reopen through
/proc/self/fd, which lands on the very inode the fd holds, even a symlink, and never
follows one). So a name swapped for a symlink after it was walked changes nothing, and a
symlink is only ever read (Treadlink), never followed: the guest resolves it in its own
namespace.

One name at a time: `lookup(parent, name)` takes one component that has no "/" and no
NUL (the server checks) and opens it with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
| RESOLVE_NO_MAGICLINKS) where the kernel has openat2 (5.6+; Python has no wrapper, so
it is called through `kvmpy.libc`), else with openat(O_NOFOLLOW), which for one
component is as confined. ".." is lexical: the node it was reached from, and the root's
".." is the root, so no walk leaves the share by name.

`QidPaths` gives each (st_dev, st_ino) a unique qid.path even when several file systems
are mounted under the share (QEMU's multidevs=remap): the root's device keeps its inode
numbers, others get a prefix.

What it is not: the protocol (kvmpy.ninep.server), or a defence against the host itself:
a directory that a host process moves out of the share while the guest holds a fid for
it stays reachable through that fid (docs/9p.md, "Security model").
"""

from __future__ import annotations

import os
import resource
import stat

from kvmpy import libc
from kvmpy.errors import ConfigError
from kvmpy.ninep.wire import QTDIR, QTFILE, QTSYMLINK

_RESOLVE = libc.RESOLVE_BENEATH | libc.RESOLVE_NO_SYMLINKS | libc.RESOLVE_NO_MAGICLINKS

# A guest with a fid per cached dentry (cache=loose) holds thousands of O_PATH fds; like
# virtiofsd, raise the process's limit once instead of failing walks with EMFILE.
WANTED_NOFILE = 1 << 20


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE as far as allowed (root: to WANTED_NOFILE); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in ((WANTED_NOFILE, max(hard, WANTED_NOFILE)), (hard, hard)):
        if wanted[0] <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, wanted)
            return wanted[0]
        except (ValueError, OSError):
            continue
    return soft


class Node:
    """One host file reached by the guest: an O_PATH fd, held while fids or children use it.

    `parent` and `name` say where it was reached (for "..", Trename and Tremove);
    the root has neither. `refs` counts the fids and child nodes that hold it.
    """

    __slots__ = ("fd", "parent", "name", "refs")

    def __init__(self, fd: int, parent: Node | None, name: bytes) -> None:
        self.fd = fd
        self.parent = parent
        self.name = name
        self.refs = 0
        if parent is not None:
            parent.refs += 1

    def hold(self) -> Node:
        self.refs += 1
        return self

    def path(self) -> list[bytes]:
        """The names it was reached by, from the root's child down (the root: none)."""
        names, node = [], self
        while node.parent is not None:
            names.append(node.name)
            node = node.parent
        return names[::-1]

    def release(self) -> None:
        node: Node | None = self
        while node is not None:  # a loop, not recursion: chains can be 4096 deep
            node.refs -= 1
            if node.refs > 0 or node.parent is None:
                return  # the root's fd belongs to the HostDir
            os.close(node.fd)
            node.fd = -1
            node = node.parent


class QidPaths:
    """A unique 64-bit qid.path for each (st_dev, st_ino) under the share."""

    INO_BITS = 48
    OVERFLOW = 0xFFFF  # prefix of numbers handed out one by one

    def __init__(self, root_dev: int) -> None:
        self.prefixes = {root_dev: 0}
        self.assigned: dict[tuple[int, int], int] = {}

    def __call__(self, dev: int, ino: int) -> int:
        prefix = self.prefixes.get(dev)
        if prefix is None:
            prefix = min(len(self.prefixes), self.OVERFLOW)
            self.prefixes[dev] = prefix
        if prefix < self.OVERFLOW and ino < 1 << self.INO_BITS:
            return prefix << self.INO_BITS | ino
        key = (dev, ino)
        path = self.assigned.get(key)
        if path is None:
            path = self.OVERFLOW << self.INO_BITS | len(self.assigned)
            self.assigned[key] = path
        return path


_QID_TYPES = {stat.S_IFDIR: QTDIR, stat.S_IFLNK: QTSYMLINK}


def qid_type(mode: int) -> int:
    return _QID_TYPES.get(stat.S_IFMT(mode), QTFILE)


class HostDir:
    """The share: its root node, /proc/self/fd for reopening nodes, and qid numbering."""

    def __init__(self, path: str, *, use_openat2: bool | None = None) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"share {path}: {e.strerror}") from None
        try:
            self.proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            os.close(fd)
            raise ConfigError(f"share {path}: /proc/self/fd is needed to reopen files "
                              f"({e.strerror}); is /proc mounted?") from None
        self.path = path
        self.root = Node(fd, None, b"")
        self.root.refs = 1  # the HostDir's own reference: the root is never closed by fids
        self.qid_path = QidPaths(os.fstat(fd).st_dev)
        self.openat2 = _probe_openat2(fd) if use_openat2 is None else use_openat2

    def close(self) -> None:
        for fd in (self.root.fd, self.proc_fd):
            if fd >= 0:
                os.close(fd)
        self.root.fd = self.proc_fd = -1

    # -- resolving ------------------------------------------------------------------------
    def open_beneath(self, dirfd: int, name: bytes, flags: int, mode: int = 0) -> int:
        """openat of ONE component `name` in `dirfd`, never following a symlink.

        A trailing symlink opens as itself with O_PATH, else fails with ELOOP.
        """
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        if self.openat2:
            return libc.openat2(dirfd, name, flags, mode, _RESOLVE)
        return os.open(name, flags, mode, dir_fd=dirfd)

    def lookup(self, parent: Node, name: bytes) -> Node:
        """The node `name` names in `parent`: ".." and "." lexically, others opened."""
        if name == b"..":
            return parent.parent or parent
        if name == b".":
            return parent
        fd = self.open_beneath(parent.fd, name, os.O_PATH)
        return Node(fd, parent, name)

    def reopen(self, node: Node, flags: int) -> int:
        """A real open file for `node`'s inode (through /proc/self/fd: no path is resolved)."""
        return os.open(str(node.fd), flags | os.O_CLOEXEC, dir_fd=self.proc_fd)

    def proc_name(self, node: Node) -> str:
        """`node` as a name in `proc_fd`: chown/chmod/utime/link on it act on the inode the
        fd holds (for a symlink node, the symlink itself)."""
        return str(node.fd)

    def qid(self, st: os.stat_result) -> tuple[int, int, int]:
        """(type, version, path). The version is 0: Linux compares it to decide whether a
        looked-up inode is one it has, and a changing version would give one file two."""
        return _QID_TYPES.get(st.st_mode & 0o170000, QTFILE), 0, self.qid_path(st.st_dev,
                                                                               st.st_ino)


def _probe_openat2(dirfd: int) -> bool:
    """Does this kernel have openat2 (5.6+), and may we call it (no seccomp filter)?"""
    try:
        fd = libc.openat2(dirfd, b".", os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE)
    except OSError:
        return False
    os.close(fd)
    return True
