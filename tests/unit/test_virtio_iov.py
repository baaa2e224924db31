"""Scatter-gather helpers: a list of views behaves exactly like one byte string."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvmpy.virtio.iov import iov_len, iov_read, iov_slice, iov_transfer, iov_write

pieces = st.lists(st.binary(max_size=40), max_size=6)


def views_of(chunks: list[bytes]) -> tuple[list[memoryview], bytearray]:
    backing = bytearray(b"".join(chunks))
    views, pos = [], 0
    for c in chunks:
        views.append(memoryview(backing)[pos : pos + len(c)])
        pos += len(c)
    return views, backing


@given(pieces, st.integers(0, 250), st.integers(0, 250))
def test_slice_and_read_match_bytes(chunks: list[bytes], start: int, length: int) -> None:
    views, backing = views_of(chunks)
    flat = bytes(backing)
    assert iov_len(views) == len(flat)
    assert iov_read(views, start, length) == flat[start : start + length]
    assert b"".join(bytes(v) for v in iov_slice(views, start)) == flat[start:]
    assert all(v.obj is backing for v in iov_slice(views, start, start + length))  # no copies


@given(pieces, st.binary(max_size=100), st.integers(0, 250))
def test_write_scatters_and_reports_short_writes(chunks: list[bytes], data: bytes,
                                                 start: int) -> None:
    views, backing = views_of(chunks)
    expected = bytearray(backing)
    n = iov_write(views, data, start)
    end = min(start + len(data), len(expected))
    assert n == max(0, end - start)
    expected[start:end] = data[:n]
    assert backing == expected


@given(pieces, st.integers(1, 50))
def test_transfer_retries_short_operations(chunks: list[bytes], step: int) -> None:
    views, backing = views_of(chunks)
    source = bytes(range(256)) * 2

    def short_read(vs: list[memoryview], offset: int) -> int:  # like a preadv that stops early
        n = min(step, vs[0].nbytes)
        vs[0][:n] = source[offset : offset + n]
        return n

    assert iov_transfer(short_read, views, 3) == len(backing)
    assert bytes(backing) == source[3 : 3 + len(backing)]
