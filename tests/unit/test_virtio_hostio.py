"""The iovec shortcuts agree with the plain path: every buffer checked as any guest access."""

from __future__ import annotations

import ctypes
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy.errors import GuestMemoryError
from kvmpy.memory import GuestMemory
from kvmpy.virtio.hostio import Iovecs, plain_iovec

SPANS = st.lists(st.tuples(st.integers(-2, 0xA000), st.integers(-2, 0x1000)), max_size=8)


@given(st.lists(SPANS, min_size=1, max_size=6), st.integers(0, 0x2000))
def test_the_shortcuts_and_the_plain_path_agree(lists: list[list[tuple[int, int]]],
                                                base: int) -> None:
    """Any lists, asked for in any order and again (the memo): the same pairs as
    `plain_iovec`, or the same refusal; the addresses hold the buffers' bytes."""
    mem = GuestMemory([(base, bytearray(os.urandom(0x3000))), (0x8000, bytearray(0x1000))])
    iovecs = Iovecs(mem)
    for spans in lists + lists[:2]:
        gpas, lengths = [g for g, _ in spans], [n for _, n in spans]
        try:
            expected = plain_iovec(mem, gpas, lengths)
        except GuestMemoryError:
            with pytest.raises(GuestMemoryError):
                iovecs.iovec(gpas, lengths)
            continue
        got = iovecs.iovec(gpas, lengths)
        assert got == expected
        assert [ctypes.string_at(a, n) for a, n in zip(got[0::2], got[1::2], strict=True)] == \
            [mem.read(g, n) for g, n in spans]
    mem.close()


def test_remembered_lists_are_handed_out_as_copies() -> None:
    """The caller may advance its copy (a short preadv) without changing the next one."""
    mem = GuestMemory([(0, bytearray(0x20000))])
    iovecs = Iovecs(mem)
    first = iovecs.iovec([0x1000, 0x10000], [16, 32])
    first[0] += 8
    again = iovecs.iovec((0x1000, 0x10000), (16, 32))
    assert again != first and again[0] == first[0] - 8
    for _ in range(2):  # a refused list is refused every time
        with pytest.raises(GuestMemoryError):
            iovecs.iovec([0x1F000], [0x2000])


def test_iovecs_record_written_pages_while_memory_tracks_them() -> None:
    """A fast reset copies back what a disk read put in guest RAM: the shortcuts,
    which skip `host_address`, are not taken while pages are tracked."""
    mem = GuestMemory.from_buffer(bytearray(1 << 20))
    iovecs = Iovecs(mem)
    iovecs.iovec([0x3000], [0x1000])  # remembered, untracked
    mem.track_writes()
    iov = list(iovecs.iovec([0x3000, 0x7FF0], [0x1000, 0x20]))
    assert mem.written == {3, 7, 8}
    assert iov == [mem.host_address(0x3000, 0x1000), 0x1000, mem.host_address(0x7FF0, 0x20), 0x20]
