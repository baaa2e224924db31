"""virtio-mmio transports and devices saved mid-conversation and restored on a copy of guest
RAM: the driver carries on where it was, and a hostile state is refused in one line."""

from __future__ import annotations

import copy
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.bus import NullIrq
from kvmpy.errors import SnapshotError
from kvmpy.memory import GuestMemory
from kvmpy.virtio import mmio
from kvmpy.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, Block
from kvmpy.virtio.console import Console
from kvmpy.virtio.device import (
    VIRTIO_STATUS_ACKNOWLEDGE,
    VIRTIO_STATUS_DRIVER,
    VIRTIO_STATUS_DRIVER_OK,
    VirtioDevice,
)
from kvmpy.virtio.driver import GuestDriver, MemoryBackend
from kvmpy.virtio.net import Net
from kvmpy.virtio.rng import Rng
from tests.unit.hostile import check_restore, mutate, round_trip

MEM = 0x40000


def live(device: VirtioDevice, mem: GuestMemory | None = None
         ) -> tuple[mmio.VirtioMmioTransport, GuestDriver, NullIrq]:
    mem = mem or GuestMemory.from_buffer(bytearray(MEM))
    irq = NullIrq()
    t = mmio.VirtioMmioTransport(device, mem, irq)
    d = GuestDriver(t, mem)
    assert d.init()
    return t, d, irq


def restored(t: mmio.VirtioMmioTransport, d: GuestDriver, device: VirtioDevice
             ) -> tuple[mmio.VirtioMmioTransport, GuestDriver, NullIrq]:
    """The state and a copy of guest RAM in a new transport, and the driver moved over."""
    state = round_trip(t.state())
    mem = GuestMemory.from_buffer(bytearray(t.mem.read(0, MEM)))
    irq = NullIrq()
    t2 = mmio.VirtioMmioTransport(device, mem, irq)
    t2.restore(state)
    d2 = copy.copy(d)
    d2.t, d2.mem, d2.queues = t2, mem, copy.deepcopy(d.queues)
    return t2, d2, irq


def test_rng_request_offered_before_the_save_is_served_after_it() -> None:
    t, d, _ = live(Rng())
    d.add_chain(0, [], [32])
    assert len(d.used(0)) == 1
    d.add_chain(0, [], [16], kick=False)  # offered; the notify never reached this process
    t2, d2, irq2 = restored(t, d, Rng())
    assert t2.state() == t.state()
    assert t2.device.active and t2.queues[0].mem is t2.mem
    assert d2.used(0) == []
    t2.process_all()
    (done,) = d2.used(0)
    assert done[1] == 16 and done[2][0] != bytes(16)
    assert irq2.level


def test_block_writes_before_and_reads_after(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * 512))
    t, d, _ = live(Block(str(image)))
    d.add_chain(0, [struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 3), b"z" * 512], [1])
    assert d.used(0)[0][2] == [bytes([VIRTIO_BLK_S_OK])]
    d.add_chain(0, [struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 3)], [512, 1], kick=False)
    t2, d2, _ = restored(t, d, Block(str(image)))
    t2.process_all()
    (done,) = d2.used(0)
    assert done[2] == [b"z" * 512, bytes([VIRTIO_BLK_S_OK])]


def test_block_refuses_a_disk_of_another_size(tmp_path: Path) -> None:
    image, other = tmp_path / "disk.img", tmp_path / "other.img"
    image.write_bytes(bytes(64 * 512))
    other.write_bytes(bytes(65 * 512))
    t, _, _ = live(Block(str(image)))
    t2 = mmio.VirtioMmioTransport(Block(str(other)), t.mem, NullIrq())
    with pytest.raises(SnapshotError, match="virtio.device.capacity: 64 sectors, but this "
                       "disk has 65"):
        t2.restore(t.state())


def test_net_keeps_its_mac_and_the_frame_it_held() -> None:
    backend = MemoryBackend()
    t, d, _ = live(Net(backend, "52:54:00:ab:cd:ef"))
    backend.inbox.append(bytes(12) + b"a frame for the guest")
    t.device.on_backend_readable()  # no receive buffers yet: the frame waits in the device
    assert t.device.rx_len and t.device.rx_paused
    backend2 = MemoryBackend()
    t2, d2, _ = restored(t, d, Net(backend2))
    assert t2.read(mmio.CONFIG, 4) + t2.read(mmio.CONFIG + 4, 2) == bytes.fromhex("525400abcdef")
    assert backend2.offload_flags  # the guest's offloads, given to the new backend
    d2.add_chain(0, [], [2048])
    (done,) = d2.used(0)
    assert done[2][0][12:done[1]] == b"a frame for the guest"


def test_console_input_typed_before_the_save_arrives_after() -> None:
    t, d, _ = live(Console())
    t.device.enqueue_input(b"ls\n")  # no receive buffer yet
    t2, d2, _ = restored(t, d, Console())
    d2.add_chain(0, [], [64])
    (done,) = d2.used(0)
    assert done[2][0][: done[1]] == b"ls\n"


def test_transport_refuses_impossible_states() -> None:
    t, d, _ = live(Rng())
    good = t.state()
    cases = [
        ({"status": VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER_OK},
         "status: 0x5 has 0x4 without"),
        ({"status": 0x10 | VIRTIO_STATUS_ACKNOWLEDGE}, "undefined bits"),
        ({"acked_features": 1 << 60}, "is not a feature set"),
        ({"status": VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER},
         "features acked before FEATURES_OK"),
        ({"device_id": 2}, "device 2, but this slot holds a virtio-rng"),
        ({"interrupt_status": 4}, "undefined bits"),
        ({"queues": []}, "0 items, expected 1"),
        ({"queues": [good["queues"][0] | {"desc_table": MEM - 16}]}, "not in guest RAM"),
        ({"queues": [good["queues"][0] | {"size": 3}]}, "not a power of two"),
        ({"queues": [good["queues"][0] | {"next_used": 1 << 16}]}, "outside 0..0xffff"),
    ]
    for change, message in cases:
        fresh = mmio.VirtioMmioTransport(Rng(), t.mem, NullIrq())
        with pytest.raises(SnapshotError, match=message):
            fresh.restore(good | change)
        assert fresh.status == 0 and not fresh.device.active


def test_a_refused_device_state_leaves_the_transport_as_it_was() -> None:
    t, _, _ = live(Net(MemoryBackend()))
    fresh = mmio.VirtioMmioTransport(Net(MemoryBackend()), t.mem, NullIrq())
    before = fresh.state()
    bad = t.state()
    bad["device"]["mac"] = "01:00:00:00:00:00"
    with pytest.raises(SnapshotError, match="multicast"):
        fresh.restore(bad)
    assert fresh.state() == before


def exercise(t: mmio.VirtioMmioTransport) -> None:
    """What a guest can do to a restored device: never an exception out of it."""
    rng = random.Random(7)
    t.process_all()
    for _ in range(100):
        offset = rng.choice([0x30, 0x38, 0x44, 0x50, 0x60, 0x64, 0x70, 0x80, 0x100])
        if rng.random() < 0.5:
            t.read(offset, 4)
        else:
            t.write(offset, struct.pack("<I", rng.choice([0, 1, 2, 15, 0xFFFFFFFF])))
    t.process_all()


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), kind=st.sampled_from(["rng", "console", "net"]))
def test_hostile_transport_state(data: st.DataObject, kind: str) -> None:
    def device() -> VirtioDevice:
        return {"rng": Rng, "console": Console,
                "net": lambda: Net(MemoryBackend(), "52:54:00:00:00:01")}[kind]()

    t, d, _ = live(device())
    d.add_chain(0, [], [16], kick=False)
    mem = GuestMemory.from_buffer(bytearray(t.mem.read(0, MEM)))
    fresh = mmio.VirtioMmioTransport(device(), mem, NullIrq())
    check_restore(mutate(data, t.state()), fresh, fresh.restore, fresh.state, exercise)


def test_driver_ok_alone_does_not_make_a_broken_device_live() -> None:
    t, _, _ = live(Rng())
    t.needs_reset("test")
    fresh = mmio.VirtioMmioTransport(Rng(), t.mem, NullIrq())
    fresh.restore(t.state())
    assert fresh.status & VIRTIO_STATUS_DRIVER_OK and not fresh.device.active
