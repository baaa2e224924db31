"""The virtio-mmio transport, version 2 (virtio 1.2 §4.2): registers in a 4 KiB window.

What it is: a bus `Device` (`read(offset, size)`, `write(offset, data)`)
that presents one `VirtioDevice` to the guest: the §4.2.2 register layout,
feature negotiation (VIRTIO_F_VERSION_1 required; FEATURES_OK refused
otherwise), the device-status state machine (§2.1, §3.1), queue setup, queue
notifications, InterruptStatus/InterruptACK driving an `IrqLine`, the
configuration space at 0x100 with ConfigGeneration, and reset.

Guest misbehaviour never raises: control registers accept only aligned 32-bit
accesses (anything else reads zeros and is dropped, logged once), a broken
virtqueue or a failure inside a device sets DEVICE_NEEDS_RESET and raises a
configuration-change interrupt (§2.1.2), and the device then uses no more
buffers until the driver resets it.

Interrupts. `InterruptStatus != 0` is the level of the line. With a level
`IrqLine` the transport follows it; with an irqfd (`EventFdIrq`, an edge) it
pulses when a bit goes from 0 to 1. Linux's vm_interrupt() reads the status,
acknowledges it, and only then walks the used rings, so an event that arrives
while its bit is still set is seen by the handler that clears it: a pulse per
new bit is enough.

Notifications. Without ioeventfd a QueueNotify write arrives through the bus.
With KVM_IOEVENTFD on `base + QUEUE_NOTIFY` (datamatch = queue index) KVM
signals an eventfd instead and the I/O thread calls `handle_notify(index)`.

Linux finds the device through `cmdline_fragment()` (virtio_mmio.device=).

What it is not: virtio-pci, the legacy (version 1) interface, shared memory
regions, VIRTIO_F_NOTIFICATION_DATA or VIRTIO_F_RING_RESET.

Learned from Firecracker's devices/virtio/mmio.rs and Linux's
drivers/virtio/virtio_mmio.c (what a real driver does, in which order).
"""

from __future__ import annotations

import functools
import os
import select
import struct
import threading
from collections.abc import Callable
from typing import Any

from kvmpy import layout
from kvmpy.bus import IrqLine, NullIrq
from kvmpy.errors import GuestMemoryError
from kvmpy.log import INFO, get_logger
from kvmpy.memory import GuestMemory
from kvmpy.state.values import U32, StateReader
from kvmpy.virtio.device import (
    TRANSPORT_FEATURES,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_STATUS_ACKNOWLEDGE,
    VIRTIO_STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_STATUS_DRIVER,
    VIRTIO_STATUS_DRIVER_OK,
    VIRTIO_STATUS_FAILED,
    VIRTIO_STATUS_FEATURES_OK,
    LogOnce,
    VirtioDevice,
)
from kvmpy.virtio.queue import Virtqueue, VirtqueueError

log = get_logger(__name__)

# §4.2.2 register offsets
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

MAGIC = 0x74726976  # "virt"
MMIO_VERSION = 2
VENDOR = 0x4B564D50  # "PMVK": any value; Linux only prints it

# InterruptStatus bits (§4.2.2)
VIRTIO_MMIO_INT_VRING = 1
VIRTIO_MMIO_INT_CONFIG = 2

_U32 = struct.Struct("<I")

# queue address registers: offset -> (attribute, high half?)
_QUEUE_ADDRESS = {
    QUEUE_DESC_LOW: ("desc_table", False),
    QUEUE_DESC_HIGH: ("desc_table", True),
    QUEUE_DRIVER_LOW: ("avail_ring", False),
    QUEUE_DRIVER_HIGH: ("avail_ring", True),
    QUEUE_DEVICE_LOW: ("used_ring", False),
    QUEUE_DEVICE_HIGH: ("used_ring", True),
}


def slot_base(slot: int) -> int:
    """Guest-physical base of virtio-mmio window `slot`."""
    if not 0 <= slot < layout.VIRTIO_MMIO_SLOTS:
        raise ValueError(f"virtio-mmio slot {slot} outside 0..{layout.VIRTIO_MMIO_SLOTS - 1}")
    return layout.VIRTIO_MMIO_BASE + slot * layout.VIRTIO_MMIO_SIZE


def slot_irq(slot: int) -> int:
    """GSI of virtio-mmio window `slot` (it must be an IO-APIC pin)."""
    if not 0 <= slot < len(layout.VIRTIO_IRQS):
        raise ValueError(f"virtio-mmio slot {slot}: only {len(layout.VIRTIO_IRQS)} free "
                         "IO-APIC pins for virtio devices")
    return layout.VIRTIO_IRQS[slot]


def cmdline_fragment(base: int, irq: int, size: int = layout.VIRTIO_MMIO_SIZE) -> str:
    """`virtio_mmio.device=<size>@<base>:<irq>` for Linux's VIRTIO_MMIO_CMDLINE_DEVICES."""
    if size % 1024 == 0:
        size_text = f"{size // 1024}K"
    else:
        size_text = str(size)
    return f"virtio_mmio.device={size_text}@{base:#x}:{irq}"


class VirtioMmioTransport:
    """One virtio-mmio window presenting `device`; put it on the MMIO bus at its base."""

    # the registers a device reset clears (`_clear`)
    status: int
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    queue_sel: int

    def __init__(self, device: VirtioDevice, mem: GuestMemory, irq: IrqLine | None = None,
                 *, label: str | None = None) -> None:
        self.device = device
        self.mem = mem
        self.irq: IrqLine = irq if irq is not None else NullIrq()
        self.label = label or device.name
        self.warn = LogOnce(f"virtio-mmio {self.label}")
        self.interrupt_status = 0
        self.config_generation = 0
        # InterruptStatus has its own lock (taken after device.lock, never before it) so
        # that reading and acknowledging it never waits for a request being served.
        self._irq_lock = threading.Lock()
        # an eventfd KVM signals for each InterruptACK of VIRTIO_MMIO_INT_VRING alone, with
        # no exit (`take_acks_from`), and a poll on it; -1 / None: acks come as writes
        self._ack_fd = -1
        self._ack_poll: select.poll | None = None
        device.host = self
        device.mem = mem
        self._clear()

    def _clear(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0

    @property
    def device_features(self) -> int:
        return self.device.device_features() | TRANSPORT_FEATURES

    @property
    def queues(self) -> list[Virtqueue]:
        return self.device.queues

    def _selected_queue(self) -> Virtqueue | None:
        if 0 <= self.queue_sel < len(self.queues):
            return self.queues[self.queue_sel]
        return None

    # -- state (virtio 1.2 §2.1, §4.2.2) --------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The registers the driver set, the negotiated features, every queue, and the
        device's own state. The caller keeps the device quiet (no notification or
        backend callback runs meanwhile); a request is never half done under the lock."""
        with self.device.lock, self._irq_lock:
            if self._ack_fd >= 0:
                self._take_acks()
            return {"device_id": self.device.device_id, "status": self.status,
                    "device_features_sel": self.device_features_sel,
                    "driver_features_sel": self.driver_features_sel,
                    "driver_features": self.driver_features, "queue_sel": self.queue_sel,
                    "interrupt_status": self.interrupt_status,
                    "config_generation": self.config_generation,
                    "acked_features": self.device.acked_features,
                    "queues": [q.state() for q in self.queues], "device": self.device.state()}

    def restore(self, state: object, where: str = "virtio") -> None:
        """Take a `state()`. The status must be one the §3.1.1 sequence reaches, the
        features ones this device offers and accepts, every ready queue inside guest
        RAM; nothing changes unless all of it holds. The device is live again exactly
        when DRIVER_OK is set without FAILED or DEVICE_NEEDS_RESET."""
        self.restorer(state, where)()

    def restorer(self, state: object, where: str = "virtio") -> Callable[[], None]:
        """`restore`, checked now (the device's own part as its `restorer` says): returns
        what puts the state back, as often as asked."""
        r = StateReader(state, where)
        device_id = r.int("device_id", 0, U32)
        if device_id != self.device.device_id:
            raise r.fail("device_id", f"device {device_id}, but this slot holds a "
                         f"{self.device.name} (device {self.device.device_id})")
        status = r.int("status", 0, 0xFF)
        _check_status(r, status)
        selectors = [r.int(name, 0, U32) for name in ("device_features_sel",
                                                        "driver_features_sel", "queue_sel")]
        driver_features = r.int("driver_features")
        interrupt_status = r.int("interrupt_status", 0, U32)
        if interrupt_status & ~(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG):
            raise r.fail("interrupt_status", f"{interrupt_status:#x} has undefined bits")
        config_generation = r.int("config_generation", 0, U32)
        acked = r.int("acked_features")
        if status & VIRTIO_STATUS_FEATURES_OK:
            if acked & ~self.device_features or not acked & (1 << VIRTIO_F_VERSION_1) \
                    or not self.device.accept_features(acked):
                raise r.fail("acked_features", f"{acked:#x} is not a feature set this "
                             f"{self.device.name} offers and accepts")
        elif acked:
            raise r.fail("acked_features", "features acked before FEATURES_OK")
        queues = [q.restorer(reader, self.mem) for q, reader in zip(
            self.queues, r.subs("queues", len(self.queues), exact=len(self.queues)),
            strict=True)]
        device = self.device.restorer(r.sub("device"))
        r.done()
        active = bool(status & VIRTIO_STATUS_DRIVER_OK) and not status & (
            VIRTIO_STATUS_FAILED | VIRTIO_STATUS_DEVICE_NEEDS_RESET)

        def put() -> None:
            with self.device.lock, self._irq_lock:
                before = self.device.acked_features, self.device.active
                self.device.acked_features, self.device.active = acked, active
                try:
                    device()
                except Exception:
                    self.device.acked_features, self.device.active = before
                    raise
                for queue in queues:
                    queue()
                self.status = status
                self.device_features_sel, self.driver_features_sel, self.queue_sel = selectors
                self.driver_features = driver_features
                self.config_generation = config_generation
                if self._ack_fd >= 0:
                    self._take_acks()  # (acknowledgements of what the state replaces)
                self.interrupt_status = interrupt_status
                if status & VIRTIO_STATUS_DRIVER_OK:
                    for q in self.queues:
                        if q.ready:
                            self._activate_queue(q)
                self.irq.set_level(bool(interrupt_status))

        return put

    def process_all(self) -> None:
        """Look at every ready queue of a live device once, as after DRIVER_OK: a restored
        device's driver may have notified the process the state came from, not this one."""
        with self.device.lock:
            for index, q in enumerate(self.queues):
                if q.ready and self.device.active:
                    self.run_guarded(functools.partial(self.device.process_queue, index))

    # -- the bus Device protocol --------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        if offset == INTERRUPT_STATUS and size == 4:
            # The guest's interrupt handler must not wait for device I/O in progress.
            with self._irq_lock:
                if self._ack_poll is not None and self._ack_poll.poll(0):
                    self._take_acks()  # (a poll, not a read: usually there are none)
                return _U32.pack(self.interrupt_status)
        with self.device.lock:
            try:
                return self._read(offset, size)
            except Exception:  # a device bug must not kill the vCPU thread
                log.exception("%s: read at %#x", self.label, offset)
                self.needs_reset("internal error in a register read")
                return bytes(max(0, min(size, 8)))

    def write(self, offset: int, data: bytes) -> None:
        if offset == INTERRUPT_ACK and len(data) == 4:
            self._ack_interrupt(_U32.unpack(data)[0])
            return
        with self.device.lock:
            try:
                if len(data) == 4 and offset < CONFIG and not offset % 4:  # a register
                    self._write_register(offset, _U32.unpack(data)[0])
                else:
                    self._write(offset, bytes(data))
            except Exception:
                log.exception("%s: write at %#x", self.label, offset)
                self.needs_reset("internal error in a register write")

    def handle_notify(self, index: int) -> None:
        """A QueueNotify that came through an ioeventfd (called by the I/O thread)."""
        device = self.device
        with device.lock:
            if device.active and 0 <= index < len(self.queues) and self.queues[index].ready:
                try:  # (`run_guarded`, written out: this is every request's path)
                    device.process_queue(index)
                except Exception as e:
                    self._failed(e)
            else:
                self._notify(index)  # which says what is wrong

    # -- reads --------------------------------------------------------------------------
    def _read(self, offset: int, size: int) -> bytes:
        if offset >= CONFIG:
            if size not in (1, 2, 4, 8):
                self.warn("cfg-size", "config read of %d bytes; reads zeros", size)
                return bytes(max(0, min(size, 8)))
            return self.device.read_config(offset - CONFIG, size)
        if size != 4 or offset % 4:
            # §4.2.2.2: control registers take aligned 32-bit accesses only.
            self.warn("rd-size", "%d-byte read at %#x; reads zeros", size, offset)
            return bytes(max(0, min(size, 8)))
        return _U32.pack(self._read_register(offset) & 0xFFFFFFFF)

    def _read_register(self, offset: int) -> int:
        q = self._selected_queue()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION:
            return MMIO_VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID:
            return VENDOR
        if offset == DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return self.device_features >> (32 * self.device_features_sel)
        if offset == QUEUE_NUM_MAX:  # 0 means "no such queue"
            return q.max_size if q is not None else 0
        if offset == QUEUE_READY:
            return int(q is not None and q.ready)
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFFFFFF  # no shared memory regions: all ones
        if offset == QUEUE_RESET:
            return 0  # VIRTIO_F_RING_RESET is not offered
        if offset == CONFIG_GENERATION:
            return self.config_generation
        self.warn("rd-unknown", "read of write-only or unknown register %#x", offset)
        return 0

    # -- writes -------------------------------------------------------------------------
    def _write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if offset >= CONFIG:
            if size not in (1, 2, 4, 8):
                self.warn("cfg-size", "config write of %d bytes; dropped", size)
                return
            self.device.write_config(offset - CONFIG, data)
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            return
        if size != 4 or offset % 4:
            self.warn("wr-size", "%d-byte write at %#x; dropped", size, offset)
            return
        self._write_register(offset, _U32.unpack(data)[0])

    def _write_register(self, offset: int, value: int) -> None:
        if offset == QUEUE_NOTIFY:  # the hot one: a driver's every request
            # (no VIRTIO_F_NOTIFICATION_DATA: the value is the index)
            self._notify(value)
        elif offset in _QUEUE_ADDRESS or offset == QUEUE_NUM:
            self._write_queue_config(self._selected_queue(), offset, value)
        elif offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_READY:
            self._write_queue_ready(self._selected_queue(), value)
        elif offset == INTERRUPT_ACK:
            self._ack_interrupt(value)
        elif offset == STATUS:
            self._write_status(value)
        elif offset not in (SHM_SEL, QUEUE_RESET):  # nothing to select or reset there
            self.warn("wr-unknown", "write to read-only or unknown register %#x", offset)

    def _write_driver_features(self, value: int) -> None:
        # §3.1.1: features are written after DRIVER and before FEATURES_OK.
        if not self.status & VIRTIO_STATUS_DRIVER or self.status & VIRTIO_STATUS_FEATURES_OK:
            self.warn("feat-late", "DriverFeatures written outside negotiation; ignored")
            return
        if self.driver_features_sel > 1:
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _write_queue_config(self, q: Virtqueue | None, offset: int, value: int) -> None:
        if q is None:
            self.warn("qsel", "queue register %#x for missing queue %d", offset, self.queue_sel)
            return
        if q.ready:
            # §4.2.2.3: not while QueueReady is set.
            self.warn("q-live", "queue %d reconfigured while ready; ignored", self.queue_sel)
            return
        if offset == QUEUE_NUM:
            q.size = value
            return
        attr, high = _QUEUE_ADDRESS[offset]
        old = getattr(q, attr)
        if high:
            setattr(q, attr, (old & 0xFFFFFFFF) | (value << 32))
        else:
            setattr(q, attr, (old & ~0xFFFFFFFF) | value)

    def _write_queue_ready(self, q: Virtqueue | None, value: int) -> None:
        if q is None:
            self.warn("qsel", "QueueReady for missing queue %d", self.queue_sel)
            return
        if not value & 1:
            q.ready = False  # the driver stops using the queue; so do we
            return
        if q.ready:
            return
        problem = q.check(self.mem)
        if problem is not None:
            self.needs_reset(f"queue {self.queue_sel}: {problem}")
            return
        q.ready = True
        if self.device.active:
            self._activate_queue(q)

    def _activate_queue(self, q: Virtqueue) -> None:
        q.activate(
            self.mem,
            event_idx=bool(self.device.acked_features & (1 << VIRTIO_F_EVENT_IDX)),
            indirect=bool(self.device.acked_features & (1 << VIRTIO_F_INDIRECT_DESC)),
        )

    # -- status (§2.1, §3.1.1) -------------------------------------------------------------
    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self._reset()
            return
        current = self.status & ~VIRTIO_STATUS_DEVICE_NEEDS_RESET
        wanted = value & ~VIRTIO_STATUS_DEVICE_NEEDS_RESET
        if current & VIRTIO_STATUS_FAILED:
            # §2.1.1: a driver that set FAILED must reset the device before using it again.
            self.warn("status-failed", "status %#x after FAILED, without reset; ignored", wanted)
            return
        if wanted & current != current:
            self.warn("status-clear", "driver cleared status bits (%#x -> %#x) without reset",
                      current, wanted)
            return
        new = wanted & ~current
        if new & VIRTIO_STATUS_FAILED:
            self.status |= VIRTIO_STATUS_FAILED
            self.device.active = False
            return
        if new & VIRTIO_STATUS_ACKNOWLEDGE:
            self.status |= VIRTIO_STATUS_ACKNOWLEDGE
        if new & VIRTIO_STATUS_DRIVER:
            if not self.status & VIRTIO_STATUS_ACKNOWLEDGE:
                self.warn("status-order", "DRIVER before ACKNOWLEDGE; ignored")
                return
            self.status |= VIRTIO_STATUS_DRIVER
        if new & VIRTIO_STATUS_FEATURES_OK:
            if not self.status & VIRTIO_STATUS_DRIVER:
                self.warn("status-order", "FEATURES_OK before DRIVER; ignored")
                return
            if not self._negotiate():
                return  # FEATURES_OK stays clear: the driver reads it back (§3.1.1 step 6)
            self.status |= VIRTIO_STATUS_FEATURES_OK
        if new & VIRTIO_STATUS_DRIVER_OK:
            if not self.status & VIRTIO_STATUS_FEATURES_OK:
                self.warn("status-order", "DRIVER_OK before FEATURES_OK; ignored")
                return
            self.status |= VIRTIO_STATUS_DRIVER_OK
            self._activate()

    def _negotiate(self) -> bool:
        acked = self.driver_features
        offered = self.device_features
        if acked & ~offered:
            self.warn("feat-extra", "driver acked features %#x that were not offered",
                      acked & ~offered)
            return False
        if not acked & (1 << VIRTIO_F_VERSION_1):
            # §6.1: a version-2 device has no legacy interface to fall back to.
            self.warn("feat-legacy", "driver did not accept VIRTIO_F_VERSION_1; refused")
            return False
        if not self.device.accept_features(acked):
            self.warn("feat-device", "device refused feature set %#x", acked)
            return False
        self.device.acked_features = acked
        return True

    def _activate(self) -> None:
        if self.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET:
            # Broken before the driver went live (a bad queue address): tell it now.
            self.raise_interrupt(VIRTIO_MMIO_INT_CONFIG)
            return
        for index, q in enumerate(self.queues):
            if q.ready:
                self._activate_queue(q)
            else:
                self.warn("q-unused", "queue %d not set up by the driver", index,
                          level=INFO)
        self.device.active = True
        self.run_guarded(self.device.activate)
        # Buffers added before DRIVER_OK got no notification (§3.1.1): look once.
        for index, q in enumerate(self.queues):
            if q.ready and self.device.active:
                self.run_guarded(functools.partial(self.device.process_queue, index))

    def _reset(self) -> None:
        """§2.4 / §4.2.3.1: Status=0 resets the device; InterruptStatus and QueueReady clear."""
        self.device.active = False
        try:
            self.device.reset()
        except Exception:
            log.exception("%s: reset", self.label)
        for q in self.queues:
            q.reset()
        self.device.acked_features = 0
        self._clear()
        self._ack_interrupt(0xFFFFFFFF)

    # -- notifications and interrupts -------------------------------------------------------
    def _notify(self, index: int) -> None:
        if not self.device.active:
            self.warn("notify-inactive", "queue notify while the device is not live; ignored",
                      level=INFO)
            return
        if not 0 <= index < len(self.queues) or not self.queues[index].ready:
            self.warn("notify-not-ready", "notify for queue %d, which is not ready", index)
            return
        self.run_guarded(lambda: self.device.process_queue(index))

    def run_guarded(self, fn: Callable[[], None]) -> None:
        """Run device work; a broken ring or a device failure becomes NEEDS_RESET."""
        try:
            fn()
        except Exception as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        """Device work failed: the driver broke a rule, or the device has a bug."""
        if isinstance(e, VirtqueueError):
            self.needs_reset(str(e))
        elif isinstance(e, GuestMemoryError):
            self.needs_reset(f"guest memory: {e}")
        else:
            log.exception("%s: device failure", self.label)  # (called inside `except`)
            self.needs_reset(f"device failure: {e!r}")

    def signal_used(self, queue: Virtqueue) -> None:
        if queue.needs_notification():
            self.raise_interrupt(VIRTIO_MMIO_INT_VRING)

    def raise_interrupt(self, bits: int) -> None:
        with self._irq_lock:
            if self._ack_fd >= 0:
                self._take_acks()
            old = self.interrupt_status
            self.interrupt_status = old | bits
            if self.interrupt_status & ~old:
                self.irq.set_level(True)

    def _ack_interrupt(self, value: int) -> None:
        with self._irq_lock:
            if self._ack_fd >= 0:
                self._take_acks()
            old = self.interrupt_status
            self.interrupt_status &= ~value
            if old and not self.interrupt_status:
                self.irq.set_level(False)

    # -- acknowledgements without an exit ----------------------------------------------------
    def take_acks_from(self, fd: int) -> None:
        """Acknowledgements of used-buffer interrupts arrive on eventfd `fd` (-1: as
        register writes again).

        Linux's interrupt handler reads InterruptStatus, then writes what it read to
        InterruptACK: VIRTIO_MMIO_INT_VRING, nearly always. With KVM_IOEVENTFD on
        InterruptACK matching that value (kvmpy.virtio.iothread.wire_eventfds) KVM
        counts such writes on `fd` instead of leaving KVM_RUN: one exit to userspace
        less per interrupt. Every step that depends on InterruptStatus takes the acks
        counted so far first (`_take_acks`, under the status lock): the guest's next
        read of it, the device's next interrupt (which pulses only on a bit going from
        0 to 1), another acknowledgement, a snapshot. KVM counts a write before the
        vCPU goes on, so each of those sees every acknowledgement the guest made before
        it, as if it had been a register write. Other values still exit as writes.
        """
        with self._irq_lock:
            if fd < 0 and self._ack_fd >= 0:
                self._take_acks()
            self._ack_fd = fd
            self._ack_poll = None
            if fd >= 0:
                self._ack_poll = select.poll()
                self._ack_poll.register(fd, select.POLLIN)

    def _take_acks(self) -> None:
        """Apply the acknowledgements KVM counted on the eventfd (under `_irq_lock`)."""
        try:
            os.eventfd_read(self._ack_fd)
        except BlockingIOError:
            return
        old = self.interrupt_status
        self.interrupt_status &= ~VIRTIO_MMIO_INT_VRING
        if old and not self.interrupt_status:
            self.irq.set_level(False)

    def config_changed(self) -> None:
        """The device changed its configuration space (§2.5.1, §4.2.3.3)."""
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        if self.status & VIRTIO_STATUS_DRIVER_OK:
            self.raise_interrupt(VIRTIO_MMIO_INT_CONFIG)

    def needs_reset(self, reason: str) -> None:
        """§2.1.2: stop using buffers, set DEVICE_NEEDS_RESET, tell a live driver."""
        self.device.active = False
        if self.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET:
            return
        log.warning("%s: device needs reset: %s", self.label, reason)
        self.status |= VIRTIO_STATUS_DEVICE_NEEDS_RESET
        if self.status & VIRTIO_STATUS_DRIVER_OK:
            self.raise_interrupt(VIRTIO_MMIO_INT_CONFIG)

    @property
    def broken(self) -> bool:
        return bool(self.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET)


# §3.1.1: each status bit the driver sets needs the one before it (FAILED and
# DEVICE_NEEDS_RESET aside, which can come at any point)
_STATUS_NEEDS = ((VIRTIO_STATUS_DRIVER, VIRTIO_STATUS_ACKNOWLEDGE),
                 (VIRTIO_STATUS_FEATURES_OK, VIRTIO_STATUS_DRIVER),
                 (VIRTIO_STATUS_DRIVER_OK, VIRTIO_STATUS_FEATURES_OK))
_STATUS_BITS = (VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK
                | VIRTIO_STATUS_DRIVER_OK | VIRTIO_STATUS_DEVICE_NEEDS_RESET
                | VIRTIO_STATUS_FAILED)


def _check_status(r: StateReader, status: int) -> None:
    if status & ~_STATUS_BITS:
        raise r.fail("status", f"{status:#x} has undefined bits")
    for bit, needs in _STATUS_NEEDS:
        if status & bit and not status & needs:
            raise r.fail("status", f"{status:#x} has {bit:#x} without {needs:#x}")

