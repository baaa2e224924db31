"""virtio-console: port 0 output to a writer, input queued until the guest has buffers."""

from __future__ import annotations

import struct
import tracemalloc

from kvmpy.bus import NullIrq
from kvmpy.memory import GuestMemory
from kvmpy.virtio.console import MAX_PENDING_INPUT, OUTPUT_PIECE, Console
from kvmpy.virtio.device import VIRTIO_ID_CONSOLE
from kvmpy.virtio.driver import GuestDriver
from kvmpy.virtio.mmio import DEVICE_ID, VirtioMmioTransport
from kvmpy.virtio.queue import DESC_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT

RX, TX = 0, 1


def attach() -> tuple[Console, GuestDriver, list[bytes], NullIrq]:
    out: list[bytes] = []
    dev = Console(out.append)
    mem = GuestMemory.from_buffer(bytearray(1 << 20))
    irq = NullIrq()
    d = GuestDriver(VirtioMmioTransport(dev, mem, irq), mem)
    assert d.init()
    return dev, d, out, irq


def test_output_goes_to_the_writer() -> None:
    _, d, out, irq = attach()
    assert d.r32(DEVICE_ID) == VIRTIO_ID_CONSOLE
    d.add_chain(TX, [b"Linux version ", b"6.1\n"], [])
    assert out == [b"Linux version 6.1\n"]
    assert [length for _, length, _ in d.used(TX)] == [0] and irq.level


def test_input_waits_for_receive_buffers() -> None:
    dev, d, _, _ = attach()
    dev.enqueue_input(b"root\n")  # nothing offered yet: kept
    assert d.used(RX) == []
    d.add_chain(RX, [], [3])
    d.add_chain(RX, [], [64])
    used = d.used(RX)
    assert [(length, bufs[0][:length]) for _, length, bufs in used] == [(3, b"roo"), (2, b"t\n")]
    dev.enqueue_input(b"ls\n")  # both buffers are used up: waits for the next one
    d.add_chain(RX, [], [64])
    [(_, length, [buf])] = d.used(RX)
    assert buf[:length] == b"ls\n"


def test_input_is_bounded() -> None:
    dev, _, _, _ = attach()
    dev.enqueue_input(b"x" * (MAX_PENDING_INPUT + 10))
    assert len(dev.pending) == MAX_PENDING_INPUT and dev.dropped_input == 10


def test_config_space_is_port_count_one() -> None:
    _, d, _, _ = attach()
    assert struct.unpack("<I", d.config(4, 4))[0] == 1  # max_nr_ports


def test_output_errors_do_not_break_the_device() -> None:
    def broken(data: bytes) -> None:
        raise BrokenPipeError("terminal gone")

    dev = Console(broken)
    mem = GuestMemory.from_buffer(bytearray(1 << 20))
    d = GuestDriver(VirtioMmioTransport(dev, mem), mem)
    assert d.init()
    d.add_chain(TX, [b"hello"], [])
    assert len(d.used(TX)) == 1 and dev.active


def test_output_errors_other_than_oserror_do_not_break_the_device() -> None:
    """A closed file object raises ValueError: the host's sink failed, not the guest."""
    def closed(data: bytes) -> None:
        raise ValueError("I/O operation on closed file")

    dev = Console(closed)
    mem = GuestMemory.from_buffer(bytearray(1 << 20))
    t = VirtioMmioTransport(dev, mem)
    d = GuestDriver(t, mem)
    assert d.init()
    d.add_chain(TX, [b"hello"], [])
    assert len(d.used(TX)) == 1 and dev.active and not t.broken


def test_one_buffer_named_a_thousand_times_costs_bounded_host_memory() -> None:
    """1,024 indirect descriptors naming the same 128 KiB: all 128 MiB reach the output,
    in pieces of at most OUTPUT_PIECE, and no host allocation grows with the claim."""
    sizes: list[int] = []
    dev = Console(lambda data: sizes.append(len(data)))
    mem = GuestMemory.from_buffer(bytearray(1 << 20))
    d = GuestDriver(VirtioMmioTransport(dev, mem), mem)
    assert d.init()
    buf, n, count = d.alloc(128 * 1024), 128 * 1024, 1024
    mem.fill(buf, n, ord("x"))
    table = d.alloc(DESC_SIZE * count)
    for i in range(count):
        flags = VIRTQ_DESC_F_NEXT if i + 1 < count else 0
        mem.write(table + DESC_SIZE * i, struct.pack("<QIHH", buf, n, flags, i + 1))
    q = d.queues[TX]
    head = q.free.pop()
    q.chains[head] = ([head], [])
    mem.write(q.desc + DESC_SIZE * head, struct.pack("<QIHH", table, DESC_SIZE * count,
                                                     VIRTQ_DESC_F_INDIRECT, 0))
    tracemalloc.start()
    try:
        d.publish(TX, head)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(sizes) == n * count and max(sizes) <= OUTPUT_PIECE
    # The walk's bookkeeping (a view and two ints per descriptor) plus one piece: under
    # 2 MiB, where copying the chain whole took 128 MiB.
    assert peak < 2 << 20, peak
    assert len(d.used(TX)) == 1 and dev.active
