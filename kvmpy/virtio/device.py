"""What every virtio device model shares, whatever its transport.

What it is: the `VirtioDevice` base class (device ID, offered features,
configuration space, queues, activate/reset, queue processing) plus the
constants of virtio 1.2 §2 and §6 that devices and transports both name.
A device sees guest memory, its queues and a `DeviceHost` (the transport)
through which it signals used buffers or reports a broken driver. It never
sees registers, KVM or threads other than through its own `lock`.

What it is not: a transport. MMIO registers and interrupt status live in
`kvmpy.virtio.mmio`.

Threading: a device is driven from the vCPU thread (MMIO exits), the I/O
thread (ioeventfd notifications, backend fds) and, for the console, an input
thread. `lock` serialises all of them; the transport takes it for every
register access and notification, and device entry points called from
elsewhere (`enqueue_input`, `on_backend_readable`) take it themselves.

Learned from rust-vmm's VirtioDevice trait and kvmtool's virtio/core.c.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from kvmpy.log import WARNING, get_logger
from kvmpy.memory import GuestMemory
from kvmpy.state.values import StateReader
from kvmpy.virtio.queue import DEFAULT_QUEUE_SIZE, DescriptorChain, Virtqueue

if TYPE_CHECKING:
    from kvmpy.ratelimit import RateLimiter

log = get_logger(__name__)

# §5 device IDs
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_ENTROPY = 4
VIRTIO_ID_9P = 9
VIRTIO_ID_VSOCK = 19

# §2.1 device status field
VIRTIO_STATUS_ACKNOWLEDGE = 1
VIRTIO_STATUS_DRIVER = 2
VIRTIO_STATUS_DRIVER_OK = 4
VIRTIO_STATUS_FEATURES_OK = 8
VIRTIO_STATUS_DEVICE_NEEDS_RESET = 64
VIRTIO_STATUS_FAILED = 128

# §6 reserved feature bits (transport and ring features)
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# The ring features every kvmpy device offers; the transport adds them.
TRANSPORT_FEATURES = (
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX)
)


def bit(n: int) -> int:
    return 1 << n


class DeviceHost(Protocol):
    """What a device may ask of its transport."""

    def signal_used(self, queue: Virtqueue) -> None: ...

    def needs_reset(self, reason: str) -> None: ...

    def config_changed(self) -> None: ...

    def run_guarded(self, fn: Callable[[], None]) -> None: ...


class FdWatcher(Protocol):
    """Watching host fds that come and go while the device runs (vsock's sockets).

    `callback(revents)` runs on the I/O thread whenever `fd` has one of `events`
    (select.EPOLLIN, select.EPOLLOUT); `rewatch` changes the events (0: none).
    """

    def watch(self, fd: int, callback: Callable[[int], None], events: int) -> None: ...

    def rewatch(self, fd: int, events: int) -> None: ...

    def unwatch(self, fd: int) -> None: ...


class LogOnce:
    """Log each distinct guest complaint once per device, and only a few per site.

    A guest can repeat a complaint forever, and vary it: a site (the fixed `key` a
    call names) logs at most `PER_SITE` distinct messages, then one line saying
    further ones are suppressed, then nothing. Keys are fixed strings in kvmpy's
    code and guest-chosen numbers only reach the message, so what this keeps is
    bounded by the number of sites, not by what the guest writes.
    """

    PER_SITE = 4

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: dict[str, set[str]] = {}

    def __call__(self, key: str, msg: str, *args: object, level: int = WARNING) -> None:
        seen = self.seen.get(key)
        if seen is None:
            seen = self.seen[key] = set()
        elif len(seen) > self.PER_SITE:
            return
        text = msg % args if args else msg
        if text in seen:
            return
        seen.add(text)
        if len(seen) > self.PER_SITE:
            log.log(level, "%s: further %r warnings suppressed", self.name, key)
        else:
            log.log(level, "%s: %s", self.name, text)


class VirtioDevice:
    """Base class: override `device_id`, `device_features`, `config_space`, `process_queue`."""

    device_id = 0
    name = "virtio"

    def __init__(self, queue_sizes: tuple[int, ...] = (DEFAULT_QUEUE_SIZE,)) -> None:
        self.lock = threading.RLock()
        self.queues = [Virtqueue(size) for size in queue_sizes]
        self.mem: GuestMemory | None = None
        self.acked_features = 0
        self.active = False
        self.host: DeviceHost | None = None
        self.warn = LogOnce(self.name)
        # Set by IoThread.add_device(): stop/restart watching a backend fd.
        self.pause_reader: Callable[[int], None] = lambda fd: None
        self.resume_reader: Callable[[int], None] = lambda fd: None
        # Set by IoThread.add_device() too, for devices whose fds come and go.
        self.fd_watcher: FdWatcher | None = None
        # ...and run a callback on the I/O thread later (a throttled queue's retry)
        self.call_later: Callable[[float, Callable[[], None]], None] | None = None
        # per queue: its rate limiter (kvmpy.ratelimit), checked by `drain`
        self.limiters: dict[int, RateLimiter] = {}
        self._retrying: set[int] = set()  # queues with a retry armed

    # -- what the transport asks ----------------------------------------------------
    def device_features(self) -> int:
        """Device-type feature bits offered (the transport adds TRANSPORT_FEATURES)."""
        return 0

    def accept_features(self, acked: int) -> bool:
        """May the driver use this feature set? False refuses FEATURES_OK (§2.2.2)."""
        return True

    def config_space(self) -> bytes:
        """The device-specific configuration structure, little-endian (§2.5)."""
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        data = self.config_space()[offset : offset + size]
        return data + bytes(size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        self.warn("config-write", "driver wrote read-only config at %#x; ignored", offset)

    def activate(self) -> None:
        """The driver set DRIVER_OK; `mem`, `acked_features` and the queues are valid."""

    def reset(self) -> None:
        """The driver wrote 0 to Status: drop in-flight state (the transport resets queues)."""

    def process_queue(self, index: int) -> None:
        """The driver notified queue `index` (or the device was just activated)."""

    def io_sources(self) -> list[tuple[int, Callable[[], None]]]:
        """Backend fds the I/O thread should watch, with the callback for each."""
        return []

    def close(self) -> None:
        """Release host resources (files, tap fds)."""

    def state(self) -> dict[str, Any]:
        """The device type's own state, beyond what the transport saves (features,
        queues): plain values (kvmpy.state.values). The transport holds `lock`."""
        return {}

    def restore(self, reader: StateReader) -> None:
        """Take a `state()`: check every value, then apply it. Called by the transport
        with `lock` held, after it restored `acked_features`, the queues and `active`."""
        reader.done()

    def restorer(self, reader: StateReader) -> Callable[[], None]:
        """What `restore`s this state as often as asked (the transport's `restorer`). By
        default `restore` itself each time, checks and all; a device whose checks cost
        more than its state does overrides it to check once."""
        return lambda: self.restore(reader.again())

    # -- helpers for subclasses -------------------------------------------------------
    def has_feature(self, n: int) -> bool:
        return bool(self.acked_features & (1 << n))

    def signal_used(self, queue: Virtqueue) -> None:
        if self.host is not None:
            self.host.signal_used(queue)

    def needs_reset(self, reason: str) -> None:
        if self.host is not None:
            self.host.needs_reset(reason)

    def run_guarded(self, fn: Callable[[], None]) -> None:
        """Run device work that did not come from a notification (backend input).

        Takes the lock, does nothing unless the device is active, and turns any
        failure into DEVICE_NEEDS_RESET rather than an exception.
        """
        with self.lock:
            if self.host is not None and self.active:
                self.host.run_guarded(fn)

    def drain(self, index: int, handle: Callable[[DescriptorChain], int]) -> None:
        """Pop every available chain of queue `index`, complete each, signal once.

        `handle(chain)` returns the used length for the chain. After the ring
        runs dry, `enable_notification` re-arms EVENT_IDX and catches buffers
        that raced with it.
        """
        q = self.queues[index]
        limiter = self.limiters.get(index)
        used = False
        while True:
            while (chain := q.pop()) is not None:
                if limiter is not None and not self._admit(index, limiter, chain):
                    q.undo_pop()  # served when the limiter's retry comes
                    if used:
                        self.signal_used(q)
                    return
                q.add_used(chain.head, handle(chain))
                used = True
            if not q.enable_notification():
                break
        if used:
            self.signal_used(q)

    def _admit(self, index: int, limiter: RateLimiter, chain: DescriptorChain) -> bool:
        """May `chain` be served now? If not, queue `index` is tried again when the
        limiter says, on the I/O thread (without one, at the next notification)."""
        chain.spans()  # (walks and checks the chain: its byte counts for rate_cost)
        wait = limiter.consume(self.rate_cost(chain))
        if not wait:
            return True
        if index not in self._retrying and self.call_later is not None:
            self._retrying.add(index)
            self.call_later(wait, lambda: self._retry(index))
        return False

    def rate_cost(self, chain: DescriptorChain) -> int:
        """The bytes a request moves, as its rate limiter counts them."""
        return chain.readable_bytes + chain.writable_bytes

    def _retry(self, index: int) -> None:
        self._retrying.discard(index)
        self.run_guarded(lambda: self.process_queue(index))
