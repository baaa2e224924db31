"""A 9P session saved and restored (kvmpy.ninep.session): the guest's fids open again on
the same files in a new server, through a JSON round trip as a snapshot stores them; a
share that changed, and hostile session states, are refused in one line with nothing
left open."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmpy.errors import SnapshotError
from kvmpy.ninep.client import Client, mount
from kvmpy.ninep.server import NinePServer
from kvmpy.ninep.session import restore_session, session_state
from kvmpy.state.values import StateReader, b64

ROOT = 1
RDONLY, WRONLY, RDWR, TRUNC, DIRECTORY = 0, 1, 2, 0o1000, 0o200000


@pytest.fixture
def share(tmp_path: Path) -> Path:
    share = tmp_path / "share"
    (share / "sub").mkdir(parents=True)
    (share / "hello.txt").write_text("hello\n")
    (share / "sub" / "inner.txt").write_text("inner\n")
    return share


@pytest.fixture
def servers(share: Path) -> Iterator[list[NinePServer]]:
    made: list[NinePServer] = []
    yield made
    for s in made:
        s.close()


def new_server(servers: list[NinePServer], share: Path, **kw: Any) -> NinePServer:
    servers.append(NinePServer(str(share), **kw))
    return servers[-1]


def saved(server: NinePServer) -> dict[str, Any]:
    """The session as a snapshot holds it (JSON and back)."""
    return json.loads(json.dumps(session_state(server)))


def restore(server: NinePServer, state: dict[str, Any]) -> None:
    restore_session(server, StateReader(state, "session"))


def client_of(server: NinePServer, like: Client) -> Client:
    """A client that goes on where `like` was (same msize, next tags)."""
    c = Client(server, like.msize)
    c.tag = like.tag
    return c


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_every_fid_goes_on_in_a_new_server(servers: list[NinePServer], share: Path) -> None:
    old = new_server(servers, share)
    c = mount(old, ROOT)
    c.walk(ROOT, 2, b"sub", b"inner.txt")  # walked, not open
    c.walk(ROOT, 3, b"hello.txt")
    c.lopen(3, RDWR | TRUNC)  # truncated once, by the guest's open
    c.write(3, b"written before")
    c.walk(ROOT, 4, b"sub")
    c.lopen(4, DIRECTORY)
    c.xattrwalk(ROOT, 5, b"")
    qids = {fid: c.getattr(fid)["qid"] for fid in (ROOT, 2, 3, 4)}
    state = saved(old)

    new = new_server(servers, share)
    restore(new, state)
    n = client_of(new, c)
    assert new.msize == old.msize and sorted(new.fids) == [ROOT, 2, 3, 4, 5]
    assert {fid: n.getattr(fid)["qid"] for fid in (ROOT, 2, 3, 4)} == qids
    assert n.read(3, 0) == b"written before"  # open again, and not truncated again
    n.write(3, b" and after", 14)
    assert (share / "hello.txt").read_bytes() == b"written before and after"
    assert sorted(n.listdir(4)) == [b".", b"..", b"inner.txt"]
    n.lopen(2, RDONLY)
    assert n.read(2) == b"inner\n"
    assert new.fids[5].xattr == b""


def test_restoring_twice_holds_no_more_fds(servers: list[NinePServer], share: Path) -> None:
    old = new_server(servers, share)
    c = mount(old, ROOT)
    for fid in range(2, 12):
        c.walk(ROOT, fid, b"sub", b"inner.txt")
        c.lopen(fid, RDONLY)
    state = saved(old)
    new = new_server(servers, share)
    restore(new, state)
    before = open_fds()
    restore(new, state)  # the session it had is closed first
    assert open_fds() == before
    new.reset()
    assert open_fds() == before - 10 - 2  # ten open files, and sub/inner.txt's node and sub


@pytest.mark.parametrize("change", ["deleted", "replaced", "renamed", "directory gone"])
def test_a_share_that_changed_is_refused(servers: list[NinePServer], share: Path,
                                         change: str) -> None:
    old = new_server(servers, share)
    c = mount(old, ROOT)
    c.walk(ROOT, 2, b"hello.txt")
    c.walk(ROOT, 3, b"sub", b"inner.txt")
    c.lopen(3, RDONLY)
    state = saved(old)
    if change == "deleted":
        (share / "hello.txt").unlink()
    elif change == "replaced":
        (share / "hello.txt").unlink()
        (share / "hello.txt").write_text("another\n")
    elif change == "renamed":
        (share / "sub" / "inner.txt").rename(share / "sub" / "moved.txt")
    else:
        (share / "sub" / "inner.txt").unlink()
        (share / "sub").rmdir()
    new = new_server(servers, share)
    before = open_fds()
    with pytest.raises(SnapshotError, match="changed since the snapshot|another file than"):
        restore(new, state)
    assert open_fds() == before and not new.fids  # nothing half restored, nothing leaked


def hostile(state: dict[str, Any], index: int, **fields: Any) -> dict[str, Any]:
    state = json.loads(json.dumps(state))
    state["fids"][index].update(fields)
    return state


@pytest.mark.parametrize("edit, message", [
    (lambda s: hostile(s, 1, path=b64(b"sub/../hello.txt")), "not a path of names"),
    (lambda s: hostile(s, 1, path=b64(b"sub//inner.txt")), "not a path of names"),
    (lambda s: hostile(s, 1, path=b64(b"sub\0")), "not a path of names"),
    (lambda s: hostile(s, 1, path="%%%"), "not valid base64"),
    (lambda s: hostile(s, 1, file=[0, 0]), "another file than"),
    (lambda s: hostile(s, 1, open=0o777777777), "not a set of flags"),
    (lambda s: hostile(s, 2, open=RDWR), "not how a fid opens"),  # a directory, writable
    (lambda s: hostile(s, 1, open=DIRECTORY), "not how a fid opens"),  # a file as a directory
    (lambda s: hostile(s, 2, fid=2), "saved twice"),
    (lambda s: hostile(s, 1, uid=-1), "outside"),
    (lambda s: hostile(s, 1, extra=1), "unknown field"),
    (lambda s: s | {"msize": 100}, "below"),
    (lambda s: s | {"msize": 1 << 40}, "outside"),
    (lambda s: s | {"fids": "x"}, "expected a list"),
    (lambda s: s | {"qid_devices": [[1]]}, "expected 2|1 items"),
])
def test_hostile_sessions_are_refused_in_one_line(servers: list[NinePServer], share: Path,
                                                  edit: Any, message: str) -> None:
    old = new_server(servers, share)
    c = mount(old, ROOT)
    c.walk(ROOT, 2, b"hello.txt")
    c.lopen(2, RDONLY)
    c.walk(ROOT, 3, b"sub")
    state = saved(old)
    new = new_server(servers, share)
    before = open_fds()
    with pytest.raises(SnapshotError, match=message) as info:
        restore(new, edit(state))
    assert "\n" not in str(info.value)
    assert open_fds() == before and not new.fids


def test_a_read_only_share_never_opens_for_writing(servers: list[NinePServer],
                                                   share: Path) -> None:
    old = new_server(servers, share)
    c = mount(old, ROOT)
    c.walk(ROOT, 2, b"hello.txt")
    c.lopen(2, RDWR)
    state = saved(old)
    with pytest.raises(SnapshotError, match="read-only share"):
        restore(new_server(servers, share, read_only=True), state)
