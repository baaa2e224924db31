"""The host side of virtio-vsock: unix sockets, in Firecracker's convention.

What it is: `UdsHost(path)`. kvmpy listens on the unix socket PATH. A host program that
wants to reach guest port P connects to PATH and writes `CONNECT P\\n`; once the guest
accepts, it reads `OK <host port>\\n` and then the stream. A guest connecting to host
port P (CID 2) reaches whatever listens on `PATH_P`. The same convention as
Firecracker's vsock (docs/vsock.md in Firecracker), so tools written for it fit.

`accept()` takes a new host connection, and `Handshake` collects its `CONNECT` line
(a host that sends data right after the line keeps it: the bytes past the newline are
the stream's first); `connect(port)` opens `PATH_P` for a guest's request.

What it is not: the vsock device (kvmpy.virtio.vsock), which owns the connections.
"""

from __future__ import annotations

import os
import socket
import stat

from kvmpy.errors import ConfigError

SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with its NUL
HANDSHAKE_MAX = 32  # "CONNECT 4294967295\n" is 19 bytes
PORT_MAX = 0xFFFFFFFF


def _socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                         | socket.SOCK_CLOEXEC)


def check_uds_path(path: str) -> str:
    """PATH as an absolute path that fits a sockaddr_un with `_<port>` after it."""
    full = os.path.abspath(path)
    if len(os.fsencode(full)) + len(f"_{PORT_MAX}") > SUN_PATH_MAX:
        raise ConfigError(f"--vsock uds={path}: the path (and _PORT after it) must fit in "
                          f"{SUN_PATH_MAX} bytes")
    if not os.path.isdir(os.path.dirname(full)):
        raise ConfigError(f"--vsock uds={path}: {os.path.dirname(full)} is not a directory")
    return full


class UdsHost:
    """The listening socket PATH, and outgoing connections to PATH_<port>."""

    def __init__(self, path: str) -> None:
        self.path = check_uds_path(path)
        self._clear_stale()
        self.listener = _socket()
        try:
            self.listener.bind(self.path)
            self.listener.listen(64)
        except OSError as e:
            self.listener.close()
            raise ConfigError(f"--vsock uds={self.path}: {e.strerror}") from None
        self._ino = os.stat(self.path).st_ino

    def _clear_stale(self) -> None:
        """Remove a socket left by an earlier run; refuse anything else at PATH."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"--vsock uds={self.path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            os.unlink(self.path)  # nobody listens: a leftover
            return
        except OSError as e:
            raise ConfigError(f"--vsock uds={self.path}: {e.strerror}") from None
        finally:
            probe.close()
        raise ConfigError(f"--vsock uds={self.path}: another process listens there")

    def fileno(self) -> int:
        return self.listener.fileno()

    def accept(self) -> socket.socket | None:
        try:
            sock, _ = self.listener.accept()
        except OSError:  # EAGAIN, or the connection went (ECONNABORTED), or no fds left
            return None
        sock.setblocking(False)
        return sock

    def connect(self, port: int) -> socket.socket | None:
        """A connection to PATH_<port>, or None if nothing accepts there."""
        sock = _socket()
        try:
            sock.connect(f"{self.path}_{port}")
        except OSError:
            sock.close()
            return None
        return sock

    def close(self) -> None:
        if self.listener.fileno() >= 0:
            self.listener.close()
            try:  # only our own socket file, not one a new run has made since
                if os.stat(self.path).st_ino == self._ino:
                    os.unlink(self.path)
            except OSError:
                pass


class Handshake:
    """The `CONNECT <port>\\n` line of one accepted host connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def feed(self) -> tuple[int, bytes] | None:
        """Read what has arrived: (port, bytes after the line) once the line is complete,
        None while it is not. Raises ValueError for a bad line or a closed connection."""
        try:
            chunk = self.sock.recv(HANDSHAKE_MAX)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            raise ValueError(f"connection failed: {e.strerror}") from None
        if not chunk:
            raise ValueError("closed before its CONNECT line")
        self.buf += chunk
        line, newline, rest = self.buf.partition(b"\n")
        if not newline:
            if len(self.buf) >= HANDSHAKE_MAX:
                raise ValueError("no CONNECT line")
            return None
        return parse_connect(line), rest


def parse_connect(line: bytes) -> int:
    """The port of `CONNECT <port>` (decimal, 0..2^32-1); ValueError otherwise."""
    word, _, port = line.rstrip(b"\r").partition(b" ")
    if word != b"CONNECT" or not port.isdigit() or int(port) > PORT_MAX:
        raise ValueError(f"not a CONNECT line: {line[:HANDSHAKE_MAX]!r}")
    return int(port)
