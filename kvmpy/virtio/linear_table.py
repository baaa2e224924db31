"""A shortcut for indirect descriptor tables laid out as Linux lays them out: checked a
column at a time, and remembered. A speed trick, behind this one door.

Why: a 1 MiB disk request from Linux is one indirect table of 258 entries, and
`DescriptorChain`'s walk (kvmpy.virtio.queue) checks it entry by entry in Python. Linux's
virtio_ring fills a table in order: entry i names i + 1 as next and has NEXT set, but
for the last entry, and the device-readable buffers come first. For such a table the
walk's rules reduce to whole-column comparisons (no loop is possible, no INDIRECT
inside, readable before writable), which `check` makes; any other table, valid or
not, gets None and is walked. The walk stays the rule book: tests/unit/
test_virtio_linear_table.py checks that both give the same answer (the spans, or an
error) for any table (hypothesis), so the two cannot drift apart.

The memo: a guest that reads into the same pages again (dd's one buffer, a database's
O_DIRECT pool) sends the same table with every request, and the same bytes pass the
same checks, so `spans` remembers the last few answers by the table's bytes. The
bytes are a copy taken once by the caller: the guest cannot change what was checked
after the check. The answer's columns are tuples, which no caller can change.
"""

from __future__ import annotations

import functools
import struct

from kvmpy.recent import Recent
from kvmpy.virtio.ring import DESC_SIZE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Spans

_CHAINED = {VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE}
_WRITE_CHAINED = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE

# the last few tables checked, and what `check` said of each (boxed: "not linear" too)
_recent: Recent[bytes, tuple[Spans | None]] = Recent(4)


def spans(table: bytes) -> Spans | None:
    """The spans of `table` (a copy of an indirect table), if it is Linux-shaped, else None."""
    remembered = _recent.get(table)
    if remembered is None:
        remembered = (check(table),)
        _recent.put(table, remembered)
    return remembered[0]


def check(table: bytes) -> Spans | None:
    """`spans` without the memo."""
    n = len(table) // DESC_SIZE
    fields = _table_struct(n).unpack(table)
    addrs, lens, flags, nexts = fields[0::4], fields[1::4], fields[2::4], fields[3::4]
    if nexts[:-1] != _successors(n) or flags[-1] & ~VIRTQ_DESC_F_WRITE:
        return None  # not chained 0 -> 1 -> ... -> n-1, or the last entry goes on
    chained = set(flags[:-1])
    if not chained <= _CHAINED:
        return None  # other flag bits (INDIRECT among them): let the walk judge
    k = flags.index(_WRITE_CHAINED) if _WRITE_CHAINED in chained else n - 1 if flags[-1] else n
    if VIRTQ_DESC_F_NEXT in flags[k:-1] or (k < n and not flags[-1]):
        return None  # a readable buffer after a writable one: the walk names it
    return addrs[:k], lens[:k], addrs[k:], lens[k:]


@functools.lru_cache(maxsize=64)
def _table_struct(entries: int) -> struct.Struct:
    return struct.Struct("<" + "QIHH" * entries)


@functools.lru_cache(maxsize=64)
def _successors(entries: int) -> tuple[int, ...]:
    return tuple(range(1, entries))
