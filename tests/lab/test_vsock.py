"""virtio-vsock under Linux's own vsock transport: 10 MiB each way, both ways of connecting.

The guest side is Python's AF_VSOCK in `kvmpy sandbox --vsock` (the host's python3,
run over the host's files); the host side is plain unix sockets in Firecracker's
convention. Checksums are computed on both ends and compared.

Marked `lab`: runs where /dev/kvm boots Linux, else inside the one lab session.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

SIZE = 10 << 20
HOST_PORT, GUEST_PORT = 1234, 5000

GUEST = f"""\
import hashlib, os, socket, sys
SIZE = {SIZE}

def read_all(s, n=None):
    chunks, got = [], 0
    while n is None or got < n:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)

# the guest connects to the host (CID 2): 10 MiB out, 10 MiB back
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.connect((socket.VMADDR_CID_HOST, {HOST_PORT}))
data = os.urandom(SIZE)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
back = read_all(s)
s.close()
print("guest-sent", hashlib.sha256(data).hexdigest(), flush=True)
print("guest-got", len(back), hashlib.sha256(back).hexdigest(), flush=True)

# the host connects to the guest: 10 MiB in, 10 MiB out
srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
srv.bind((socket.VMADDR_CID_ANY, {GUEST_PORT}))
srv.listen(1)
print("guest-listening", flush=True)
conn, peer = srv.accept()
got = read_all(conn, SIZE)
print("guest-received", len(got), hashlib.sha256(got).hexdigest(), "from", peer, flush=True)
reply = os.urandom(SIZE)
conn.sendall(reply)
conn.close()
print("guest-replied", hashlib.sha256(reply).hexdigest(), flush=True)
"""


def _serve_guest_connection(server: socket.socket, result: dict[str, object]) -> None:
    """PATH_1234: take the guest's 10 MiB, send 10 MiB back."""
    try:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(300)
            h, n = hashlib.sha256(), 0
            while chunk := conn.recv(1 << 16):
                h.update(chunk)
                n += len(chunk)
            reply = os.urandom(SIZE)
            conn.sendall(reply)
        result.update(received=(n, h.hexdigest()), sent=hashlib.sha256(reply).hexdigest())
    except OSError as e:
        result["error"] = repr(e)


def _connect_to_guest(uds: Path, result: dict[str, object]) -> None:
    """CONNECT 5000: send 10 MiB, read the guest's 10 MiB."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(300)
            s.connect(str(uds))
            s.sendall(f"CONNECT {GUEST_PORT}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                line += s.recv(1)
            payload = os.urandom(SIZE)
            s.sendall(payload)
            h, n = hashlib.sha256(), 0
            while n < SIZE and (chunk := s.recv(1 << 16)):
                h.update(chunk)
                n += len(chunk)
        result.update(ok=line.decode(), sent=hashlib.sha256(payload).hexdigest(),
                      received=(n, h.hexdigest()))
    except OSError as e:
        result["error"] = repr(e)


def test_10_mib_each_way_both_ways_of_connecting(tmp_path: Path) -> None:
    uds = tmp_path / "vsock.sock"
    (tmp_path / "guest.py").write_text(GUEST)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{uds}_{HOST_PORT}")
    server.listen(1)
    server.settimeout(600)
    from_guest: dict[str, object] = {}
    to_guest: dict[str, object] = {}
    serving = threading.Thread(target=_serve_guest_connection, args=(server, from_guest))
    serving.start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmpy", "sandbox", "--vsock", f"3,uds={uds}", "--",
         "python3", str(tmp_path / "guest.py")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    lines = []
    connecting = None
    try:
        for raw in proc.stdout:
            lines.append(raw.decode().strip())
            if lines[-1] == "guest-listening":
                connecting = threading.Thread(target=_connect_to_guest, args=(uds, to_guest))
                connecting.start()
        status = proc.wait(60)
    finally:
        proc.kill()
        server.close()
    err = proc.stderr.read().decode() if proc.stderr else ""
    serving.join(60)
    assert connecting is not None, (lines, err)
    connecting.join(120)
    assert status == 0, (lines, err)
    out = "\n".join(lines)
    # guest -> host, and the host's answer back
    assert "error" not in from_guest, from_guest
    sent = re.search(r"guest-sent ([0-9a-f]{64})", out)
    got = re.search(r"guest-got (\d+) ([0-9a-f]{64})", out)
    assert sent and got, out
    assert from_guest["received"] == (SIZE, sent.group(1))
    assert (int(got.group(1)), got.group(2)) == (SIZE, from_guest["sent"])
    # host -> guest through CONNECT, and the guest's answer back
    assert "error" not in to_guest, to_guest
    assert re.fullmatch(r"OK \d+\n", str(to_guest["ok"]))
    received = re.search(r"guest-received (\d+) ([0-9a-f]{64}) from \(2, (\d+)\)", out)
    replied = re.search(r"guest-replied ([0-9a-f]{64})", out)
    assert received and replied, out
    assert (int(received.group(1)), received.group(2)) == (SIZE, to_guest["sent"])
    assert received.group(3) == str(to_guest["ok"]).split()[1]  # the port OK named
    assert to_guest["received"] == (SIZE, replied.group(1))
