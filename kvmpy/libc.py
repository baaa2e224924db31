"""The C library calls Python's `os` module lacks: kvmpy's one way into libc (ctypes).

- `preadv`/`pwritev` on an iovec array of host addresses, as `kvmpy.virtio.hostio`
  builds it: `os.preadv` wants a buffer object per entry, which for a 1 MiB disk
  request in 256 guest pages was most of kvmpy's work per request.
- `fallocate` with a mode: `os.posix_fallocate` has none, so no punching holes.
- `set_parent_death_signal`: prctl(PR_SET_PDEATHSIG), so the lab's QEMU dies with us.

Every call raises OSError with the errno, as `os` does, and retries EINTR.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _checked(name: str, argtypes: list[Any], restype: Any) -> Callable[..., int]:
    fn = getattr(_libc, name)
    fn.argtypes, fn.restype = argtypes, restype

    def call(*args: int) -> int:
        while (r := fn(*args)) < 0:
            if (e := ctypes.get_errno()) != errno.EINTR:
                raise OSError(e, os.strerror(e))
        return int(r)

    call.__name__ = name
    return call


_IOVEC_ARGS = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
# (fd, address of the first struct iovec, entries, file offset) -> bytes moved
preadv = _checked("preadv", _IOVEC_ARGS, ctypes.c_ssize_t)
pwritev = _checked("pwritev", _IOVEC_ARGS, ctypes.c_ssize_t)
_fallocate = _checked("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64],
                      ctypes.c_int)
_prctl = _checked("prctl", [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                            ctypes.c_ulong], ctypes.c_int)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (FALLOC_FL_PUNCH_HOLE, ...)."""
    _fallocate(fd, mode, offset, length)


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent thread exits."""
    _prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
