"""The I/O thread: an epoll loop over eventfds and backend fds, and irqfd interrupt lines.

What it is: `IoThread`, one thread that waits on many fds and calls a
callback for each readable one; `EventFdIrq`, an `IrqLine` that injects an
interrupt by writing to an eventfd registered with KVM_IRQFD; and
`wire_eventfds()`, which connects one virtio-mmio device to both:

    guest writes QueueNotify ──KVM_IOEVENTFD──▶ eventfd ──IoThread──▶ handle_notify(i)
    device raises an interrupt ──EventFdIrq──▶ eventfd ──KVM_IRQFD──▶ guest GSI
    guest writes InterruptACK ──KVM_IOEVENTFD──▶ eventfd ◀── read by the transport

so a queue notification never leaves KVM_RUN for the vCPU thread and an
interrupt needs no ioctl. Backend fds (a tap) are watched by the same loop, and
timers run on it too (`call_later`: a rate-limited device tries its queue again).

An irqfd injects an edge: KVM raises and lowers the GSI. The transport pulses
on every new InterruptStatus bit, which is what Linux's virtio_mmio handler
needs (it reads the status register; see kvmpy.virtio.mmio).

What it is not: KVM. The VM object is anything with `ioeventfd()` and
`irqfd()` methods of the signatures in `EventFdVm` (kvmpy.kvm.vm.Vm has them).
"""

from __future__ import annotations

import heapq
import itertools
import os
import select
import threading
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

from kvmpy.log import get_logger
from kvmpy.virtio.device import VirtioDevice
from kvmpy.virtio.mmio import (
    INTERRUPT_ACK,
    QUEUE_NOTIFY,
    VIRTIO_MMIO_INT_VRING,
    VirtioMmioTransport,
)

log = get_logger(__name__)

_EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC


def new_eventfd() -> int:
    return os.eventfd(0, _EFD_FLAGS)


def drain_eventfd(fd: int) -> None:
    """Reset an eventfd's counter so level-triggered epoll stops reporting it."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


class EventFdIrq:
    """An `IrqLine` backed by an eventfd for KVM_IRQFD: asserting it pulses the GSI."""

    def __init__(self) -> None:
        self.fd = new_eventfd()
        self.pulses = 0

    def set_level(self, level: bool) -> None:
        # An irqfd has no level: lowering is a no-op, raising is an edge.
        if level:
            self.pulse()

    def pulse(self) -> None:
        self.pulses += 1
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class IoThread:
    """One epoll loop. Callbacks run on the I/O thread and must not block for long."""

    def __init__(self, name: str = "kvmpy-io") -> None:
        self.name = name
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._watchers: dict[int, Callable[[int], None]] = {}  # callback(revents)
        self._wake = new_eventfd()
        self._epoll.register(self._wake, select.EPOLLIN)
        self._stopping = False
        self._thread: threading.Thread | None = None
        # run first on each new loop thread: how the machine confines it (kvmpy.isolation)
        self.on_start: Callable[[], None] | None = None
        self._failed: set[int] = set()
        # call_later's timers: (deadline, sequence, callback), earliest first
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._timer_lock = threading.Lock()

    # -- fds --------------------------------------------------------------------------------
    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._callbacks[fd] = callback
        self._epoll.register(fd, select.EPOLLIN)

    def remove_reader(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def pause(self, fd: int) -> None:
        """Stop reporting `fd` (kept registered); for a backend whose guest has no buffers."""
        if fd in self._callbacks:
            self._epoll.modify(fd, 0)

    def resume(self, fd: int) -> None:
        if fd in self._callbacks:
            self._epoll.modify(fd, select.EPOLLIN)

    def watch(self, fd: int, callback: Callable[[int], None], events: int) -> None:
        """Call `callback(revents)` whenever `fd` has one of `events` (the FdWatcher
        a device with changing fds, such as vsock's sockets, is given)."""
        self._watchers[fd] = callback
        self._epoll.register(fd, events)

    def rewatch(self, fd: int, events: int) -> None:
        if fd in self._watchers:
            self._epoll.modify(fd, events)

    def unwatch(self, fd: int) -> None:
        """Stop watching `fd`; call it before closing the fd."""
        if self._watchers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def add_device(self, device: VirtioDevice) -> None:
        """Watch the device's backend fds and let it pause/resume them."""
        device.pause_reader = self.pause
        device.resume_reader = self.resume
        device.fd_watcher = self
        device.call_later = self.call_later
        for fd, callback in device.io_sources():
            self.add_reader(fd, callback)

    # -- running ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """End the loop; False if the thread is still inside a callback after `timeout`
        (a backend call that hangs), which may still be moving data into guest RAM."""
        if self._thread is None:
            return True
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        self._thread = None
        return stopped

    def close(self) -> bool:
        """`stop`, then release the loop's fds; returns what `stop` did."""
        stopped = self.stop()
        self._epoll.close()
        os.close(self._wake)
        return stopped

    def __enter__(self) -> IoThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run `callback` on the I/O thread in `delay` seconds (from any thread)."""
        with self._timer_lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq),
                                          callback))
        os.eventfd_write(self._wake, 1)  # the loop's wait is now too long

    def _due_timers(self, timeout: float) -> tuple[float, list[Callable[[], None]]]:
        """The poll timeout shortened to the next timer, and the timers due now."""
        now, due = time.monotonic(), []
        with self._timer_lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
            if self._timers and not due:
                wait = self._timers[0][0] - now
                timeout = wait if timeout < 0 else min(timeout, wait)
        return (0.0 if due else timeout), due

    def run_once(self, timeout: float = 0.0) -> int:
        """Wait up to `timeout` seconds and dispatch what is ready; returns callbacks run.

        The loop body, callable directly so tests can drive it without a thread.
        """
        ran = 0
        if self._timers:  # (none but while a rate-limited queue waits)
            timeout, due = self._due_timers(timeout)
            for timer in due:
                try:
                    timer()
                except Exception:
                    log.exception("%s: timer callback failed", self.name)
                ran += 1
        for fd, events in self._epoll.poll(timeout):
            if fd == self._wake:
                drain_eventfd(fd)
                continue
            callback = self._callbacks.get(fd)
            watcher = self._watchers.get(fd) if callback is None else None
            if callback is None and watcher is None:
                continue
            try:
                if callback is not None:
                    callback()
                elif watcher is not None:
                    watcher(events)
            except Exception:  # one bad callback must not stop every device
                if fd not in self._failed:
                    self._failed.add(fd)
                    log.exception("%s: callback for fd %d failed", self.name, fd)
            ran += 1
        return ran

    def _loop(self) -> None:
        if self.on_start is not None:
            try:
                self.on_start()
            except Exception:  # (the thread still runs under the process's filter)
                log.exception("%s: confining the thread failed", self.name)
        while not self._stopping:
            try:
                self.run_once(timeout=-1)
            except InterruptedError:
                continue


class EventFdVm(Protocol):
    """The two VM ioctls the wiring needs (kvmpy.kvm.vm.Vm provides them)."""

    def ioeventfd(self, addr: int, length: int, fd: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None: ...

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None: ...


class EventFdWiring(NamedTuple):
    """What `wire_eventfds` set up, so it can be taken down again."""

    base: int
    gsi: int
    irq: EventFdIrq
    notify_fds: list[int]  # one ioeventfd per queue
    ack_fd: int  # the ioeventfd on InterruptACK
    transport: VirtioMmioTransport

    def unwire(self, vm: EventFdVm, iothread: IoThread) -> None:
        for index, fd in enumerate(self.notify_fds):
            iothread.remove_reader(fd)
            vm.ioeventfd(self.base + QUEUE_NOTIFY, 4, fd, datamatch=index, deassign=True)
            os.close(fd)
        self.notify_fds.clear()
        if self.ack_fd >= 0:
            vm.ioeventfd(self.base + INTERRUPT_ACK, 4, self.ack_fd,
                         datamatch=VIRTIO_MMIO_INT_VRING, deassign=True)
            self.transport.take_acks_from(-1)
            os.close(self.ack_fd)
        vm.irqfd(self.irq.fd, self.gsi, deassign=True)
        self.irq.close()


def wire_eventfds(vm: EventFdVm, iothread: IoThread, transport: VirtioMmioTransport,
                  base: int, gsi: int) -> EventFdWiring:
    """Route `transport`'s notifications and interrupt through KVM eventfds.

    One ioeventfd per queue on `base + QueueNotify` with datamatch = queue
    index (a write with another value still exits to the bus, which handles
    it), one on `base + InterruptACK` for the driver's acknowledgement of a
    used-buffer interrupt (`VirtioMmioTransport.take_acks_from`), one irqfd for
    `gsi`, and the device's backend fds on the I/O thread.
    """
    irq = EventFdIrq()
    vm.irqfd(irq.fd, gsi)
    transport.irq = irq
    ack_fd = new_eventfd()
    vm.ioeventfd(base + INTERRUPT_ACK, 4, ack_fd, datamatch=VIRTIO_MMIO_INT_VRING)
    transport.take_acks_from(ack_fd)
    wiring = EventFdWiring(base, gsi, irq, [], ack_fd, transport)
    for index in range(len(transport.queues)):
        fd = new_eventfd()
        vm.ioeventfd(base + QUEUE_NOTIFY, 4, fd, datamatch=index)
        wiring.notify_fds.append(fd)

        def on_notify(fd: int = fd, index: int = index) -> None:
            drain_eventfd(fd)
            transport.handle_notify(index)

        iothread.add_reader(fd, on_notify)
    iothread.add_device(transport.device)
    return wiring
