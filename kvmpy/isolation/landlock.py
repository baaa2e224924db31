"""Landlock: after set-up, kvmpy can reach only the files it was given.

seccomp cannot tell one path from another (an `openat` is an `openat`), and a VMM must
keep opening files: the 9p server opens the guest's files under its shares, QMP writes
snapshots, Python imports modules late. Landlock (Linux 5.13+, an unprivileged LSM) is
what tells paths apart: `restrict()` leaves the process the rights `Rules` lists, on
those trees, and every other open, create, rename, unlink or exec fails with EACCES.
Files already open (/dev/kvm, the disks, the tap, the console) keep working: Landlock
checks paths when they are opened.

Through the raw system calls (glibc has no wrappers): landlock_create_ruleset,
landlock_add_rule, landlock_restrict_self, as the kernel's
Documentation/userspace-api/landlock.rst shows them. The rights handled are those the
running kernel's ABI knows (`abi()`: 1 on 5.13, 2 adds REFER, 3 TRUNCATE, 4 TCP
bind/connect, 5 device ioctls, 6 abstract unix sockets and signals scoped); each newer
one only makes the domain stricter. Measured: this machine's 6.18 kernel has ABI 7, the
lab's Debian 6.1 ABI 2 (docs/isolation.md).

A Landlock domain belongs to a thread and the threads it starts afterwards (the kernels
here have no way to impose it on threads already running), so `restrict()` runs on the
main thread before the threads that need it start (kvmpy.machine.Machine.lock_down).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from kvmpy.errors import ConfigError

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446  # x86-64
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
SYS_PRCTL, PR_SET_NO_NEW_PRIVS = 157, 38

# <linux/landlock.h>: LANDLOCK_ACCESS_FS_*
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
MAKE_SYM, REFER, TRUNCATE, IOCTL_DEV = 1 << 12, 1 << 13, 1 << 14, 1 << 15
# the file-system rights each ABI version knows (newer versions add to them)
FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1,
             5: (1 << 16) - 1}
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2  # ABI 6

READ = READ_FILE | READ_DIR
# what a writable tree (a read-write share, a snapshot directory) allows
WRITE = (READ | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM
         | REFER | TRUNCATE)
# a file's rights, a directory's less those that only directories take
FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(*args: object) -> int:
    r = _libc.syscall(*args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(r)


def abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (too old, or not enabled:
    `lsm=` on its command line lacks landlock)."""
    try:
        return _syscall(SYS_CREATE_RULESET, None, 0, CREATE_RULESET_VERSION)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise


class Rules(NamedTuple):
    """What stays reachable: read-only trees and read-write trees (files or dirs), and
    directories where unix sockets may be made (and removed: a QMP socket)."""

    read: tuple[Path, ...] = ()
    write: tuple[Path, ...] = ()
    sockets: tuple[Path, ...] = ()

    def add(self, *, read: Iterable[Path] = (), write: Iterable[Path] = (),
            sockets: Iterable[Path] = ()) -> Rules:
        return Rules(self.read + tuple(read), self.write + tuple(write),
                     self.sockets + tuple(sockets))


def python_rules() -> Rules:
    """What the interpreter reads after set-up: the directories it imports from that
    belong to it (its entries on sys.path under its own prefixes: the standard library,
    its extension modules, the installed packages; not the current directory or
    PYTHONPATH's), and kvmpy's own package."""
    prefixes = tuple({os.path.join(p, "") for p in (sys.prefix, sys.exec_prefix,
                                                     sys.base_prefix, sys.base_exec_prefix)})
    paths = {p for p in sys.path if os.path.isabs(p) and p.startswith(prefixes)}
    paths.add(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # kvmpy/
    return Rules(read=tuple(Path(p) for p in sorted(paths) if os.path.exists(p)))


def restrict(rules: Rules) -> int:
    """Confine the calling thread (and the threads it starts) to `rules`; returns the
    ABI version used. ConfigError when the kernel has no Landlock."""
    version = abi()
    if version == 0:
        raise ConfigError("--landlock: this kernel has no Landlock (5.13+, with landlock "
                          "in its lsm= list); run without --landlock")
    handled_fs = FS_BY_ABI.get(version, FS_BY_ABI[5])
    attr = struct.pack("<Q", handled_fs)
    if version >= 4:  # no TCP at all: kvmpy's network is the tap, opened at set-up
        attr += struct.pack("<Q", NET_BIND_TCP | NET_CONNECT_TCP)
    if version >= 6:
        attr += struct.pack("<Q", SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL)
    ruleset = _syscall(SYS_CREATE_RULESET, attr, len(attr), 0)
    try:
        for paths, access in ((rules.read, READ), (rules.write, WRITE),
                              (rules.sockets, MAKE_SOCK | REMOVE_FILE)):
            for path in paths:
                _add_rule(ruleset, path, access & handled_fs)
        # glibc loads libgcc_s the first time a thread ends (pthread_exit unwinds its
        # stack), and aborts the process if it cannot: loaded now, while it can be
        ctypes.CDLL("libgcc_s.so.1")
        # (required unless CAP_SYS_ADMIN; and no exec could gain privileges anyway)
        _syscall(SYS_PRCTL, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        _syscall(SYS_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)
    return version


def _add_rule(ruleset: int, path: Path, access: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"--landlock: {path}: {e.strerror}") from None
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= FILE_ONLY
        beneath = struct.pack("<Qi", access, fd)  # packed: 12 bytes
        _syscall(SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, beneath, 0)
    finally:
        os.close(fd)
