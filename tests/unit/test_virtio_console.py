"""virtio-console: port 0 output to a writer, input queued until the guest has buffers."""

from __future__ import annotations

import struct

from kvmpy.bus import NullIrq
from kvmpy.memory import GuestMemory
from kvmpy.virtio.console import MAX_PENDING_INPUT, Console
from kvmpy.virtio.device import VIRTIO_ID_CONSOLE
from kvmpy.virtio.driver import GuestDriver
from kvmpy.virtio.mmio import DEVICE_ID, VirtioMmioTransport

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
