"""Scatter-gather lists of guest buffers: slicing, gathering and scattering.

What it is: helpers over `list[memoryview]` (the readable or writable half of
a descriptor chain) that treat the list as one byte stream, the way virtio
asks devices to (§2.7.4: "The device MUST NOT make assumptions about the
particular arrangement of descriptors"). Slices stay memoryviews on guest RAM,
so `os.writev`/`os.readv` can work on them without a copy. `span_slice` does
the same slicing on buffers still given as guest addresses and lengths, which
is how bulk disk data travels (kvmpy.virtio.hostio).

What it is not: it validates nothing about guest addresses; the views it gets
were already bounds-checked by `GuestMemory`.
"""

from __future__ import annotations

import bisect
import itertools
import operator
import os
from collections.abc import Iterator, Sequence

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def iov_len(views: Sequence[memoryview]) -> int:
    return sum(map(_nbytes, views))


_nbytes = operator.attrgetter("nbytes")


def _pieces(lengths: Sequence[int], start: int, end: int | None) -> Iterator[tuple[int, int, int]]:
    """(i, lo, hi) for each buffer that bytes [start, end) of the stream touch."""
    pos = 0
    for i, n in enumerate(lengths):
        lo, hi = max(start - pos, 0), n if end is None else min(end - pos, n)
        if lo < hi:
            yield i, lo, hi
        pos += n
        if end is not None and pos >= end:
            break


def iov_slice(views: Sequence[memoryview], start: int, end: int | None = None) -> list[memoryview]:
    """Views covering bytes [start, end) of the stream (clipped to its length)."""
    return [views[i] if lo == 0 and hi == views[i].nbytes else views[i][lo:hi]  # whole views
            for i, lo, hi in _pieces([v.nbytes for v in views], start, end)]  # are reused


def span_slice(gpas: Sequence[int], lengths: Sequence[int], start: int,
               end: int | None = None) -> tuple[list[int], list[int]]:
    """`iov_slice` for buffers still given as guest addresses and lengths (columns).

    Found by bisection on the running totals, so a request's data in 125 pages is
    sliced without a Python step per page (Rread's data: all but the header's buffer).
    """
    ends = list(itertools.accumulate(lengths))
    stop = ends[-1] if ends else 0
    if end is not None:
        stop = min(stop, end)
    start = max(start, 0)
    if start >= stop:
        return [], []
    first = bisect.bisect_right(ends, start)  # the first buffer ending after `start`
    last = bisect.bisect_left(ends, stop, first)  # the first ending at or after `stop`
    out_gpas, out_lens = list(gpas[first:last + 1]), list(lengths[first:last + 1])
    out_lens[-1] -= ends[last] - stop
    skip = start - (ends[first] - lengths[first])
    out_gpas[0] += skip
    out_lens[0] -= skip
    if 0 in out_lens:  # empty buffers inside the slice are no pieces of it
        kept = [i for i, n in enumerate(out_lens) if n]
        return [out_gpas[i] for i in kept], [out_lens[i] for i in kept]
    return out_gpas, out_lens


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
