"""Scatter-gather lists of guest buffers: slicing, gathering and scattering.

What it is: helpers over `list[memoryview]` (the readable or writable half of
a descriptor chain) that treat the list as one byte stream, the way virtio
asks devices to (§2.7.4: "The device MUST NOT make assumptions about the
particular arrangement of descriptors"). Slices stay memoryviews on guest RAM,
so `os.preadv`/`os.pwritev`/`os.writev` can work on them without a copy.

What it is not: it validates nothing about guest addresses; the views it gets
were already bounds-checked by `GuestMemory`.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Sequence

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def iov_len(views: Sequence[memoryview]) -> int:
    return sum(map(_nbytes, views))


_nbytes = operator.attrgetter("nbytes")


def iov_slice(views: Sequence[memoryview], start: int, end: int | None = None) -> list[memoryview]:
    """Views covering bytes [start, end) of the stream (clipped to its length)."""
    out: list[memoryview] = []
    pos = 0
    for v in views:
        n = v.nbytes
        lo, hi = max(start - pos, 0), n if end is None else min(end - pos, n)
        if lo < hi:
            out.append(v if lo == 0 and hi == n else v[lo:hi])  # whole views are reused
        pos += n
        if end is not None and pos >= end:
            break
    return out


def iov_read(views: Sequence[memoryview], start: int, length: int) -> bytes:
    """Copy up to `length` bytes from offset `start` of the stream."""
    return b"".join(bytes(v) for v in iov_slice(views, start, start + length))


def iov_write(views: Sequence[memoryview], data: bytes | bytearray | memoryview,
              start: int = 0) -> int:
    """Scatter `data` into the stream at `start`; returns the bytes written (may be short)."""
    src = memoryview(data)
    done = 0
    for v in iov_slice(views, start, start + src.nbytes):
        n = v.nbytes
        v[:] = src[done : done + n]
        done += n
    return done


def iov_transfer(op: Callable[[list[memoryview], int], int], views: Sequence[memoryview],
                 offset: int, total: int | None = None) -> int:
    """Run `op(views, offset)` (preadv/pwritev) until done or it makes no progress.

    Returns the bytes moved. Short transfers are retried on the remainder;
    the list is split at IOV_MAX entries. OSError propagates to the caller.
    `total`, when the caller knows it, is `iov_len(views)`.
    """
    # empty buffers have nothing to move (a memoryview is false when empty)
    pending = list(views) if all(views) else [v for v in views if v]
    if total is None:
        total = iov_len(pending)
    done = first = 0  # bytes moved; index of the first view not wholly moved
    while done < total:
        n = op(pending[first : first + IOV_MAX], offset + done)
        if n <= 0:
            break
        done += n
        if done == total:
            break
        while n:  # step over what moved: whole views, then the front of one
            size = pending[first].nbytes
            if n < size:
                pending[first] = pending[first][n:]
                break
            n -= size
            first += 1
    return done
