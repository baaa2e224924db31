"""seccomp allow-lists for a running kvmpy: after set-up, each thread may make only the
system calls its work needs, so a device model that a guest subverts cannot exec a
program, trace another process, open a network socket or fork.

How the filters stack (seccomp filters are per thread, inherited by the threads a
thread starts, and can only be narrowed):

1. `lock_down()`, on the main thread once the machine is built: the union of every
   role's list, installed on every thread of the process at once (TSYNC): the I/O
   thread, QMP, gdb stub, console input pump that already run get it too.
2. `enter(role)`, first thing on a vCPU thread or the I/O thread: that role's own
   list stacked on top, so the thread is held to it (the kernel applies every filter
   a thread has and the strictest answer wins).

The rule for a new thread started after `lock_down()`: it inherits the filter of the
thread that starts it, so it can do at most what that thread may; if its work needs
a call that thread may not make, the call must be on the union list (`ROLES`) and the
thread must be started from the main thread; then it calls `enter(role)` with its own
list (adding a role here) unless the union is what it needs.

The lists were measured, not guessed (docs/isolation.md): the kvm and lab suites run
with `--seccomp log`, every call outside a list logged by the kernel (SECCOMP_RET_LOG,
read back from dmesg as `audit: type=1326 ... comm="kvmpy-vcpu0" ... syscall=N`), and
`strace -f -c` of the same runs. What Python itself needs after start-up is most of
them: memory for objects (mmap, munmap, madvise, brk), the GIL and locks (futex), the
signal machinery (rt_sigaction, rt_sigreturn, tgkill for vCPU kicks), imports a lazy
code path makes late (openat, newfstatat, read, getdents64, ...).

Modes (`--seccomp`): `kill` (the default on the command line) traps a denied call and
the C handler in csrc/sigsys.h prints one line naming it and ends the process with
SIGSYS; `log` lets it through and the kernel logs it; `off` installs nothing.

Built with libseccomp (Debian's libseccomp2, which apt itself depends on) through
ctypes: it turns names into numbers and compiles the lists into BPF, with the
argument checks below (clone only for threads, socket only AF_UNIX, ioctl only for
KVM's and the tty/tun request families). Compiled once, not at every start: the
programs of a mode are kept in `$KVMPY_CACHE/seccomp/` under a checksum of this file
(`make build` writes them), and a start reads them back and hands them to the kernel
(`seccomp(SECCOMP_SET_MODE_FILTER)`) itself; libseccomp is loaded only to compile.
"""

from __future__ import annotations

import errno
import marshal
import os
import struct
import threading
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kvmpy.cachedir import cache_dir
from kvmpy.errors import ConfigError

MODES = ("off", "log", "kill")

# What every kvmpy thread runs on: the interpreter (memory, GIL, signals, time, late
# imports) and the file descriptors it was given.
PYTHON = frozenset({
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "lseek", "close", "fstat", "newfstatat", "statx", "fcntl", "dup", "dup3",
    "openat", "getdents64", "readlink", "getcwd", "access", "faccessat2",
    "mmap", "munmap", "mremap", "mprotect", "madvise", "brk",
    "futex", "sched_yield", "sched_getaffinity", "set_robust_list", "rseq",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
    "getpid", "gettid", "tgkill", "getuid", "geteuid", "getgid", "getegid",
    "clock_gettime", "clock_nanosleep", "nanosleep", "gettimeofday", "getrandom",
    "poll", "ppoll", "select", "pselect6", "epoll_wait", "epoll_pwait", "epoll_ctl",
    "epoll_create1",  # `import selectors` (by socket, subprocess) tries one
    "eventfd2", "restart_syscall", "exit", "exit_group", "prctl", "sysinfo",
})
# A vCPU thread: KVM_RUN and the ioctls around it, device models, console output.
VCPU = PYTHON
# The I/O thread: virtio backends (disk images, taps, the 9p server's host files, vsock
# unix sockets).
IO = PYTHON | {
    "fallocate", "fsync", "fdatasync", "ftruncate", "fstatfs", "statfs",
    "mkdirat", "unlinkat", "renameat", "renameat2", "linkat", "symlinkat", "readlinkat",
    "fchmod", "fchmodat", "fchown", "fchownat", "utimensat", "fgetxattr", "flistxattr",
    "openat2", "copy_file_range",  # (a snapshot's disk copy, when FICLONE cannot)
    "socket", "connect", "getsockopt", "setsockopt", "sendmsg", "recvmsg",
    "sendto", "recvfrom", "shutdown", "getsockname", "getpeername",
}
# The main thread, and the threads it started before `lock_down` (QMP, gdb stub, stdin
# pump): all of the above, serving sockets, snapshots and the end of the run.
MAIN = VCPU | IO | {
    "accept", "accept4", "bind", "listen", "pipe2", "mkdir", "rmdir", "unlink", "rename",
    "clone", "clone3", "set_tid_address", "wait4", "kill", "sched_setaffinity",
    "getrlimit", "prlimit64", "uname", "memfd_create", "umask",
    "seccomp",  # a thread narrowing itself to its role (`enter`): filters only narrow
}
ROLES = {"main": MAIN, "io": IO, "vcpu": VCPU}

# Arguments checked (every other call on a list is allowed with any arguments).
CLONE_THREAD = 0x10000
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
IOCTL_FAMILIES = (0xAE, ord("T"))  # KVM's ioctls; terminal and tun ('T' in <asm/ioctls.h>)
FICLONE = 0x40049409  # and this one: a snapshot's reflinked disk copy (kvmpy.state.disks)

# <seccomp.h>
_ACT_TRAP = 0x00030000
_ACT_LOG = 0x7FFC0000
_ACT_ALLOW = 0x7FFF0000
_ACT_ERRNO = 0x00050000
_CMP_EQ, _CMP_MASKED_EQ = 4, 7
# The programs a machine may load, by key: (allowed calls, socket address families)
PROGRAMS = {"main": (MAIN, (AF_UNIX,)), "main+inet": (MAIN, (AF_UNIX, AF_INET, AF_INET6)),
            "io": (IO, (AF_UNIX,)), "vcpu": (VCPU, (AF_UNIX,))}


def _library() -> tuple[Any, Any]:
    """libseccomp through ctypes, and its struct scmp_arg_cmp. Only a compile needs them,
    so ctypes is imported here: at every start it would cost 40 ms under the lab's
    emulation (docs/snapshots.md)."""
    import ctypes

    class ArgCmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]

    try:  # (by soname: ctypes.util.find_library would run ldconfig at every start)
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        raise ConfigError("--seccomp: libseccomp is missing (Debian: apt-get install "
                          "libseccomp2), or give --seccomp off") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_syscall_priority.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint8]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    return lib, ArgCmp


_lib: tuple[Any, Any] | None = None


def _seccomp() -> tuple[Any, Any]:
    global _lib
    if _lib is None:
        _lib = _library()
    return _lib


def syscall_number(name: str) -> int:
    """This architecture's number for system call `name`; -1 if it has none."""
    return int(_seccomp()[0].seccomp_syscall_resolve_name(name.encode()))


def syscall_name(number: int) -> str | None:
    """The name of system call `number` on this architecture, if it has one (the
    SIGSYS report's table, written into the shim when it was built)."""
    from kvmpy.kvm.ioctl import ffi, lib

    name = lib.kvmpy_syscall_name(number) if -(1 << 31) <= number < 1 << 31 else ffi.NULL
    return ffi.string(name).decode() if name != ffi.NULL else None


def _rules(names: Iterable[str], families: tuple[int, ...] = (AF_UNIX,)
           ) -> list[tuple[int, list[tuple[int, int, int, int]]]]:
    """(syscall number, argument checks) for each allowed call; a call named twice with
    different checks is allowed when any of them matches (libseccomp ORs the rules).
    `families`: the socket address families `socket` may create."""
    rules = []
    for name in sorted(names):
        nr = syscall_number(name)
        if nr < 0:
            continue  # not on this architecture (libseccomp knows every name we use)
        if name == "clone":  # threads, never processes: CLONE_THREAD in its flags
            rules.append((nr, [(0, _CMP_MASKED_EQ, CLONE_THREAD, CLONE_THREAD)]))
        elif name == "socket":  # unix sockets (and TCP for a migration's main thread)
            rules += [(nr, [(0, _CMP_EQ, family, 0)]) for family in families]
        elif name == "ioctl":
            rules += [(nr, [(1, _CMP_MASKED_EQ, 0xFF00, family << 8)])
                      for family in IOCTL_FAMILIES]
            rules.append((nr, [(1, _CMP_EQ, FICLONE, 0)]))
        elif name != "clone3":  # (below: clone3's flags are in memory, out of BPF's reach)
            rules.append((nr, []))
    return rules


def _compile(names: Iterable[str], mode: str, families: tuple[int, ...]) -> Any:
    """A libseccomp context holding the allow-list of `names` (plus ioctl, checked);
    the caller releases it."""
    lib, arg_cmp = _seccomp()
    ctx = lib.seccomp_init(_ACT_TRAP if mode == "kill" else _ACT_LOG)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        for nr, checks in _rules({*names, "ioctl"}, families):
            args = (arg_cmp * max(1, len(checks)))(*[arg_cmp(*c) for c in checks])
            _check(lib.seccomp_rule_add_array(ctx, _ACT_ALLOW, nr, len(checks), args),
                   "seccomp_rule_add")
        if "clone3" in names:
            # glibc tries clone3 first and falls back to clone on ENOSYS, whose flags
            # the filter can see
            _check(lib.seccomp_rule_add_array(ctx, _ACT_ERRNO | errno.ENOSYS,
                                              syscall_number("clone3"), 0, None),
                   "seccomp_rule_add")
        # ioctl first: KVM_RUN is the hot call, and the one call the kernel runs a
        # filter for at every call (an answer that does not depend on the arguments is
        # cached per syscall number, Linux 5.11+). Last, where libseccomp puts it by
        # default, it cost 127 BPF instructions of MAIN's and 75 of VCPU's per KVM_RUN.
        _check(lib.seccomp_syscall_priority(ctx, syscall_number("ioctl"), 255),
               "seccomp_syscall_priority")
    except BaseException:
        lib.seccomp_release(ctx)
        raise
    return ctx


def bpf(names: Iterable[str], mode: str = "kill", families: tuple[int, ...] = (AF_UNIX,)
        ) -> list[tuple[int, int, int, int]]:
    """The program that allows `names` (plus ioctl, checked), as (code, jt, jf, k)
    instructions."""
    return list(struct.iter_unpack("<HBBI", _export(names, mode, families)))


def _export(names: Iterable[str], mode: str, families: tuple[int, ...]) -> bytes:
    """The allow-list of `names` compiled: struct sock_filter instructions, 8 bytes each."""
    lib = _seccomp()[0]
    ctx = _compile(names, mode, families)
    r, w = os.pipe()
    try:
        try:
            _check(lib.seccomp_export_bpf(ctx, w), "seccomp_export_bpf")
        finally:
            os.close(w)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        os.close(r)
        lib.seccomp_release(ctx)
    return data


_programs: dict[str, dict[str, bytes]] = {}


def programs(mode: str) -> dict[str, bytes]:
    """`PROGRAMS` compiled for `mode`: from the cache when this file has not changed
    since they were compiled (the lists and the rules are all in it), else compiled
    now with libseccomp and kept there for the next start. Read once a process (a
    jailed kvmpy has them read before it enters the jail, where the cache is not)."""
    if mode not in _programs:
        _programs[mode] = _cached_programs(mode)
    return _programs[mode]


def _cached_programs(mode: str) -> dict[str, bytes]:
    here = Path(__file__)
    path = (cache_dir() / "seccomp"
            / f"{zlib.crc32(here.read_bytes()):08x}-{os.uname().machine}-{mode}.bpf")
    try:
        cached = marshal.loads(path.read_bytes())
        if (isinstance(cached, dict) and cached.keys() == PROGRAMS.keys()
                and all(isinstance(p, bytes) and p and len(p) % 8 == 0
                        for p in cached.values())):
            return cached
    except (OSError, EOFError, ValueError, TypeError):
        pass
    compiled = {key: _export(names, mode, families)
                for key, (names, families) in PROGRAMS.items()}
    try:  # (a read-only cache, or none: compiled again at the next start)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(marshal.dumps(compiled))
        os.replace(tmp, path)
        for old in path.parent.glob(f"*-{os.uname().machine}-{mode}.bpf"):
            if old != path:  # (compiled from an older seccomp.py)
                old.unlink(missing_ok=True)
    except OSError:
        pass
    return compiled


def load(program: bytes, *, all_threads: bool) -> None:
    """Hand the kernel a compiled filter for this thread, or with `all_threads` for
    every thread of the process (csrc/sigsys.h: as seccomp_load would)."""
    from kvmpy.kvm.ioctl import lib

    r = lib.kvmpy_seccomp_load(program, len(program) // 8, all_threads)
    if r < 0:
        raise OSError(-r, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(-r)}")
    if r > 0:
        raise OSError(errno.ESRCH, f"seccomp: thread {r} cannot take the filter")


def _check(r: int, what: str) -> None:
    if r < 0:
        raise OSError(-r, f"{what}: {errno.errorcode.get(-r, -r)}")


def _install_report() -> None:
    from kvmpy.kvm.ioctl import ffi, lib

    if lib.kvmpy_sigsys_install() < 0:
        raise OSError(ffi.errno, "sigaction(SIGSYS)")


_roles: dict[str, Any] = {}  # (C strings the report may name until the process ends)


def _name_thread(name: str) -> None:
    """The thread's name where the kernel shows it (/proc/TID/comm, top -H, the audit
    lines of --seccomp log) and in the SIGSYS report."""
    from kvmpy.kvm.ioctl import ffi, lib

    if name not in _roles:
        _roles[name] = ffi.new("char[]", name.encode())
    lib.kvmpy_name_thread(_roles[name])


class Seccomp:
    """One machine's seccomp policy: `lock_down` once, `enter(role)` on each thread."""

    def __init__(self, mode: str) -> None:
        if mode not in MODES:
            raise ConfigError(f"--seccomp {mode}: one of {', '.join(MODES)}")
        self.mode = mode
        self.locked = False
        # the filters, and the report's handler, ready during set-up: neither the
        # cache nor libseccomp may be reachable later (a jail, Landlock)
        self.programs = programs(mode) if mode != "off" else {}
        if mode == "kill":
            _install_report()

    def lock_down(self, *, network: bool = False) -> None:
        """The union of the roles' lists on every thread of the process (main thread
        only, once the machine is built and before its vCPU threads start).

        `network`: the main thread may also open TCP sockets, for a live migration
        over `tcp:` that QMP starts later (its thread inherits this list). The vCPU and
        I/O threads narrow themselves to unix sockets all the same (`enter`)."""
        if self.mode == "off" or self.locked:
            return
        assert threading.current_thread() is threading.main_thread()
        _name_thread("main")
        load(self.programs["main+inet" if network else "main"], all_threads=True)
        self.locked = True

    def enter(self, role: str, name: str | None = None) -> None:
        """Hold the calling thread to `role`'s list (after `lock_down`; before it, the
        thread is named only, and gets the union at `lock_down`); `name` ("vcpu0")
        is what reports call the thread."""
        if self.mode == "off":
            return
        _name_thread(name or role)
        if self.locked and ROLES[role] is not MAIN:
            load(self.programs[role], all_threads=False)
