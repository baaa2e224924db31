"""Split virtqueue: chain validation, used ring publishing, notification suppression."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.memory import GuestMemory
from kvmpy.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Virtqueue,
    VirtqueueError,
    vring_need_event,
)

MEM = 0x10000
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
SIZE = 8
N, W, IND = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


def make_queue(size: int = SIZE, *, event_idx: bool = False, indirect: bool = True
               ) -> tuple[Virtqueue, GuestMemory, bytearray]:
    buf = bytearray(MEM)
    mem = GuestMemory.from_buffer(buf)
    q = Virtqueue(size)
    q.desc_table, q.avail_ring, q.used_ring = DESC, AVAIL, USED
    q.ready = True
    assert q.check(mem) is None
    q.activate(mem, event_idx=event_idx, indirect=indirect)
    return q, mem, buf


def put_desc(mem: GuestMemory, index: int, addr: int, length: int, flags: int = 0,
             nxt: int = 0, table: int = DESC) -> None:
    mem.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))


def offer(mem: GuestMemory, q: Virtqueue, *heads: int) -> None:
    idx = mem.read_u16(AVAIL + 2)
    for head in heads:
        mem.write_u16(AVAIL + 4 + 2 * (idx % q.size), head)
        idx = (idx + 1) & 0xFFFF
    mem.write_u16(AVAIL + 2, idx)


def test_direct_chain_yields_zero_copy_views_in_order() -> None:
    q, mem, buf = make_queue()
    mem.write(0x5000, b"hello")
    put_desc(mem, 3, 0x5000, 5, N, 6)
    put_desc(mem, 6, 0x6000, 4, W)
    offer(mem, q, 3)
    chain = q.pop()
    assert chain is not None and chain.head == 3
    readable, writable = chain.buffers()
    assert [bytes(v) for v in readable] == [b"hello"]
    writable[0][:] = b"abcd"
    assert buf[0x6000:0x6004] == b"abcd"  # the view is guest memory itself
    assert writable[0].obj is buf
    assert q.pop() is None


def test_indirect_table_after_direct_descriptors() -> None:
    q, mem, _ = make_queue()
    put_desc(mem, 0, 0x5000, 16, N, 1)  # §2.7.5.3.2: direct descriptors may precede it
    put_desc(mem, 1, 0x7000, 48, IND | W)  # WRITE on the table descriptor is ignored
    put_desc(mem, 0, 0x5100, 8, N, 1, table=0x7000)
    put_desc(mem, 1, 0x5200, 8, W | N, 2, table=0x7000)
    put_desc(mem, 2, 0x5300, 1, W, table=0x7000)
    offer(mem, q, 0)
    chain = q.pop()
    assert chain is not None
    descs = list(chain)
    assert [(d.addr, d.writable) for d in descs] == [
        (0x5000, False), (0x5100, False), (0x5200, True), (0x5300, True)]


T = 0x7000  # where the tests put an indirect table
# Each case: descriptors as (table, index, addr, len, flags, next), then the expected complaint.
BROKEN = [
    ([(DESC, 0, 0x5000, 8, N, 1), (DESC, 1, 0x5000, 8, N, 0)], "loop"),
    ([(DESC, 0, 0x5000, 8, N, 9)], "outside"),
    ([(DESC, 0, MEM - 4, 8, 0, 0)], "not in guest RAM"),
    ([(DESC, 0, 2**64 - 8, 16, 0, 0)], "not in guest RAM"),
    ([(DESC, 0, 0x5000, 0xFFFFFFFF, 0, 0)], "not in guest RAM"),
    ([(DESC, 0, 0x5000, 8, W | N, 1), (DESC, 1, 0x5000, 8, 0, 0)], "readable"),
    ([(DESC, 0, T, 20, IND, 0)], "multiple of 16"),
    ([(DESC, 0, T, 0, IND, 0)], "multiple of 16"),
    ([(DESC, 0, T, 16, IND | N, 1)], "INDIRECT and NEXT"),
    ([(DESC, 0, MEM - 16, 32, IND, 0)], "not in RAM"),
    ([(DESC, 0, T, 16, IND, 0), (T, 0, 0x7100, 16, IND, 0)], "inside an indirect"),
    ([(DESC, 0, T, 32, IND, 0), (T, 0, 0x5000, 8, N, 0)], "loop"),
    ([(DESC, 0, T, 32, IND, 0), (T, 0, 0x5000, 8, N, 2)], "outside"),
]


@pytest.mark.parametrize("descs, message", BROKEN)
def test_broken_chains_raise_virtqueue_error(descs: list[tuple[int, ...]], message: str) -> None:
    q, mem, _ = make_queue()
    for table, index, addr, length, flags, nxt in descs:
        put_desc(mem, index, addr, length, flags, nxt, table=table)
    offer(mem, q, 0)
    chain = q.pop()
    assert chain is not None
    with pytest.raises(VirtqueueError, match=message):
        chain.buffers()


def test_indirect_needs_the_feature() -> None:
    q, mem, _ = make_queue(indirect=False)
    put_desc(mem, 0, 0x7000, 16, IND)
    offer(mem, q, 0)
    with pytest.raises(VirtqueueError, match="INDIRECT_DESC"):
        q.pop().buffers()  # type: ignore[union-attr]


def test_available_ring_checks_head_and_index() -> None:
    q, mem, _ = make_queue()
    offer(mem, q, 8)  # head == queue size
    with pytest.raises(VirtqueueError, match="head 8"):
        q.pop()
    q, mem, _ = make_queue()
    mem.write_u16(AVAIL + 2, SIZE + 1)  # more new entries than the ring holds
    with pytest.raises(VirtqueueError, match="ahead"):
        q.pop()


def test_used_ring_publish_and_wrap() -> None:
    q, mem, _ = make_queue()
    q.next_used = 0xFFFF
    q.add_used_batch([(2, 100), (5, 7)])
    assert mem.read_u16(USED + 2) == 1
    slot_ffff = 0xFFFF % SIZE
    assert struct.unpack("<II", mem.read(USED + 4 + 8 * slot_ffff, 8)) == (2, 100)
    assert struct.unpack("<II", mem.read(USED + 4, 8)) == (5, 7)


def test_vring_need_event_matches_linux() -> None:
    assert vring_need_event(0, 1, 0)  # first buffer used, driver asked for idx 0
    assert not vring_need_event(5, 3, 2)
    assert vring_need_event(5, 6, 2)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # across the wrap
    assert not vring_need_event(3, 3, 3)  # nothing new


def test_no_interrupt_flag_without_event_idx() -> None:
    q, mem, _ = make_queue()
    q.add_used(0, 0)
    assert q.needs_notification()
    mem.write_u16(AVAIL, VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.add_used(0, 0)
    assert not q.needs_notification()


def test_event_idx_suppression_and_avail_event() -> None:
    q, mem, _ = make_queue(event_idx=True)
    used_event = AVAIL + 4 + 2 * SIZE
    mem.write_u16(used_event, 2)  # interrupt when used idx passes 2
    q.add_used(0, 0)
    assert q.needs_notification()  # the first signal always goes out
    q.add_used(0, 0)
    assert not q.needs_notification()  # idx 1 written, waiting for 2
    q.add_used(0, 0)
    assert q.needs_notification()
    q.next_avail = 5
    mem.write_u16(AVAIL + 2, 5)
    assert not q.enable_notification()
    assert mem.read_u16(USED + 4 + 8 * SIZE) == 5  # avail_event
    mem.write_u16(AVAIL + 2, 6)
    assert q.enable_notification()


@pytest.mark.parametrize("attr, value, problem", [
    ("size", 6, "power of two"),
    ("size", 16, "power of two"),  # larger than max_size 8
    ("desc_table", 0x1008, "aligned"),
    ("used_ring", 0x3002, "aligned"),
    ("avail_ring", MEM - 4, "not in guest RAM"),
])
def test_queue_configuration_checks(attr: str, value: int, problem: str) -> None:
    q, mem, _ = make_queue()
    setattr(q, attr, value)
    assert problem in (q.check(mem) or "")


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    table=st.lists(st.tuples(st.integers(0, 2**64 - 1) | st.integers(0, MEM),
                             st.integers(0, 2**32 - 1) | st.integers(0, 64),
                             st.integers(0, 7) | st.integers(0, 0xFFFF),
                             st.integers(0, 0xFFFF) | st.integers(0, SIZE)),
                   min_size=SIZE, max_size=SIZE),
    indirect_table=st.binary(min_size=0, max_size=256),
    head=st.integers(0, 0xFFFF),
    avail_idx=st.integers(0, 0xFFFF),
)
def test_hostile_descriptor_tables_never_escape(table, indirect_table, head, avail_idx) -> None:  # type: ignore[no-untyped-def]
    q, mem, _ = make_queue()
    for i, (addr, length, flags, nxt) in enumerate(table):
        put_desc(mem, i, addr, length, flags, nxt)
    mem.write(0x7000, indirect_table)
    mem.write_u16(AVAIL + 4, head)
    mem.write_u16(AVAIL + 2, avail_idx)
    try:
        chain = q.pop()
        if chain is None:
            return
        readable, writable = chain.buffers()
    except VirtqueueError:
        return
    # Whatever was accepted is inside guest memory and bounded by the tables.
    for v in readable + writable:
        assert v.obj is mem.regions[0].buffer
    assert len(readable) + len(writable) <= SIZE + 256 // 16
