"""The I/O thread, irqfd lines and ioeventfd wiring, with a fake VM recording its ioctls."""

from __future__ import annotations

import os
import select
import time

from kvmpy.memory import GuestMemory
from kvmpy.virtio.driver import GuestDriver, SocketPairBackend
from kvmpy.virtio.iothread import EventFdIrq, IoThread, new_eventfd, wire_eventfds
from kvmpy.virtio.mmio import (
    INTERRUPT_ACK,
    INTERRUPT_STATUS,
    QUEUE_NOTIFY,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VirtioMmioTransport,
    slot_base,
    slot_irq,
)
from kvmpy.virtio.net import Net
from kvmpy.virtio.rng import Rng


class FakeVm:
    """Records KVM_IOEVENTFD / KVM_IRQFD; `guest_notify` plays KVM matching a write."""

    def __init__(self) -> None:
        self.ioeventfds: dict[tuple[int, int | None], int] = {}
        self.irqfds: dict[int, int] = {}

    def ioeventfd(self, addr: int, length: int, fd: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        assert length == 4 and not pio
        if deassign:
            del self.ioeventfds[(addr, datamatch)]
        else:
            self.ioeventfds[(addr, datamatch)] = fd

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        if deassign:
            del self.irqfds[gsi]
        else:
            self.irqfds[gsi] = fd

    def guest_notify(self, addr: int, value: int) -> bool:
        fd = self.ioeventfds.get((addr, value))
        if fd is None:
            return False  # KVM would exit to userspace: the bus path
        os.eventfd_write(fd, 1)
        return True


def wait_for(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_iothread_dispatches_and_pauses() -> None:
    calls: list[int] = []
    fd = new_eventfd()
    io = IoThread()

    def on_event() -> None:
        os.eventfd_read(fd)
        calls.append(1)

    io.add_reader(fd, on_event)
    os.eventfd_write(fd, 1)
    assert io.run_once(1.0) == 1 and calls == [1]
    io.pause(fd)
    os.eventfd_write(fd, 1)
    assert io.run_once(0.05) == 0
    io.resume(fd)
    assert io.run_once(1.0) == 1 and calls == [1, 1]
    io.close()
    os.close(fd)


def test_iothread_survives_a_failing_callback() -> None:
    fd = new_eventfd()
    calls: list[int] = []
    with IoThread() as io:
        def flaky() -> None:
            os.eventfd_read(fd)
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("device bug")

        io.add_reader(fd, flaky)
        os.eventfd_write(fd, 1)
        assert wait_for(lambda: len(calls) == 1)
        os.eventfd_write(fd, 1)
        assert wait_for(lambda: len(calls) == 2)  # the loop kept running
    os.close(fd)


def test_stop_says_when_a_callback_outlives_it() -> None:
    """Machine.close keeps guest RAM mapped then: a hung preadv may still write into it."""
    import threading

    fd = new_eventfd()
    entered, release = threading.Event(), threading.Event()
    io = IoThread()

    def hangs() -> None:
        os.eventfd_read(fd)
        entered.set()
        release.wait(10)

    io.add_reader(fd, hangs)
    io.start()
    os.eventfd_write(fd, 1)
    assert entered.wait(5)
    thread = io._thread
    assert io.stop(timeout=0.1) is False
    release.set()
    assert thread is not None
    thread.join(5)
    assert not thread.is_alive()  # it left the loop once the callback returned
    assert io.close() is True  # nothing left to stop
    os.close(fd)
    idle = IoThread()
    idle.start()
    assert idle.close() is True


def test_eventfd_irq_pulses_the_fd() -> None:
    irq = EventFdIrq()
    irq.set_level(False)
    assert not select.select([irq.fd], [], [], 0)[0]
    irq.set_level(True)
    assert select.select([irq.fd], [], [], 0)[0]
    assert os.eventfd_read(irq.fd) == 1
    irq.close()


def test_wired_device_is_served_by_the_iothread() -> None:
    mem = GuestMemory.from_buffer(bytearray(1 << 20))
    t = VirtioMmioTransport(Rng(), mem)
    vm = FakeVm()
    base, gsi = slot_base(3), slot_irq(3)
    with IoThread() as io:
        wiring = wire_eventfds(vm, io, t, base, gsi)
        assert vm.irqfds == {gsi: t.irq.fd}  # type: ignore[attr-defined]
        assert list(vm.ioeventfds) == [(base + INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING),
                                       (base + QUEUE_NOTIFY, 0)]
        d = GuestDriver(t, mem)
        assert d.init()
        d.add_chain(0, [], [32], kick=False)
        assert vm.guest_notify(base + QUEUE_NOTIFY, 0)  # no exit: KVM signals the eventfd
        assert wait_for(lambda: bool(d.queues and d.mem.read_u16(d.queues[0].used + 2)))
        irq_fd = t.irq.fd  # type: ignore[attr-defined]
        assert select.select([irq_fd], [], [], 5)[0]  # the irqfd fired
        [(_, length, _)] = d.used(0)
        assert length == 32
        wiring.unwire(vm, io)
        assert vm.ioeventfds == {} and vm.irqfds == {}


def test_acknowledgements_through_the_eventfd_are_as_register_writes() -> None:
    """Linux's handler reads InterruptStatus and writes it back to InterruptACK; KVM
    takes a write of VRING alone through the eventfd, without an exit. The guest's next
    read, the device's next interrupt and a snapshot must all see it as if written."""
    mem = GuestMemory.from_buffer(bytearray(1 << 20))
    t = VirtioMmioTransport(Rng(), mem)
    vm = FakeVm()
    base = slot_base(0)
    with IoThread() as io:
        wiring = wire_eventfds(vm, io, t, base, slot_irq(0))
        irq_fd = t.irq.fd  # type: ignore[attr-defined]
        d = GuestDriver(t, mem)
        assert d.init()

        def interrupt() -> None:  # a request served, and the pulse it raised
            d.add_chain(0, [], [8])
            assert wait_for(lambda: select.select([irq_fd], [], [], 0)[0] != [])
            os.eventfd_read(irq_fd)
            d.used(0)

        interrupt()
        assert d.r32(INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING
        assert vm.guest_notify(base + INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING)  # no exit
        assert d.r32(INTERRUPT_STATUS) == 0  # the next read sees it
        interrupt()  # so the bit went from 0 to 1 again: a new pulse
        assert vm.guest_notify(base + INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING)
        assert t.state()["interrupt_status"] == 0  # a snapshot sees it
        interrupt()
        t.raise_interrupt(VIRTIO_MMIO_INT_CONFIG)
        assert not vm.guest_notify(base + INTERRUPT_ACK, 3)  # other values exit
        d.w32(INTERRUPT_ACK, 3)
        assert d.r32(INTERRUPT_STATUS) == 0
        wiring.unwire(vm, io)
        assert vm.ioeventfds == {} and vm.irqfds == {}
        d.w32(INTERRUPT_ACK, 1)  # (a register write again)


def test_net_backend_is_watched_by_the_iothread() -> None:
    mem = GuestMemory.from_buffer(bytearray(1 << 20))
    backend = SocketPairBackend()
    dev = Net(backend, "52:54:00:00:00:01")
    t = VirtioMmioTransport(dev, mem)
    vm = FakeVm()
    with IoThread() as io:
        wire_eventfds(vm, io, t, slot_base(0), slot_irq(0))
        backend.peer.send(bytes(12) + b"early")  # before DRIVER_OK: the reader pauses
        time.sleep(0.05)
        d = GuestDriver(t, mem)
        assert d.init()
        d.add_chain(0, [], [2048])
        assert wait_for(lambda: mem.read_u16(d.queues[0].used + 2) == 1)
        [(_, length, [buf])] = d.used(0)
        assert buf[12:length] == b"early"
    backend.close()
