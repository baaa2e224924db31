"""Scatter-gather helpers: a list of views behaves exactly like one byte string, and an
iovec array of guest pages moves file bytes like one buffer (kvmpy.virtio.hostio)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from kvmpy.libc import preadv, pwritev
from kvmpy.memory import GuestMemory
from kvmpy.virtio.hostio import iovec_transfer, plain_iovec
from kvmpy.virtio.iov import iov_len, iov_read, iov_slice, iov_write, span_slice

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


@given(pieces, st.integers(0, 250), st.integers(0, 250))
def test_span_slice_is_iov_slice_on_addresses(chunks: list[bytes], start: int,
                                              length: int) -> None:
    """Addresses are each chunk's offset in the flat backing, so a span (gpa, n) names
    the bytes backing[gpa : gpa + n], which must be the bytes of iov_slice's view."""
    views, backing = views_of(chunks)
    backing[:] = bytes(range(len(backing)))  # every byte its own offset (at most 240)
    lengths = [len(c) for c in chunks]
    gpas = [sum(lengths[:i]) for i in range(len(chunks))]
    got = span_slice(gpas, lengths, start, start + length)
    want = iov_slice(views, start, start + length)
    assert [bytes(backing[g : g + n]) for g, n in zip(*got, strict=True)] == \
        [bytes(v) for v in want]
    assert got[1] == [v.nbytes for v in want]
    assert span_slice(gpas, lengths, start) == \
        span_slice(gpas, lengths, start, sum(lengths))


def _memory_of(chunks: list[bytes]) -> tuple[GuestMemory, list[int], list[int]]:
    """Guest RAM with one page per chunk, in reverse order, as a driver's pages are."""
    mem = GuestMemory.from_buffer(bytearray(0x1000 * (len(chunks) + 1)))
    gpas = [0x1000 * (len(chunks) - i) for i in range(len(chunks))]
    return mem, gpas, [len(c) for c in chunks]


def _gather(mem: GuestMemory, gpas: list[int], lengths: list[int]) -> bytes:
    return b"".join(mem.read(g, n) for g, n in zip(gpas, lengths, strict=True))


@given(pieces, st.integers(1, 50))
def test_transfer_retries_short_operations(chunks: list[bytes], step: int) -> None:
    mem, gpas, lengths = _memory_of(chunks)
    source = bytes(range(256)) * 2
    calls = []

    def short_read(fd: int, iov: int, count: int, offset: int) -> int:
        """A preadv that stops early: at most `step` bytes, into one buffer."""
        calls.append(count)
        entries = (ctypes.c_uint64 * (2 * count)).from_address(iov)
        address, size = next((a, n) for a, n in zip(entries[0::2], entries[1::2], strict=True) if n)
        n = min(step, size)
        ctypes.memmove(address, source[offset : offset + n], n)
        return n

    total = sum(lengths)
    assert iovec_transfer(short_read, -1, plain_iovec(mem, gpas, lengths), 3, total) == total
    assert _gather(mem, gpas, lengths) == source[3 : 3 + total]
    assert len(calls) == sum(-(-n // step) for n in lengths if n)  # empty entries skipped


@given(pieces, st.integers(0, 100))
def test_preadv_and_pwritev_move_file_bytes_to_guest_pages_and_back(
        tmp_path_factory, chunks: list[bytes], offset: int) -> None:
    mem, gpas, lengths = _memory_of(chunks)
    total = sum(lengths)
    path = tmp_path_factory.mktemp("iov") / "file"
    content = os.urandom(total + offset + 10)
    path.write_bytes(content)
    fd = os.open(path, os.O_RDWR)
    try:
        assert iovec_transfer(preadv, fd, plain_iovec(mem, gpas, lengths), offset, total) == total
        assert _gather(mem, gpas, lengths) == content[offset : offset + total]
        for g, c in zip(gpas, chunks, strict=True):
            mem.write(g, c)
        assert iovec_transfer(pwritev, fd, plain_iovec(mem, gpas, lengths), 5, total) == total
        assert Path(path).read_bytes()[5 : 5 + total] == b"".join(chunks)
    finally:
        os.close(fd)


def test_an_error_is_an_oserror_with_its_errno() -> None:
    mem = GuestMemory.from_buffer(bytearray(0x1000))
    try:
        iovec_transfer(preadv, -1, plain_iovec(mem, [0], [16]), 0, 16)
    except OSError as e:
        assert e.errno == 9 and e.strerror == os.strerror(9)  # EBADF
    else:
        raise AssertionError("preadv on fd -1 did not fail")
