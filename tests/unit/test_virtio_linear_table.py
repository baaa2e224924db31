"""The linear-table shortcut gives the walk's answer, for any indirect table (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_virtio_queue import IND, MEM, N, T, W, make_queue, offer, put_desc

from kvmpy.virtio import linear_table
from kvmpy.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError


def answer(q: Virtqueue, head: int, shortcut: bool) -> object:
    """The chain's buffers as (bytes, backing) per side, or the kind of error."""
    chain = DescriptorChain(q.mem, q.desc_table, q.size, head, True)  # type: ignore[arg-type]
    saved = linear_table.spans
    if not shortcut:
        linear_table.spans = lambda table: None  # type: ignore[assignment]
    try:
        readable, writable = chain.buffers()
    except VirtqueueError as e:
        return type(e)
    finally:
        linear_table.spans = saved
    return [[(bytes(v), v.obj) for v in side] for side in (readable, writable)]


def table_of(q, mem, entries, linear: bool) -> None:  # type: ignore[no-untyped-def]
    for i, (addr, length, flags, nxt) in enumerate(entries):
        if linear:  # Linux's shape: i -> i+1, NEXT on all but the last
            last = i == len(entries) - 1
            flags = (flags & ~N) | (0 if last else N)
            nxt = i + 1
        put_desc(mem, i, addr, length, flags, nxt, table=T)
    put_desc(mem, 0, T, 16 * len(entries), IND)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(st.tuples(st.sampled_from([0x5000, 0x6000, MEM - 8, 2**63]),
                                  st.integers(0, 64),
                                  st.sampled_from([0, N, W, N | W, IND, N | IND, 8, N | 8]),
                                  st.integers(0, 6)),
                        min_size=1, max_size=6),
       linear=st.booleans())
def test_the_shortcut_and_the_walk_agree(entries, linear) -> None:  # type: ignore[no-untyped-def]
    """Linux-shaped tables (and near misses) take the shortcut; the answer, spans or the
    kind of error, is the walk's."""
    q, mem, _ = make_queue()
    table_of(q, mem, entries, linear)
    assert answer(q, 0, shortcut=True) == answer(q, 0, shortcut=False)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(table=st.binary(min_size=1, max_size=8).flatmap(
    lambda n: st.binary(min_size=16 * len(n), max_size=16 * len(n))))
def test_the_shortcut_and_the_walk_agree_on_any_bytes(table: bytes) -> None:
    q, mem, _ = make_queue()
    mem.write(T, table)
    put_desc(mem, 0, T, len(table), IND)
    assert answer(q, 0, shortcut=True) == answer(q, 0, shortcut=False)


def test_a_remembered_table_changed_by_one_flag_is_checked_again(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The shortcut is memoized on the table's bytes: the same bytes (dd's buffer, read
    again) reuse the answer, and any change is a new table."""
    checked: list[bytes] = []
    real = linear_table.check
    monkeypatch.setattr(linear_table, "check", lambda t: checked.append(t) or real(t))
    q, mem, _ = make_queue()
    entries = [(0x5000, 16, N, 1), (0x6000, 512, N | W, 2), (0x6800, 1, W, 0)]
    table_of(q, mem, entries, linear=False)
    for _ in range(2):  # the second request is answered from the memo
        offer(mem, q, 0)
        chain = q.pop()
        assert chain is not None
        assert chain.spans() == ((0x5000,), (16,), (0x6000, 0x6800), (512, 1))
    assert len(checked) <= 1  # (none: an earlier test may have left it remembered)
    put_desc(mem, 1, 0x6000, 512, N | W | IND, 2, table=T)  # now an INDIRECT inside
    offer(mem, q, 0)
    chain = q.pop()
    assert chain is not None
    with pytest.raises(VirtqueueError, match="indirect descriptor inside"):
        chain.spans()
    assert len(checked) >= 1
