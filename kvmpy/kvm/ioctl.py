"""The two ways into the shim: pointer ioctls and value ioctls, named for errors."""

from __future__ import annotations

from typing import Any

from kvmpy._kvm import ffi, lib
from kvmpy.errors import KvmIoctlError

__all__ = ["ffi", "lib", "ioctl", "ioctl_val"]


def ioctl(fd: int, name: str, arg: Any = ffi.NULL) -> int:
    """ioctl(fd, KVM_<name>, pointer); raises KvmIoctlError naming the ioctl."""
    r = lib.kvmpy_ioctl(fd, getattr(lib, name), arg)
    if r < 0:
        raise KvmIoctlError(name, -r)
    return int(r)


def ioctl_val(fd: int, name: str, value: int = 0) -> int:
    """ioctl(fd, KVM_<name>, integer)."""
    r = lib.kvmpy_ioctl_val(fd, getattr(lib, name), value)
    if r < 0:
        raise KvmIoctlError(name, -r)
    return int(r)
