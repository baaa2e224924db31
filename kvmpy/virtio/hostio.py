"""preadv/pwritev on iovec arrays of host addresses: disk data straight into guest RAM.

What it is: `preadv` and `pwritev` through libc, taking a `struct iovec`
array as `GuestMemory.iovec` builds it, and `iovec_transfer`, which repeats
one of them until a request's bytes have all moved. Python's `os.preadv`
wants a buffer object per entry; for a 1 MiB request in 256 guest pages,
making those memoryviews and having `os.preadv` unpack them again was the largest
part of kvmpy's own work per request (README, "Measured").

What it is not: a bounds check. The addresses must come from
`GuestMemory.iovec`, which checked every (gpa, length) against guest RAM.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from kvmpy.virtio.iov import IOV_MAX

# op(fd, address of the first iovec, entries, file offset) -> bytes moved
IovecOp = Callable[[int, int, int, int], int]


def iovec_transfer(op: IovecOp, fd: int, iov: array[int], offset: int, total: int) -> int:
    """`op(fd, iovec address, count, offset)` (`kvmpy.libc.preadv`/`pwritev`) over `iov`, an
    iovec array from `GuestMemory.iovec`, until `total` bytes moved or no progress.

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
