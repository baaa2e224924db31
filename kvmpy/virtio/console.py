"""virtio-console (virtio 1.2 §5.3), a single port: Linux's hvc0.

What it is: port 0's two queues. Bytes the guest writes on transmitq go to
`output` (a callable taking bytes, e.g. `sys.stdout.buffer.write` plus a
flush); bytes given to `enqueue_input()` (from a stdin thread, a test, a
socket) wait in a bounded buffer until the guest offers receive buffers.
Used as a console with `console=hvc0` on the kernel command line.

What it is not: multiport (VIRTIO_CONSOLE_F_MULTIPORT), console resize
(VIRTIO_CONSOLE_F_SIZE) or emergency write; no feature bits are offered,
so the configuration space is present but not meaningful to the driver.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

from kvmpy.state.values import StateReader, b64
from kvmpy.virtio.device import VIRTIO_ID_CONSOLE, VirtioDevice
from kvmpy.virtio.iov import iov_len, iov_write
from kvmpy.virtio.queue import DescriptorChain

RECEIVEQ = 0  # port 0 receiveq: device -> driver
TRANSMITQ = 1  # port 0 transmitq: driver -> device
MAX_PENDING_INPUT = 64 * 1024
# Transmitted bytes reach `output` in pieces of at most this size: a chain may name
# the same guest buffer a thousand times (an indirect table), so copying it whole
# would let the guest choose how much host memory one request costs.
OUTPUT_PIECE = 64 * 1024

# §5.3.4 struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr
_CONFIG = struct.Struct("<HHII")


class Console(VirtioDevice):
    device_id = VIRTIO_ID_CONSOLE
    name = "virtio-console"

    def __init__(self, output: Callable[[bytes], object] | None = None,
                 queue_size: int = 256) -> None:
        super().__init__((queue_size, queue_size))
        self.output = output
        self.pending = bytearray()
        self.dropped_input = 0

    def config_space(self) -> bytes:
        return _CONFIG.pack(0, 0, 1, 0)

    def enqueue_input(self, data: bytes) -> None:
        """Bytes typed at the console: delivered now if the guest has buffers, else later."""
        with self.lock:
            room = MAX_PENDING_INPUT - len(self.pending)
            if len(data) > room:
                self.dropped_input += len(data) - room
                self.warn("input-full", "console input buffer full; dropping input")
                data = data[:room]
            self.pending += data
        self.run_guarded(self._deliver_input)

    def reset(self) -> None:
        self.pending.clear()

    def state(self) -> dict[str, Any]:
        """Typed input the guest has not taken yet (output leaves as it is sent)."""
        return {"pending": b64(self.pending)}

    def restore(self, reader: StateReader) -> None:
        self.restorer(reader)()

    def restorer(self, reader: StateReader) -> Callable[[], None]:
        pending = reader.bytes("pending", MAX_PENDING_INPUT)
        reader.done()

        def put() -> None:
            self.pending[:] = pending

        return put

    def process_queue(self, index: int) -> None:
        if index == TRANSMITQ:
            self.drain(TRANSMITQ, self._transmit)
        elif index == RECEIVEQ:
            self._deliver_input()

    def _transmit(self, chain: DescriptorChain) -> int:
        r_gpas, r_lengths, w_gpas, w_lengths = chain.spans()
        readable = chain.views(r_gpas, r_lengths, writable=False)
        if w_gpas:
            chain.require(w_gpas, w_lengths)  # (in RAM, as any chain's buffers must be)
            self.warn("tx-writable", "transmit buffer with device-writable parts; ignored")
        if self.output is None:
            return 0
        for piece in _pieces(readable, OUTPUT_PIECE):
            try:
                self.output(piece)
            except Exception as e:
                # The host's sink failed, not the guest: a closed terminal (OSError) or a
                # closed file object (ValueError) must not put hvc0 in NEEDS_RESET. The
                # rest of this chain is dropped.
                self.warn("output", "console output failed: %r", e)
                break
        return 0

    def _deliver_input(self) -> None:
        q = self.queues[RECEIVEQ]
        if not q.ready:
            return
        used = False
        while self.pending:
            chain = q.pop()
            if chain is None:
                if q.enable_notification():
                    continue
                break
            _, writable = chain.buffers()
            n = min(iov_len(writable), len(self.pending))
            iov_write(writable, self.pending[:n])
            del self.pending[:n]
            q.add_used(chain.head, n)
            used = True
        if used:
            self.signal_used(q)


def _pieces(views: list[memoryview], size: int) -> Iterator[bytes]:
    """The stream `views` hold, as bytes objects of `size` bytes (the last may be
    shorter): small descriptors are gathered, large ones cut, so host memory per
    piece is bounded by `size` whatever the descriptors claim."""
    buf = bytearray()
    for v in views:
        pos, end = 0, v.nbytes
        while pos < end:
            if not buf and end - pos >= size:  # a whole piece from one view: one copy
                yield bytes(v[pos : pos + size])
                pos += size
                continue
            take = min(size - len(buf), end - pos)
            buf += v[pos : pos + take]
            pos += take
            if len(buf) == size:
                yield bytes(buf)
                buf.clear()
    if buf:
        yield bytes(buf)
