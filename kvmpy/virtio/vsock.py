"""virtio-vsock (virtio 1.2 §5.10): stream sockets between the guest and host programs.

What it is: the device side of Linux's virtio_transport, with its host side on unix
sockets (`kvmpy.virtio.vsock_uds`, Firecracker's convention: a host program connects
to PATH and writes `CONNECT <port>`; a guest connecting to host port P reaches PATH_P).
Three queues (§5.10.2): rx carries packets to the guest, tx packets from it, and event
the transport-reset event (§5.10.6.7) that tells the guest its connections are gone, as
after a snapshot is restored. The configuration space is the guest's CID (§5.10.4).

Every packet starts with `struct virtio_vsock_hdr` (44 bytes, §5.10.6). A connection is
(host port, guest port), host CID 2. The life of one (§5.10.6.6):

    guest REQUEST  -> connect PATH_P; RESPONSE, or RST if nothing listens there
    host CONNECT P -> REQUEST to the guest; its RESPONSE -> "OK <host port>\\n" to the host
    RW             -> the payload, both ways
    SHUTDOWN       -> half-close: SEND "no more data from me", RCV "send me no more";
                      the host's EOF is SHUTDOWN(SEND) to the guest, the guest's SEND
                      is shutdown(SHUT_WR) on the host socket once its data is written
    RST            -> the connection is gone (also the answer to a full shutdown, and
                      to any packet for a connection that does not exist)

Flow control is credit-based (§5.10.6.3): each side says how much buffer it has for
the connection (buf_alloc) and how much it has consumed (fwd_cnt); a sender never has
more than buf_alloc - (sent - peer's fwd_cnt) bytes in flight. kvmpy buffers at most
BUF_ALLOC bytes of guest data per connection for a host reader that is slower than
the guest (a guest that sends more is reset), reads a host socket only while the guest
has credit and receive buffers, and tells the guest its fwd_cnt after every
CREDIT_THRESHOLD bytes forwarded (and whenever asked, CREDIT_REQUEST).

Host sockets are non-blocking and watched by the I/O thread (`FdWatcher`); a socket
whose data cannot go anywhere (no guest credit, no receive buffer) is simply not
watched for input until that changes.

State: `state()` is the CID; connections are host sockets and are not kept. `restore()`
closes them all and sends the transport-reset event, so the guest drops its sockets
and rereads its CID (§5.10.6.7).

What it is not: SOCK_SEQPACKET (VIRTIO_VSOCK_F_SEQPACKET is not offered), vhost, or a
timer: a host connection whose REQUEST the guest never answers waits until it does.
"""

from __future__ import annotations

import errno
import functools
import select
import socket
import struct
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

from kvmpy.errors import ConfigError
from kvmpy.state.values import StateReader
from kvmpy.virtio.device import VIRTIO_ID_VSOCK, VirtioDevice
from kvmpy.virtio.iov import iov_len, iov_read, iov_slice, iov_write
from kvmpy.virtio.queue import DescriptorChain, VirtqueueError
from kvmpy.virtio.vsock_uds import Handshake, UdsHost

RXQ, TXQ, EVENTQ = 0, 1, 2
HOST_CID = 2  # §5.10.4: "VMADDR_CID_HOST"
# §5.10.4: CIDs 0, 1, 2 and 2^32-1 are reserved; the upper 32 bits are zero
CID_MIN, CID_MAX = 3, 0xFFFFFFFE

# §5.10.6 struct virtio_vsock_hdr
HDR = struct.Struct("<QQIIIHHIII")  # src_cid dst_cid src_port dst_port len type op flags
HDR_SIZE = HDR.size  # 44                buf_alloc fwd_cnt
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN = 1, 2, 3, 4
OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 5, 6, 7
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
EVENT_TRANSPORT_RESET = 0  # struct virtio_vsock_event { le32 id; }

BUF_ALLOC = 256 * 1024  # what kvmpy buffers per connection, guest -> host
CREDIT_THRESHOLD = BUF_ALLOC // 4
MAX_PKT = 64 * 1024  # Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: the largest payload
RX_BATCH = 64  # packets per socket wakeup, so one busy socket cannot starve the rest
LOCAL_PORT_FIRST = 1 << 30  # host ports for host-initiated connections (as Firecracker)

CONNECTING, ESTABLISHED = "connecting", "established"  # host-initiated: wait for RESPONSE


class Header(NamedTuple):
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int


class Connection:
    """One stream between a guest port and a host socket, with both sides' credit."""

    def __init__(self, local_port: int, peer_port: int, sock: socket.socket, state: str
                 ) -> None:
        self.local_port = local_port  # host side
        self.peer_port = peer_port  # guest side
        self.sock = sock
        self.state = state
        self.peer_buf_alloc = 0  # the guest's receive buffer and what it has consumed
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0  # bytes sent to the guest
        self.fwd_cnt = 0  # guest bytes written to the host socket
        self.fwd_cnt_told = 0  # the fwd_cnt the guest last heard
        self.to_host = bytearray()  # guest bytes the host socket has not taken yet
        self.to_guest = b""  # host bytes read with the CONNECT line
        self.host_eof = False  # the host shut its sending side (told the guest)
        self.guest_shut_send = False  # the guest will send nothing more
        self.guest_shut_rcv = False  # the guest takes nothing more
        self.host_wr_shut = False  # the guest's SEND passed on: shutdown(SHUT_WR) done
        self.asked_credit = False
        self.events = 0  # what the I/O thread watches the socket for (0: not watched)

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    def peer_credit(self) -> int:
        """Bytes the guest can still take (§5.10.6.3.1)."""
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF)


def check_cid(cid: int) -> int:
    if not CID_MIN <= cid <= CID_MAX:
        raise ConfigError(f"vsock CID {cid}: must be {CID_MIN}..{CID_MAX} (0-2 and 2^32-1 "
                          "are reserved)")
    return cid


class Vsock(VirtioDevice):
    device_id = VIRTIO_ID_VSOCK
    name = "virtio-vsock"

    def __init__(self, cid: int, uds_path: str, queue_size: int = 256) -> None:
        super().__init__((queue_size, queue_size, 64))
        self.cid = check_cid(cid)
        self.uds = UdsHost(uds_path)
        self.conns: dict[tuple[int, int], Connection] = {}
        self.handshakes: dict[int, Handshake] = {}
        self.control: deque[bytes] = deque()  # headers waiting for receive buffers
        self.rx_starved = False  # the guest has offered no receive buffer since we asked
        self.reset_event_pending = False
        self.next_local_port = LOCAL_PORT_FIRST
        self.stats = {"rx_packets": 0, "tx_packets": 0, "rx_bytes": 0, "tx_bytes": 0}

    def config_space(self) -> bytes:
        return struct.pack("<Q", self.cid)  # §5.10.4 struct virtio_vsock_config

    # -- lifetime -------------------------------------------------------------------------
    def activate(self) -> None:
        if self.fd_watcher is not None:
            self.fd_watcher.unwatch(self.uds.fileno())
            self.fd_watcher.watch(self.uds.fileno(), self._on_listener, select.EPOLLIN)

    def reset(self) -> None:
        self._drop_all()
        if self.fd_watcher is not None:
            self.fd_watcher.unwatch(self.uds.fileno())
        self.control.clear()
        self.rx_starved = False

    def close(self) -> None:
        self.reset()
        self.uds.close()

    def _drop_all(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        for fd, hs in list(self.handshakes.items()):
            self._unwatch(fd)
            hs.sock.close()
        self.handshakes.clear()

    def state(self) -> dict[str, object]:
        """What a snapshot keeps: the CID. Connections are host sockets and are not kept."""
        return {"cid": self.cid}

    def restore(self, reader: StateReader) -> None:
        """The same CID, or a one-line error; the connections are gone, and the guest is
        told so by the event its event queue gets when the transport next looks at the
        queues (`process_all`, which a restored machine runs before its vCPUs, or a
        notify). Not here: the transport restores its queues after its device, so
        they still hold the state before the restore (a fast reset after a hostile
        input met a broken ring there, and the restore failed)."""
        cid = reader.int("cid")
        reader.done()
        if cid != self.cid:
            raise reader.fail("cid", f"the guest had CID {cid}, this run gives it {self.cid}")
        with self.lock:
            self._drop_all()
            self.control.clear()
            self.reset_event_pending = True

    # -- the I/O thread --------------------------------------------------------------------
    def _unwatch(self, fd: int) -> None:
        if self.fd_watcher is not None:
            self.fd_watcher.unwatch(fd)

    def _on_listener(self, _events: int) -> None:
        self.run_guarded(self._accept)

    def _accept(self) -> None:
        while (sock := self.uds.accept()) is not None:
            hs = self.handshakes[sock.fileno()] = Handshake(sock)
            if self.fd_watcher is not None:
                self.fd_watcher.watch(sock.fileno(), functools.partial(self._on_handshake, hs),
                                      select.EPOLLIN)

    def _on_handshake(self, hs: Handshake, _events: int) -> None:
        self.run_guarded(functools.partial(self._handshake, hs))

    def _handshake(self, hs: Handshake) -> None:
        fd = hs.sock.fileno()
        try:
            got = hs.feed()
        except ValueError as e:
            self.warn("handshake", "host connection refused: %s", e)
            self._unwatch(fd)
            del self.handshakes[fd]
            hs.sock.close()
            return
        if got is None:
            return
        port, rest = got
        self._unwatch(fd)
        del self.handshakes[fd]
        conn = Connection(self._new_local_port(), port, hs.sock, CONNECTING)
        conn.to_guest = rest
        self.conns[conn.key] = conn
        self._watch(conn)
        self._queue_control(conn, OP_REQUEST)
        self._fill_rx()

    def _new_local_port(self) -> int:
        used = {key[0] for key in self.conns}
        while True:
            port = self.next_local_port
            self.next_local_port = port + 1 if port < 0xFFFFFFFE else LOCAL_PORT_FIRST
            if port not in used:
                return port

    def _on_socket(self, conn: Connection, events: int) -> None:
        def serve() -> None:
            if self.conns.get(conn.key) is not conn:
                return
            if events & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                self._flush_to_host(conn)
            if self.conns.get(conn.key) is conn and events & (select.EPOLLIN | select.EPOLLHUP):
                self._from_host(conn)
        self.run_guarded(serve)

    def _watch(self, conn: Connection) -> None:
        """Watch the socket for what can happen next: input the guest can take, and
        room for guest data that is waiting."""
        events = 0
        if (conn.state == ESTABLISHED and not conn.host_eof and not conn.guest_shut_rcv
                and not self.rx_starved and conn.peer_credit() > 0):
            events |= select.EPOLLIN
        if conn.to_host:
            events |= select.EPOLLOUT
        if events == conn.events or self.fd_watcher is None:
            return
        fd = conn.sock.fileno()
        # not registered at all when nothing is wanted: epoll reports a hung-up socket
        # (EPOLLHUP) whatever the mask, and would call back for nothing, forever
        if not conn.events:
            self.fd_watcher.watch(fd, functools.partial(self._on_socket, conn), events)
        elif not events:
            self.fd_watcher.unwatch(fd)
        else:
            self.fd_watcher.rewatch(fd, events)
        conn.events = events

    def _close(self, conn: Connection) -> None:
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        if conn.events:
            self._unwatch(conn.sock.fileno())
            conn.events = 0
        conn.sock.close()

    # -- packets to the guest (rx) -----------------------------------------------------------
    def _header(self, conn: Connection, op: int, length: int = 0, flags: int = 0) -> bytes:
        conn.fwd_cnt_told = conn.fwd_cnt
        return HDR.pack(HOST_CID, self.cid, conn.local_port, conn.peer_port, length,
                        TYPE_STREAM, op, flags, BUF_ALLOC, conn.fwd_cnt & 0xFFFFFFFF)

    def _queue_control(self, conn: Connection, op: int, flags: int = 0) -> None:
        self.control.append(self._header(conn, op, flags=flags))

    def _queue_rst_reply(self, hdr: Header) -> None:
        """RST for a packet that names no connection (never in answer to an RST)."""
        if hdr.op != OP_RST:
            self.control.append(HDR.pack(HOST_CID, self.cid, hdr.dst_port, hdr.src_port, 0,
                                         TYPE_STREAM, OP_RST, 0, BUF_ALLOC, 0))

    def _pop_rx(self) -> tuple[int, list[memoryview]] | None:
        """The next receive buffer (head, writable views), or None: starved."""
        q = self.queues[RXQ]
        if not q.ready:
            return None
        chain = q.pop()
        if chain is None and q.enable_notification():
            chain = q.pop()
        if chain is None:
            self.rx_starved = True
            return None
        readable, writable = chain.buffers()
        if readable or iov_len(writable) < HDR_SIZE:
            raise VirtqueueError("vsock receive buffer without room for a 44-byte header")
        return chain.head, writable

    def _fill_rx(self) -> None:
        """Hand the guest the control packets waiting for receive buffers."""
        q = self.queues[RXQ]
        used = False
        while self.control:
            got = self._pop_rx()
            if got is None:
                break
            head, writable = got
            iov_write(writable, self.control.popleft())
            q.add_used(head, HDR_SIZE)
            self.stats["rx_packets"] += 1
            used = True
        if used:
            self.signal_used(q)

    def _from_host(self, conn: Connection) -> None:
        """Move what the host sent into receive buffers, while the guest has credit."""
        self._fill_rx()
        q = self.queues[RXQ]
        published = q.next_used
        for _ in range(RX_BATCH):
            credit = conn.peer_credit()
            if conn.state != ESTABLISHED or conn.host_eof or conn.guest_shut_rcv:
                break
            if credit <= 0:
                if not conn.asked_credit:  # the guest normally offers it unasked
                    conn.asked_credit = True
                    self._queue_control(conn, OP_CREDIT_REQUEST)
                    self._fill_rx()
                break
            if self.control:
                break  # control packets first; more data once they are out
            got = self._pop_rx()
            if got is None:
                break
            head, writable = got
            room = min(iov_len(writable) - HDR_SIZE, credit, MAX_PKT)
            n = self._recv(conn, iov_slice(writable, HDR_SIZE, HDR_SIZE + room))
            if n is None:  # nothing to read after all, or the socket failed
                q.undo_pop()
                if conn.key not in self.conns:
                    self._fill_rx()
                    return
                break
            if n == 0:  # the host shut its side: SHUTDOWN(SEND) says so in this buffer
                conn.host_eof = True
                flags = SHUTDOWN_SEND | (SHUTDOWN_RCV if conn.guest_shut_send else 0)
                iov_write(writable, self._header(conn, OP_SHUTDOWN, flags=flags))
                q.add_used(head, HDR_SIZE)
                break
            iov_write(writable, self._header(conn, OP_RW, length=n))
            q.add_used(head, HDR_SIZE + n)
            conn.tx_cnt = (conn.tx_cnt + n) & 0xFFFFFFFF
            self.stats["rx_packets"] += 1
            self.stats["rx_bytes"] += n
        if q.next_used != published:
            self.signal_used(q)
        if conn.key in self.conns:
            self._watch(conn)

    def _recv(self, conn: Connection, views: Sequence[memoryview]) -> int | None:
        """Host bytes into `views`: their count, 0 at EOF, None if none (or reset)."""
        if conn.to_guest:
            n = iov_write(views, conn.to_guest)
            conn.to_guest = conn.to_guest[n:]
            return n
        try:
            return conn.sock.recvmsg_into(list(views))[0]
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            self._reset(conn, f"host socket: {e.strerror}")
            return None

    # -- packets from the guest (tx) ---------------------------------------------------------
    def process_queue(self, index: int) -> None:
        if index == TXQ:
            self.drain(TXQ, self._from_guest)
            self._fill_rx()
        elif index == RXQ:
            # new receive buffers: deliver what waits, and read the host sockets again
            self.rx_starved = False
            self._fill_rx()
            for conn in list(self.conns.values()):
                if conn.to_guest:
                    self._from_host(conn)
                elif self.conns.get(conn.key) is conn:
                    self._watch(conn)
        elif index == EVENTQ and self.reset_event_pending:
            self._send_reset_event()

    def _send_reset_event(self) -> None:
        q = self.queues[EVENTQ]
        chain = q.pop() if q.ready else None
        if chain is None:
            return  # sent when the guest offers an event buffer
        _, writable = chain.buffers()
        n = iov_write(writable, struct.pack("<I", EVENT_TRANSPORT_RESET))
        q.add_used(chain.head, n)
        self.reset_event_pending = False
        self.signal_used(q)

    def _from_guest(self, chain: DescriptorChain) -> int:
        readable, _ = chain.buffers()
        if iov_len(readable) < HDR_SIZE:
            raise VirtqueueError("vsock packet shorter than its 44-byte header")
        hdr = Header(*HDR.unpack(iov_read(readable, 0, HDR_SIZE)))
        self.stats["tx_packets"] += 1
        if hdr.len > iov_len(readable) - HDR_SIZE or hdr.len > MAX_PKT:
            self.warn("tx-len", "packet says %d payload bytes; dropped", hdr.len)
            return 0
        if hdr.src_cid != self.cid or hdr.dst_cid != HOST_CID:
            # §5.10.6.4: the device drops packets with a wrong source; and only the host
            # is reachable
            self.warn("tx-cid", "packet from CID %d to CID %d; dropped", hdr.src_cid,
                      hdr.dst_cid)
            return 0
        conn = self.conns.get((hdr.dst_port, hdr.src_port))
        if hdr.type != TYPE_STREAM:
            if conn is not None:
                self._reset(conn, f"packet of type {hdr.type}")
            else:
                self._queue_rst_reply(hdr)
            return 0
        if conn is not None:
            conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        if hdr.op == OP_REQUEST:
            self._guest_connects(hdr, conn)
        elif conn is None:
            self._queue_rst_reply(hdr)
        elif hdr.op == OP_RST:
            self._close(conn)
        elif hdr.op == OP_RESPONSE:
            self._guest_accepts(conn)
        elif hdr.op == OP_RW:
            self._guest_data(conn, iov_slice(readable, HDR_SIZE, HDR_SIZE + hdr.len))
        elif hdr.op == OP_SHUTDOWN:
            conn.guest_shut_send |= bool(hdr.flags & SHUTDOWN_SEND)
            conn.guest_shut_rcv |= bool(hdr.flags & SHUTDOWN_RCV)
            self._settle(conn)
        elif hdr.op == OP_CREDIT_REQUEST:
            self._queue_control(conn, OP_CREDIT_UPDATE)
        elif hdr.op != OP_CREDIT_UPDATE:
            self._reset(conn, f"unknown op {hdr.op}")
        if conn is not None and self.conns.get(conn.key) is conn:
            if conn.peer_credit() > 0:
                conn.asked_credit = False
                if conn.to_guest:
                    self._from_host(conn)
            self._watch(conn)
        return 0

    def _guest_connects(self, hdr: Header, old: Connection | None) -> None:
        if old is not None:  # the guest reuses a pair it still has: start over
            self._close(old)
        sock = self.uds.connect(hdr.dst_port)
        if sock is None:
            self._queue_rst_reply(hdr)
            return
        conn = Connection(hdr.dst_port, hdr.src_port, sock, ESTABLISHED)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        self.conns[conn.key] = conn
        self._queue_control(conn, OP_RESPONSE)

    def _guest_accepts(self, conn: Connection) -> None:
        if conn.state != CONNECTING:
            self._reset(conn, "RESPONSE on an established connection")
            return
        conn.state = ESTABLISHED
        try:
            conn.sock.send(f"OK {conn.local_port}\n".encode())
        except OSError as e:
            self._reset(conn, f"host socket: {e.strerror}")
            return
        if conn.to_guest:  # sent with the CONNECT line: no socket event will bring it
            self._from_host(conn)

    def _guest_data(self, conn: Connection, payload: list[memoryview]) -> None:
        n = iov_len(payload)
        if conn.state != ESTABLISHED or conn.guest_shut_send:
            self._reset(conn, "data on a connection that is not open for it")
            return
        if len(conn.to_host) + n > BUF_ALLOC:
            self._reset(conn, "the guest sent more than its credit")
            return
        sent = 0
        if not conn.to_host:  # straight from guest memory, if the socket takes it
            try:
                sent = conn.sock.sendmsg(payload)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self._reset(conn, f"host socket: {e.strerror}")
                return
        if sent < n:
            conn.to_host += iov_read(payload, sent, n - sent)
        self._forwarded(conn, sent)
        self.stats["tx_bytes"] += n

    def _flush_to_host(self, conn: Connection) -> None:
        if conn.to_host:
            try:
                sent = conn.sock.send(conn.to_host)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._reset(conn, f"host socket: {e.strerror}")
                return
            del conn.to_host[:sent]
            self._forwarded(conn, sent)
        self._settle(conn)
        if self.conns.get(conn.key) is conn:
            self._watch(conn)
        self._fill_rx()

    def _forwarded(self, conn: Connection, n: int) -> None:
        """`n` more guest bytes reached the host: tell the guest once enough have."""
        conn.fwd_cnt = (conn.fwd_cnt + n) & 0xFFFFFFFF
        if (conn.fwd_cnt - conn.fwd_cnt_told) & 0xFFFFFFFF >= CREDIT_THRESHOLD:
            self._queue_control(conn, OP_CREDIT_UPDATE)

    def _settle(self, conn: Connection) -> None:
        """After a shutdown: pass the guest's SEND on once its data is out, and end a
        connection both sides have shut (§5.10.6.6: the RST that answers a shutdown)."""
        if conn.to_host:
            return
        if conn.guest_shut_send and not conn.host_wr_shut:
            conn.host_wr_shut = True
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                if e.errno != errno.ENOTCONN:
                    raise
        if conn.guest_shut_send and (conn.guest_shut_rcv or conn.host_eof):
            self._queue_control(conn, OP_RST)
            self._close(conn)

    def _reset(self, conn: Connection, why: str) -> None:
        self.warn(f"rst-{why[:20]}", "connection %d:%d reset: %s", conn.peer_port,
                  conn.local_port, why)
        self._queue_control(conn, OP_RST)
        self._close(conn)
