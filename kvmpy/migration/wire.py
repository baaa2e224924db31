"""The migration stream's bytes, and the addresses it travels between.

What it is: the framing both ends speak over one stream socket (docs/migration.md is
the reference, field by field):

    hello        8 bytes b"KVMPYMIG", u32 version, then a message (below): the
                 sender's kvmpy version and its machine (kvmpy.migration.agree)
    hello back   a message from the destination: its machine and {"ok": true}, or
                 {"ok": false, "error": one line}; nothing else moves unless ok
    records      u8 kind, u32 count, u64 gpa (13 bytes), then per kind:
                   PAGES  count pages of guest RAM from gpa, 4 KiB each
                   ZEROS  count pages from gpa are zero (no payload)
                   ROUND  a pre-copy round begins (count: its number)
                   STATE  count bytes of saved state (kvmpy.state.stream's format)
                   END    the last record
    reply        a message from the destination: {"status": "running"} once it has
                 every part and is about to run the guest, or {"status": "failed",
                 "error": one line}

A message is a u32 length and that many bytes of a JSON object (at most MAX_MESSAGE).
All integers little-endian. The guest's RAM goes straight between guest memory and the
socket (`sendall` of a window of guest RAM, `recv_into` one), never through a copy.

What it is not: a check of what the values mean. `Reader` refuses what cannot be a
stream (bad magic, kind, length or address) with a one-line MigrationError; what the
state says is checked by every part's own restore, as for a snapshot.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any, NamedTuple

from kvmpy.errors import ConfigError, KvmpyError

MAGIC = b"KVMPYMIG"
VERSION = 1
PAGE = 4096
MAX_MESSAGE = 1 << 20
MAX_PAGES = 1024  # pages in one PAGES record (4 MiB): a cancel waits at most one of them
MAX_STATE = 256 << 20

PAGES, ZEROS, ROUND, STATE, END = 1, 2, 3, 4, 5
KINDS = {PAGES: "PAGES", ZEROS: "ZEROS", ROUND: "ROUND", STATE: "STATE", END: "END"}

_HELLO = struct.Struct("<8sI")
_LENGTH = struct.Struct("<I")
RECORD = struct.Struct("<BIQ")


class MigrationError(KvmpyError):
    """A migration that cannot go on: one line saying why (the guest stays where it was)."""

    exit_status = 1


class Silence(MigrationError):
    """The other end sent nothing for the socket's timeout (and did not close)."""


class Phases:
    """When each step of a migration's pause happened (monotonic clock, shared by both
    ends on one host): where the downtime goes, in query-migrate's `x-pause-phases`
    and the destination's -v log."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        self.marks.append((name, time.monotonic()))

    def since(self, origin: str) -> dict[str, float]:
        """Each mark in ms after the mark `origin` (empty until it is made)."""
        start = next((t for n, t in self.marks if n == origin), None)
        if start is None:
            return {}
        return {n: round((t - start) * 1000, 1) for n, t in self.marks if t >= start}

    def text(self) -> str:
        """'name at T' for each mark, T the monotonic clock in ms (for the -v log)."""
        return ", ".join(f"{n} at {t * 1000:.1f}" for n, t in self.marks)


class Address(NamedTuple):
    """`unix:PATH` or `tcp:HOST:PORT`, as given (`text`) and parsed."""

    text: str
    family: int
    where: str | tuple[str, int]


def parse_address(text: str, option: str = "uri") -> Address:
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return Address(text, socket.AF_UNIX, rest)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            return Address(text, family, (host, int(port)))
    raise ConfigError(f"{option} {text}: unix:PATH or tcp:HOST:PORT")


def listen(address: Address) -> socket.socket:
    """A socket listening at `address` (an old unix socket there is replaced, any other
    file is not); ConfigError in one line if it cannot be."""
    sock = socket.socket(address.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if address.family == socket.AF_UNIX:
            path = Path(str(address.where))
            try:
                if not stat.S_ISSOCK(os.stat(path, follow_symlinks=False).st_mode):
                    raise ConfigError(f"--incoming {address.text}: {path} exists and is not "
                                      "a socket")
                path.unlink()
            except FileNotFoundError:
                pass
            old = os.umask(0o077)  # only this user may send us a guest
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address.where)
        sock.listen(1)
    except OSError as e:
        sock.close()
        raise ConfigError(f"--incoming {address.text}: {e.strerror or e}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def connect(address: Address, timeout: float) -> socket.socket:
    """Connect to a destination, retrying while nobody listens yet for up to `timeout`
    seconds (a destination started at the same moment may still be building its VM)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(address.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.connect(address.where)
        except OSError as e:
            sock.close()
            waiting = e.errno in (errno.ECONNREFUSED, errno.ENOENT)
            if not waiting or time.monotonic() >= deadline:
                raise MigrationError(f"cannot connect to {address.text}: "
                                     f"{e.strerror or e}") from None
            time.sleep(0.05)
            continue
        if address.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


# -- messages ---------------------------------------------------------------------------
def send_hello(sock: socket.socket, body: dict[str, Any]) -> None:
    sock.sendall(_HELLO.pack(MAGIC, VERSION))
    send_message(sock, body)


def recv_hello(sock: socket.socket) -> dict[str, Any]:
    magic, version = _HELLO.unpack(recv_exactly(sock, _HELLO.size, "its hello"))
    if magic != MAGIC:
        raise MigrationError("the other end does not speak kvmpy's migration stream")
    if version != VERSION:
        raise MigrationError(f"the other end speaks migration stream version {version}; "
                             f"this kvmpy speaks version {VERSION}")
    return recv_message(sock, "its hello")


def send_message(sock: socket.socket, body: dict[str, Any]) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    sock.sendall(_LENGTH.pack(len(data)) + data)


def recv_message(sock: socket.socket, what: str) -> dict[str, Any]:
    (length,) = _LENGTH.unpack(recv_exactly(sock, _LENGTH.size, what))
    if length > MAX_MESSAGE:
        raise MigrationError(f"{what}: a message of {length} bytes (at most {MAX_MESSAGE})")
    try:
        body = json.loads(recv_exactly(sock, length, what))
    except (ValueError, RecursionError):
        raise MigrationError(f"{what}: not JSON") from None
    if not isinstance(body, dict):
        raise MigrationError(f"{what}: not a JSON object")
    return body


def recv_exactly(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray(n)
    recv_into_exactly(sock, memoryview(buf), what)
    return bytes(buf)


def recv_into_exactly(sock: socket.socket, view: memoryview, what: str) -> None:
    """Fill `view` from the socket (guest RAM, for pages); MigrationError if the stream
    ends or breaks first."""
    got = 0
    while got < len(view):
        got += recv_into_some(sock, view[got:], what)


def recv_into_some(sock: socket.socket, view: memoryview, what: str) -> int:
    """One `recv_into`: how many bytes came (at least one); MigrationError if the
    stream ends or breaks instead."""
    try:
        n = sock.recv_into(view)
    except TimeoutError:
        raise Silence(f"the other end sent nothing for {sock.gettimeout():g} s "
                      f"(inside {what})") from None
    except OSError as e:
        raise MigrationError(f"the connection broke inside {what}: "
                             f"{e.strerror or e}") from None
    if n == 0:
        raise MigrationError(f"the other end closed the connection inside {what} "
                             "(the stream is cut short)")
    return n
