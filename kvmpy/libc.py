"""The C library calls Python's `os` module lacks: kvmpy's one way into libc (ctypes).

- `preadv`/`pwritev` on an iovec array of host addresses, as `kvmpy.virtio.hostio`
  builds it: `os.preadv` wants a buffer object per entry, which for a 1 MiB disk
  request in 256 guest pages was most of kvmpy's work per request.
- `fallocate` with a mode: `os.posix_fallocate` has none, so no punching holes.
- `set_parent_death_signal`: prctl(PR_SET_PDEATHSIG), so the lab's QEMU dies with us.
- `openat2`: open one name beneath a directory with RESOLVE_* rules (Linux 5.6+; glibc
  has no wrapper, so through syscall()), which the 9p server's confinement rests on.

Every call raises OSError with the errno, as `os` does, and retries EINTR.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SYS_OPENAT2 = 437  # x86-64
# <linux/openat2.h>: struct open_how's flags, mode, resolve; and the resolve flags
_OPEN_HOW = struct.Struct("<QQQ")
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


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
_syscall_openat2 = _checked("syscall", [ctypes.c_long, ctypes.c_int, ctypes.c_char_p,
                                        ctypes.c_char_p, ctypes.c_size_t], ctypes.c_long)
_prctl = _checked("prctl", [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                            ctypes.c_ulong], ctypes.c_int)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (FALLOC_FL_PUNCH_HOLE, ...)."""
    _fallocate(fd, mode, offset, length)


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent thread exits."""
    _prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def openat2(dirfd: int, name: bytes, flags: int, mode: int, resolve: int) -> int:
    """openat2(2): a new fd for `name` in `dirfd`, resolved by the RESOLVE_* rules."""
    how = _OPEN_HOW.pack(flags, mode, resolve)
    return _syscall_openat2(SYS_OPENAT2, dirfd, name, how, _OPEN_HOW.size)
