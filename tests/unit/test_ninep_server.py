"""The 9P2000.L server driven directly (no KVM, no virtio): protocol, data, confinement.

Every confinement case is here as a unit test ('..', absolute and relative symlinks,
a symlink swapped in during a walk, hard links, device nodes, read-only shares); the lab
test tests/lab/test_share.py tries the same escapes from a Linux guest.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.ninep import wire
from kvmpy.ninep.client import Client, RemoteError, mount, pack, tmessage
from kvmpy.ninep.hostdir import HostDir, QidPaths
from kvmpy.ninep.server import (
    AT_REMOVEDIR,
    ATTR_ATIME,
    ATTR_ATIME_SET,
    ATTR_GID,
    ATTR_MODE,
    ATTR_MTIME,
    ATTR_MTIME_SET,
    ATTR_SIZE,
    LOCK_BLOCKED,
    LOCK_SUCCESS,
    LOCK_UNLCK,
    LOCK_WRLCK,
    MAX_MSIZE,
    BufferTransfer,
    NinePServer,
)

ROOT = 1
RDONLY, WRONLY, RDWR, TRUNC, CREATE_EXCL = 0, 1, 2, 0o1000, 0o200
IS_ROOT = os.geteuid() == 0


@pytest.fixture(params=[True, False], ids=["openat2", "openat"])
def tree(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, Path, bool]]:
    """share/ (files, a subdirectory, symlinks pointing out) and outside/secret beside it."""
    share, outside = tmp_path / "share", tmp_path / "outside"
    (share / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("host secret\n")
    (share / "hello.txt").write_text("hello from the host\n")
    (share / "sub" / "inner.txt").write_text("inner\n")
    (share / "abs").symlink_to(outside)  # absolute, out of the share
    (share / "rel").symlink_to("../outside")  # relative, out of the share
    (share / "abs_secret").symlink_to(outside / "secret")
    yield share, outside, request.param


@pytest.fixture
def server(tree: tuple[Path, Path, bool]) -> Iterator[NinePServer]:
    share, _, openat2 = tree
    s = NinePServer(str(share), use_openat2=openat2)
    yield s
    s.close()


@pytest.fixture
def c(server: NinePServer) -> Client:
    return mount(server, ROOT)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def errno_of(fn, *args, **kw) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(RemoteError) as info:
        fn(*args, **kw)
    return int(info.value.errno)


# -- session ------------------------------------------------------------------------------

def test_version_negotiates_msize_and_resets_the_session(server: NinePServer) -> None:
    c = Client(server)
    assert c.version(1 << 24) == (MAX_MSIZE, b"9P2000.L")
    assert c.version(8192) == (8192, b"9P2000.L")
    c.attach(ROOT)
    assert ROOT in server.fids
    assert c.version(8192, b"9P2000.u")[1] == b"unknown"  # Tversion clunks every fid
    assert not server.fids
    assert errno_of(c.version, 1024) == errno.EMSGSIZE  # Linux's client needs 4096


def test_requests_before_tversion_are_refused(server: NinePServer) -> None:
    assert errno_of(Client(server).attach, ROOT) == errno.EPROTO


def test_attach_gives_the_root_and_refuses_a_fid_in_use(c: Client, tree) -> None:  # type: ignore[no-untyped-def]
    share = tree[0]
    qid = c.walk(ROOT, 2)  # clone
    assert qid == []
    assert c.getattr(2)["qid"][2] == os.stat(share).st_ino
    assert errno_of(c.attach, ROOT) == errno.EINVAL
    assert errno_of(c.walk, ROOT, 2) == errno.EINVAL  # newfid in use


# -- walking and confinement ------------------------------------------------------------------

def test_walk_returns_a_qid_per_name_and_stops_at_the_first_missing(c: Client) -> None:
    qids = c.walk(ROOT, 2, b"sub", b"inner.txt")
    assert [q[0] for q in qids] == [wire.QTDIR, wire.QTFILE]
    assert c.walk(ROOT, 3, b"sub", b"nope", b"x") == [qids[0]]  # partial: newfid unused
    assert errno_of(c.walk, 3, 4) == errno.EBADF
    assert errno_of(c.walk, ROOT, 3, b"nope") == errno.ENOENT


def test_dotdot_at_the_root_stays_at_the_root(c: Client, tree) -> None:  # type: ignore[no-untyped-def]
    share, outside, _ = tree
    root_ino = os.stat(share).st_ino
    qids = c.walk(ROOT, 2, b"..", b"..", b"..")
    assert [q[2] for q in qids] == [root_ino] * 3
    # the share's real parent holds outside/; '..' never reaches it
    assert [q[2] for q in c.walk(ROOT, 3, b"..", b"outside")] == [root_ino]  # partial
    assert 3 not in c.server.fids
    assert c.walk(ROOT, 4, b"sub", b"..", b"hello.txt")[-1][2] == \
        os.stat(share / "hello.txt").st_ino


def test_names_with_a_slash_or_nul_never_resolve(c: Client) -> None:
    for name in (b"../outside", b"sub/inner.txt", b"/etc", b"hello.txt\0", b""):
        assert errno_of(c.walk, ROOT, 2, name) == errno.ENOENT


def test_absolute_and_relative_symlinks_are_never_followed(c: Client, tree) -> None:  # type: ignore[no-untyped-def]
    _, outside, _ = tree
    for link in (b"abs", b"rel"):
        (qid,) = c.walk(ROOT, 2, link)
        assert qid[0] == wire.QTSYMLINK
        assert c.readlink(2) == os.fsencode(os.readlink(tree[0] / link.decode()))
        assert c.walk(ROOT, 3, link, b"secret") == [qid]  # partial: ENOTDIR inside
        assert 3 not in c.server.fids
        assert errno_of(c.lopen, 2) == errno.ELOOP
        c.clunk(2)
    c.walk(ROOT, 2, b"abs_secret")
    assert errno_of(c.lopen, 2, RDONLY) == errno.ELOOP
    assert c.getattr(2)["size"] == len(os.fsencode(outside / "secret"))  # the link's own
    assert (outside / "secret").read_text() == "host secret\n"


def test_a_symlink_swapped_in_during_a_walk_is_not_followed(c: Client, server: NinePServer,
                                                            tree, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    share, outside, _ = tree
    real = server.dir.lookup

    def lookup_then_swap(parent, name):  # type: ignore[no-untyped-def]
        node = real(parent, name)
        if name == b"hello.txt":  # between two components of one Twalk
            (share / "sub").rename(share / "sub.real")
            (share / "sub").symlink_to(outside)
        return node

    monkeypatch.setattr(server.dir, "lookup", lookup_then_swap)
    qids = c.walk(ROOT, 2, b"hello.txt", b"..", b"sub", b"secret")
    assert len(qids) == 3 and qids[2][0] == wire.QTSYMLINK  # stopped at the symlink
    assert 2 not in server.fids


def test_a_fid_keeps_its_directory_when_a_symlink_replaces_the_name(c: Client,
                                                                     tree) -> None:  # type: ignore[no-untyped-def]
    share, outside, _ = tree
    c.walk(ROOT, 2, b"sub")
    (share / "sub").rename(share / "sub.moved")
    (share / "sub").symlink_to(outside)  # the host swaps the name after the walk
    c.walk(2, 3, b"inner.txt")  # still the directory the fid reached, by fd
    c.lopen(3)
    assert c.read(3) == b"inner\n"
    assert errno_of(c.walk, 2, 4, b"secret") == errno.ENOENT


def test_create_on_a_symlink_to_the_outside_never_writes_there(c: Client, tree) -> None:  # type: ignore[no-untyped-def]
    _, outside, _ = tree
    c.walk(ROOT, 2)
    assert errno_of(c.lcreate, 2, b"abs_secret", RDWR | TRUNC) in (errno.ELOOP, errno.EEXIST)
    c.walk(ROOT, 3)
    assert errno_of(c.mkdir, 3, b"abs") == errno.EEXIST
    assert errno_of(c.lcreate, 3, b"..", RDWR) == errno.EEXIST
    assert errno_of(c.lcreate, 3, b"a/b", RDWR) == errno.EINVAL
    assert (outside / "secret").read_text() == "host secret\n"


def test_hard_links_are_made_between_names_in_the_share_only(c: Client, tree) -> None:  # type: ignore[no-untyped-def]
    share, outside, _ = tree
    c.walk(ROOT, 2, b"hello.txt")
    c.link(ROOT, 2, b"hard.txt")
    assert os.stat(share / "hard.txt").st_ino == os.stat(share / "hello.txt").st_ino
    # linking a symlink that points out links the symlink, not what it points at
    c.walk(ROOT, 3, b"abs_secret")
    c.link(ROOT, 3, b"hard_link_to_link")
    assert os.path.islink(share / "hard_link_to_link")
    assert os.stat(outside / "secret").st_nlink == 1
    assert errno_of(c.link, ROOT, 2, b"../escape") == errno.EINVAL
    assert errno_of(c.link, ROOT, 2, b"..") == errno.EEXIST
    assert not (share.parent / "escape").exists()


@pytest.mark.skipif(not IS_ROOT, reason="making a device node needs root")
def test_device_nodes_are_never_opened_or_made(c: Client, tree) -> None:  # type: ignore[no-untyped-def]
    share = tree[0]
    os.mknod(share / "mem", stat.S_IFCHR | 0o666, os.makedev(1, 1))  # the host's /dev/mem
    os.mkfifo(share / "fifo")
    (qid,) = c.walk(ROOT, 2, b"mem")
    attrs = c.getattr(2)
    assert stat.S_ISCHR(attrs["mode"]) and attrs["rdev"] == (1 << 8 | 1)  # type: ignore
    for flags in (RDONLY, RDWR):
        assert errno_of(c.lopen, 2, flags) == errno.EPERM
    c.walk(ROOT, 3, b"fifo")
    assert errno_of(c.lopen, 3, WRONLY) == errno.EPERM  # would block the server
    c.walk(ROOT, 4)
    assert errno_of(c.lcreate, 4, b"mem", RDWR) == errno.EEXIST  # exists: never opened
    c.walk(ROOT, 5)
    assert errno_of(c.lcreate, 5, b"fifo", WRONLY) == errno.EEXIST
    assert errno_of(c.mknod, ROOT, b"kmem", stat.S_IFCHR | 0o600, 1, 2) == errno.EPERM
    assert errno_of(c.mknod, ROOT, b"sda", stat.S_IFBLK | 0o600, 8, 0) == errno.EPERM
    c.mknod(ROOT, b"pipe", stat.S_IFIFO | 0o600)
    assert stat.S_ISFIFO(os.lstat(share / "pipe").st_mode)
    assert not (share / "kmem").exists() and not (share / "sda").exists()


def test_set_id_bits_never_reach_a_regular_file(c: Client, tree) -> None:  # type: ignore[no-untyped-def]
    share = tree[0]
    c.walk(ROOT, 2)
    c.lcreate(2, b"prog", RDWR, 0o6755)
    assert stat.S_IMODE(os.stat(share / "prog").st_mode) == 0o755
    c.setattr(2, ATTR_MODE, mode=0o4711)
    assert stat.S_IMODE(os.stat(share / "prog").st_mode) == 0o711
    c.mkdir(ROOT, b"dir", 0o2775)  # set-group-ID on a directory is kept
    assert stat.S_IMODE(os.stat(share / "dir").st_mode) == 0o2775


def test_a_read_only_share_refuses_every_change(tree) -> None:  # type: ignore[no-untyped-def]
    share, _, openat2 = tree
    before = sorted((p, p.lstat().st_mtime_ns) for p in share.rglob("*"))
    server = NinePServer(str(share), read_only=True, use_openat2=openat2)
    c = mount(server, ROOT)
    c.walk(ROOT, 2, b"hello.txt")
    c.walk(ROOT, 3, b"hello.txt")
    c.lopen(3, RDONLY)
    assert c.read(3) == b"hello from the host\n"  # reading works
    c.walk(ROOT, 4)
    refused = [
        lambda: c.lopen(2, WRONLY), lambda: c.lopen(2, RDWR), lambda: c.lopen(2, TRUNC),
        lambda: c.write(3, b"x"), lambda: c.lcreate(4, b"new", RDWR),
        lambda: c.mkdir(ROOT, b"d"), lambda: c.symlink(ROOT, b"l", b"x"),
        lambda: c.mknod(ROOT, b"p", stat.S_IFIFO | 0o600), lambda: c.link(ROOT, 2, b"h"),
        lambda: c.rename(2, ROOT, b"moved"), lambda: c.renameat(ROOT, b"hello.txt", ROOT, b"m"),
        lambda: c.unlinkat(ROOT, b"hello.txt"), lambda: c.unlinkat(ROOT, b"sub", AT_REMOVEDIR),
        lambda: c.setattr(2, ATTR_MODE, mode=0o600), lambda: c.setattr(2, ATTR_SIZE, size=0),
        lambda: c.setattr(2, ATTR_MTIME | ATTR_MTIME_SET, mtime=(1, 0)),
        lambda: c.remove(2),
    ]
    for attempt in refused:
        assert errno_of(attempt) == errno.EROFS
    assert sorted((p, p.lstat().st_mtime_ns) for p in share.rglob("*")) == before
    server.close()


# -- data -------------------------------------------------------------------------------

def test_create_write_read_back_and_see_it_on_the_host(c: Client, tree) -> None:  # type: ignore[no-untyped-def]
    share = tree[0]
    c.walk(ROOT, 2, b"sub")
    qid = c.lcreate(2, b"new.bin", RDWR, 0o640, gid=os.getgid())
    data = os.urandom(100_000)
    done = 0
    while done < len(data):
        done += c.write(2, data[done:done + 30_000], done)
    assert (share / "sub" / "new.bin").read_bytes() == data
    assert stat.S_IMODE(os.stat(share / "sub" / "new.bin").st_mode) == 0o640
    got = b""
    while chunk := c.read(2, len(got), 8192):
        got += chunk
    assert got == data and qid[2] == os.stat(share / "sub" / "new.bin").st_ino
    c.fsync(2)
    assert errno_of(c.lcreate, 2, b"again", RDWR) == errno.EINVAL  # already open


def test_lcreate_of_an_existing_file_opens_it_unless_exclusive(c: Client, tree) -> None:  # type: ignore[no-untyped-def]
    c.walk(ROOT, 2)
    c.lcreate(2, b"hello.txt", RDWR)
    assert c.read(2, 0, 100) == b"hello from the host\n"
    c.walk(ROOT, 3)
    assert errno_of(c.lcreate, 3, b"hello.txt", RDWR | CREATE_EXCL) == errno.EEXIST
    c.walk(ROOT, 4)
    assert errno_of(c.lcreate, 4, b"sub", RDWR) == errno.EISDIR


def test_reads_fit_the_reply_room_and_msize(server: NinePServer, tree) -> None:  # type: ignore[no-untyped-def]
    share = tree[0]
    (share / "big").write_bytes(bytes(range(256)) * 1024)
    c = mount(server, ROOT, msize=8192)
    c.walk(ROOT, 2, b"big")
    c.lopen(2)
    assert len(c.read(2, 0, 100_000)) == 8192 - 1 - wire.RREAD_HEADER  # below msize
    raw = c.raw(tmessage(wire.TREAD, 9, pack("dqd", 2, 0, 5000)), reply_room=100)
    assert struct.unpack_from("<IBHI", raw) == (100, wire.RREAD, 9, 89)
    assert raw[11:] == (bytes(range(256)) * 2)[:89]
    assert c.read(2, 1 << 40, 100) == b""  # past the end
    assert errno_of(c.read, 2, 1 << 63, 10) == errno.EINVAL


def test_twrite_writes_what_the_message_carries(server: NinePServer, tree) -> None:  # type: ignore[no-untyped-def]
    share = tree[0]
    c = mount(server, ROOT)
    c.walk(ROOT, 2)
    c.lcreate(2, b"w", RDWR)
    # count says 1000; the message carries 10 bytes (Linux's zero-copy path can do this)
    msg = tmessage(wire.TWRITE, 3, pack("dqd", 2, 0, 1000) + b"0123456789")
    raw = c.raw(msg)
    assert struct.unpack_from("<IBHI", raw) == (11, wire.TWRITE + 1, 3, 10)
    assert (share / "w").read_bytes() == b"0123456789"


def test_readdir_lists_every_entry_once_however_small_the_count(c: Client, tree) -> None:  # type: ignore[no-untyped-def]
    share = tree[0]
    names = {f"f{i:03d}-{'x' * (i % 40)}" for i in range(300)}
    for name in names:
        (share / "sub" / name).write_bytes(b"")
    c.walk(ROOT, 2, b"sub")
    c.lopen(2)
    seen, offset = [], 0
    while entries := c.readdir(2, offset, 200):
        seen += [e[3].decode() for e in entries]
        offset = entries[-1][1]
    assert sorted(seen) == sorted(names | {".", "..", "inner.txt"})
    entries = {e[3]: e for e in c.readdir(2, 0, 65536)}
    inner = entries[b"inner.txt"]
    assert inner[0][2] == os.stat(share / "sub" / "inner.txt").st_ino and inner[2] == 8
    assert entries[b".."][0][2] == os.stat(share).st_ino
    c.walk(ROOT, 3, b"hello.txt")
    assert errno_of(c.readdir, 3) == errno.EBADF  # not open


def test_getattr_setattr_statfs(c: Client, tree) -> None:  # type: ignore[no-untyped-def]
    share = tree[0]
    path = share / "hello.txt"
    c.walk(ROOT, 2, b"hello.txt")
    st, got = os.lstat(path), c.getattr(2)
    assert (got["mode"], got["uid"], got["gid"], got["nlink"], got["size"]) == (
        st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size)
    assert got["mtime_sec"] * 10**9 + got["mtime_nsec"] == st.st_mtime_ns  # type: ignore
    c.setattr(2, ATTR_MODE, mode=0o600)
    c.setattr(2, ATTR_SIZE, size=5)
    c.setattr(2, ATTR_ATIME | ATTR_ATIME_SET | ATTR_MTIME | ATTR_MTIME_SET,
              atime=(1_000_000, 5), mtime=((-86400) & (2**64 - 1), 7))  # before 1970
    st = os.lstat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and path.read_bytes() == b"hello"
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000 * 10**9 + 5, -86400 * 10**9 + 7)
    got = c.getattr(2)
    assert got["mtime_sec"] == (-86400) & (2**64 - 1)
    c.setattr(2, ATTR_GID, gid=os.getgid())
    c.setattr(2, ATTR_MTIME)  # "now"
    assert os.lstat(path).st_mtime_ns > st.st_mtime_ns
    fs = c.statfs(ROOT)
    assert fs[0] == 0x01021997 and fs[1] == os.statvfs(share).f_bsize and fs[8] == 255


def test_rename_remove_unlink(c: Client, tree) -> None:  # type: ignore[no-untyped-def]
    share = tree[0]
    c.walk(ROOT, 2, b"hello.txt")
    c.walk(ROOT, 3, b"sub")
    c.rename(2, 3, b"moved.txt")
    assert (share / "sub" / "moved.txt").exists() and not (share / "hello.txt").exists()
    c.rename(2, ROOT, b"back.txt")  # the fid followed its file
    c.renameat(ROOT, b"back.txt", 3, b"again.txt")
    c.walk(3, 4, b"again.txt")
    c.remove(4)
    assert not (share / "sub" / "again.txt").exists() and 4 not in c.server.fids
    c.mkdir(ROOT, b"d")
    assert errno_of(c.unlinkat, ROOT, b"d") == errno.EISDIR
    c.unlinkat(ROOT, b"d", AT_REMOVEDIR)
    assert errno_of(c.unlinkat, ROOT, b"..", AT_REMOVEDIR) == errno.EINVAL
    assert errno_of(c.unlinkat, ROOT, b"sub", 0x1234) == errno.EINVAL
    c.walk(ROOT, 5)
    assert errno_of(c.remove, 5) == errno.EBUSY  # the root; the fid is clunked anyway
    assert 5 not in c.server.fids


def test_a_name_renamed_on_the_host_is_not_renamed_blindly(c: Client, tree) -> None:  # type: ignore[no-untyped-def]
    share = tree[0]
    c.walk(ROOT, 2, b"hello.txt")
    (share / "hello.txt").rename(share / "elsewhere.txt")
    (share / "hello.txt").write_text("a different file\n")
    assert errno_of(c.rename, 2, ROOT, b"x") == errno.ESTALE
    assert errno_of(c.remove, 2) == errno.ESTALE
    assert (share / "hello.txt").read_text() == "a different file\n"


def test_symlink_mknod_readlink(c: Client, tree) -> None:  # type: ignore[no-untyped-def]
    share = tree[0]
    qid = c.symlink(ROOT, b"link", b"/anywhere/at/all")
    assert qid[0] == wire.QTSYMLINK and os.readlink(share / "link") == "/anywhere/at/all"
    assert errno_of(c.symlink, ROOT, b"bad", b"") == errno.ENOENT
    c.mknod(ROOT, b"sock", stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK(os.lstat(share / "sock").st_mode)


def test_xattrs_are_an_empty_list(c: Client) -> None:
    assert c.xattrwalk(ROOT, 2, b"") == 0
    assert c.read(2, 0, 100) == b""
    c.clunk(2)
    assert errno_of(c.xattrwalk, ROOT, 2, b"user.comment") == errno.ENODATA
    assert errno_of(c.xattrcreate, ROOT, b"user.x", 3) == errno.EOPNOTSUPP


def test_locks_conflict_between_two_opens(c: Client) -> None:
    for fid in (2, 3):
        c.walk(ROOT, fid, b"hello.txt")
        c.lopen(fid, RDWR)
    assert c.lock(2, LOCK_WRLCK) == LOCK_SUCCESS
    assert c.lock(3, LOCK_WRLCK) == LOCK_BLOCKED
    assert c.getlock(3, LOCK_WRLCK)[0] == LOCK_WRLCK
    assert c.lock(2, LOCK_UNLCK) == LOCK_SUCCESS
    assert c.lock(3, LOCK_WRLCK) == LOCK_SUCCESS
    assert c.getlock(3, LOCK_WRLCK)[0] == LOCK_UNLCK  # its own lock does not conflict


def test_clunking_releases_every_host_fd(server: NinePServer) -> None:
    before = open_fds()
    c = mount(server, ROOT)
    for i in range(20):
        c.walk(ROOT, 100 + i, b"sub", b"..", b"sub", b"inner.txt")
        c.lopen(100 + i)
        c.walk(ROOT, 200 + i, b"sub", b"nope")  # partial walks leave nothing behind
        c.walk(ROOT, 300 + i, b"sub", b"..", b"..", b"hello.txt")
    assert open_fds() > before
    for i in range(20):
        c.clunk(100 + i)
        c.clunk(300 + i)
    c.clunk(ROOT)
    assert open_fds() == before
    assert not server.fids


def test_tversion_and_reset_close_every_fd(server: NinePServer) -> None:
    before = open_fds()
    c = mount(server, ROOT)
    c.walk(ROOT, 2, b"sub", b"inner.txt")
    c.lopen(2)
    c.version()
    assert open_fds() == before


def test_flush_and_unknown_messages(c: Client) -> None:
    c.flush(7)
    raw = c.raw(tmessage(112, 5, pack("db", ROOT, 0)))  # 9P2000's Topen
    assert raw == wire.lerror(5, errno.EOPNOTSUPP)


def test_qid_paths_stay_unique_across_devices() -> None:
    paths = QidPaths(root_dev=10)
    assert paths(10, 5) == 5
    other = paths(11, 5)
    assert other != 5 and paths(11, 5) == other
    big = paths(10, 1 << 50)
    assert big not in (5, other) and paths(10, 1 << 50) == big


def test_hostdir_refuses_what_is_not_a_directory(tmp_path: Path) -> None:
    from kvmpy.errors import ConfigError

    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError):
        HostDir(str(tmp_path / "f"))
    with pytest.raises(ConfigError):
        HostDir(str(tmp_path / "missing"))


# -- malformed messages --------------------------------------------------------------------

def _answer(server: NinePServer, msg: bytes, room: int = 65536) -> bytes:
    io = BufferTransfer(msg, room)
    head, placed = server.handle(msg, io)
    return head + bytes(io.reply[len(head):len(head) + placed])


VALID = [
    (wire.TWALK, pack("ddw", ROOT, 2, 2) + pack("s", b"sub") + pack("s", b"inner.txt")),
    (wire.TLCREATE, pack("dsddd", ROOT, b"file", RDWR, 0o644, 0)),
    (wire.TSETATTR, pack("dddddqqqqq", ROOT, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
    (wire.TRENAMEAT, pack("dsds", ROOT, b"a", ROOT, b"b")),
    (wire.TLOCK, pack("dbdqqds", ROOT, 0, 0, 0, 0, 1, b"client")),
    (wire.TSYMLINK, pack("dssd", ROOT, b"l", b"target", 0)),
    (wire.TREAD, pack("dqd", ROOT, 0, 10)),
    (wire.TWRITE, pack("dqd", ROOT, 0, 3) + b"abc"),
]


@pytest.mark.parametrize("mtype,body", VALID, ids=[str(t) for t, _ in VALID])
def test_every_truncation_of_a_message_is_an_rlerror(server: NinePServer, mtype: int,
                                                     body: bytes) -> None:
    mount(server, ROOT)
    full = tmessage(mtype, 7, body)
    for cut in range(len(full)):
        # the driver gave `cut` bytes but the size field says more: EINVAL, tag kept
        reply = _answer(server, full[:cut])
        tag = 7 if cut >= wire.HEADER_SIZE else wire.NOTAG
        assert reply == wire.lerror(tag, errno.EINVAL), (cut, reply)
        # a size field that ends inside a field: EINVAL too (never a short read)
        if wire.HEADER_SIZE <= cut < len(full):
            short = struct.pack("<I", cut) + full[4:cut]
            assert _answer(server, short)[4] == wire.RLERROR


def test_strings_longer_than_their_message_are_rlerror(server: NinePServer) -> None:
    mount(server, ROOT)
    msg = tmessage(wire.TWALK, 3, pack("ddw", ROOT, 2, 1) + struct.pack("<H", 500) + b"sub")
    assert _answer(server, msg) == wire.lerror(3, errno.EINVAL)
    msg = tmessage(wire.TWALK, 3, pack("ddw", ROOT, 2, 17) + pack("s", b"x") * 17)
    assert _answer(server, msg) == wire.lerror(3, errno.EINVAL)


def test_no_room_for_a_reply(server: NinePServer) -> None:
    mount(server, ROOT)
    msg = tmessage(wire.TGETATTR, 4, pack("dq", ROOT, 0x7FF))
    assert _answer(server, msg, room=30) == wire.lerror(4, errno.EMSGSIZE)
    assert server.handle(msg, BufferTransfer(msg, 5)) == (b"", 0)


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _fields() -> st.SearchStrategy[bytes]:
    """Message bodies: real fids and small numbers mostly, with strings that may lie."""
    fid = st.sampled_from([ROOT, 2, 3, wire.NOFID, 0x12345678])
    u32 = st.one_of(fid, st.integers(0, 2**32 - 1))
    u64 = st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1))
    name = st.one_of(st.sampled_from([b"sub", b"..", b".", b"abs", b"hello.txt", b"", b"a/b"]),
                     st.binary(max_size=12))
    string = st.one_of(name.map(lambda s: struct.pack("<H", len(s)) + s),
                       st.tuples(st.integers(0, 0xFFFF), name).map(
                           lambda t: struct.pack("<H", t[0]) + t[1]))
    part = st.one_of(u32.map(lambda v: struct.pack("<I", v)),
                     u64.map(lambda v: struct.pack("<Q", v)),
                     st.integers(0, 0xFFFF).map(lambda v: struct.pack("<H", v)),
                     st.integers(0, 255).map(lambda v: bytes([v])), string)
    return st.lists(part, max_size=10).map(b"".join)


TYPES = sorted({*range(6, 128, 2)} | {wire.TVERSION, wire.TATTACH})


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(mtype=st.one_of(st.sampled_from(TYPES), st.integers(0, 255)), tag=st.integers(0, 0xFFFF),
       body=_fields(), size_delta=st.sampled_from([0, 0, 0, -1, 1, 5, -9]),
       room=st.sampled_from([65536, 11, 7, 200]))
def test_any_message_gets_a_well_formed_reply_and_never_an_exception(
        tmp_path_factory: pytest.TempPathFactory, mtype: int, tag: int, body: bytes,
        size_delta: int, room: int) -> None:
    # a share of its own each time: a message before may have removed or renamed "sub"
    share = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp(), prefix="fuzzshare"))
    (share / "sub").mkdir()
    (share / "hello.txt").write_text("hi")
    (share / "abs").symlink_to("/etc")
    server = NinePServer(str(share))
    trap = _ErrorLog()
    logger = logging.getLogger("kvmpy.ninep")
    logger.addHandler(trap)
    try:
        c = mount(server, ROOT)
        c.walk(ROOT, 2, b"sub")
        msg = tmessage(mtype, tag, body)
        size = max(0, len(msg) + size_delta)
        msg = struct.pack("<I", size) + msg[4:]
        head, placed = server.handle(msg, BufferTransfer(msg, room))
        if room < 11:
            assert head == b"" or len(head) <= room
        if head:
            rsize, rtype, rtag = struct.unpack_from("<IBH", head)
            assert rsize == len(head) + placed <= room
            assert rtype in (wire.RLERROR, mtype + 1)
            if rtype == wire.RLERROR:
                assert len(head) == 11
        assert not trap.records, trap.records[0].getMessage()
    finally:
        logger.removeHandler(trap)
        server.close()
        shutil.rmtree(share, ignore_errors=True)
