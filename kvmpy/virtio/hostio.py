"""Disk data straight between a file and guest RAM: `struct iovec` arrays of host
addresses for preadv/pwritev (kvmpy.libc). A speed trick, behind this one door.

Why: Python's `os.preadv` wants a buffer object per entry; for a 1 MiB request in 256
guest pages, making those memoryviews and having `os.preadv` unpack them again was the
largest part of kvmpy's own work per request (README, "Measured"). An iovec array
hands the kernel the addresses themselves.

The plain path is `plain_iovec`: `GuestMemory.host_address(gpa, length)` for each
buffer, the same bounds check as every guest access. `Iovecs.iovec` adds two
shortcuts, which tests/unit/test_virtio_hostio.py checks against the plain path for
any memory layout and buffer list, errors included (hypothesis):

- a list that plainly lies in the first region (RAM below the MMIO hole, where a
  guest's buffers usually are), judged from the columns' extremes, costs one addition
  per buffer;
- the last few lists are remembered: a guest reading into the same pages again (dd's
  buffer, a database's O_DIRECT pool) asks for the same list. The caller gets a fresh
  copy to advance (`iovec_transfer` does, after a short transfer).
While guest memory records written pages (a fast reset's mark, kvmpy.state.reset),
only the plain path is taken: it is the one that records them.

`iovec_transfer` repeats preadv or pwritev until a request's bytes have all moved.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence

from kvmpy.memory import GuestMemory
from kvmpy.recent import Recent
from kvmpy.virtio.iov import IOV_MAX

# op(fd, address of the first iovec, entries, file offset) -> bytes moved
IovecOp = Callable[[int, int, int, int], int]


def plain_iovec(memory: GuestMemory, gpas: Sequence[int], lengths: Sequence[int]) -> array[int]:
    """The buffers (gpas[i], lengths[i]) as (host address, length) pairs, each checked."""
    addresses = [memory.host_address(g, n) for g, n in zip(gpas, lengths, strict=True)]
    return _pairs(addresses, lengths)


def _pairs(addresses: Sequence[int], lengths: Sequence[int]) -> array[int]:
    iov = array("Q", bytes(16 * len(addresses)))
    iov[0::2] = array("Q", addresses)
    iov[1::2] = array("Q", lengths)
    return iov


class Iovecs:
    """`plain_iovec` for one guest memory, with the shortcuts of the module docstring."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        first = memory.regions[0]
        self._first = first.gpa, first.end, first.host_address - first.gpa
        self._recent: Recent[tuple[tuple[int, ...], tuple[int, ...]], array[int]] = Recent(4)

    def iovec(self, gpas: Sequence[int], lengths: Sequence[int]) -> array[int]:
        if self.memory.written is not None:  # a fast reset must see the pages: the plain
            return plain_iovec(self.memory, gpas, lengths)  # path records them
        key = (tuple(gpas), tuple(lengths))  # a tuple is its own tuple: no copy
        iov = self._recent.get(key)
        if iov is None:
            iov = self._build(*key)
            self._recent.put(key, iov)  # (a refused list raised: never remembered)
        return iov[:]

    def _build(self, gpas: tuple[int, ...], lengths: tuple[int, ...]) -> array[int]:
        start, end, shift = self._first
        if gpas and min(gpas) >= start and min(lengths) >= 0 and max(gpas) + max(lengths) <= end:
            return _pairs([shift + gpa for gpa in gpas], lengths)
        return plain_iovec(self.memory, gpas, lengths)


def iovec_transfer(op: IovecOp, fd: int, iov: array[int], offset: int, total: int) -> int:
    """`op(fd, iovec address, count, offset)` (`kvmpy.libc.preadv`/`pwritev`) over `iov`, an
    iovec array from `Iovecs.iovec`, until `total` bytes moved or no progress.

    Returns the bytes moved. A short transfer is retried on the remainder (the
    array is advanced in place); the list goes IOV_MAX entries at a time.
    OSError propagates to the caller.
    """
    address, count = iov.buffer_info()
    count //= 2
    done = first = 0  # bytes moved; index of the first entry not wholly moved
    while done < total and first < count:
        n = op(fd, address + 16 * first, min(count - first, IOV_MAX), offset + done)
        if n <= 0:
            break
        done += n
        if done >= total:
            break
        while n:  # step over what moved: whole entries, then the front of one
            size = iov[2 * first + 1]
            if n < size:
                iov[2 * first] += n
                iov[2 * first + 1] = size - n
                break
            n -= size
            first += 1
    return done
