"""A planted escape, for tests only: what a device model a guest has subverted would try.

When the environment has KVMPY_TEST_ESCAPE=CALL,CALL... (never set in a normal
machine: no option turns it on), kvmpy's MMIO test device (kvmpy.devices.testdev)
makes these system calls, in order, when the guest writes to its ESCAPE register,
and shows the guest one line per call ("socket: ok", "open: EACCES"):

    execve   execve("/nonexistent/kvmpy-escape")   a program run on the host
    open     open("/etc/shadow", O_RDONLY)          a host file it was not given
    socket   socket(AF_INET, SOCK_STREAM)           the network beyond the VM's tap
    ptrace   ptrace(PTRACE_ATTACH, pid 2**22+1)     another process's memory
    look     what it can see: "look: uid U gid G files PATH PATH..." (every file
             and device under /, but for the interpreter's own trees and /proc)

Each is the real system call, made harmless where nothing stops it: the program does
not exist, the file is closed unread, the socket closed unused, the pid beyond
pid_max. So with `--seccomp off` the guest sees ENOENT, ok, ok, ESRCH; with
`--seccomp kill` the first call the filter denies ends kvmpy with SIGSYS; with
Landlock the open fails with EACCES.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

ENV = "KVMPY_TEST_ESCAPE"
_NO_SUCH_PID = 2**22 + 1  # above the largest pid_max (4194304)
PTRACE_ATTACH = 16


def _execve() -> None:
    os.execv("/nonexistent/kvmpy-escape", ["kvmpy-escape"])


def _open() -> None:
    os.close(os.open("/etc/shadow", os.O_RDONLY | os.O_CLOEXEC))


def _socket() -> None:
    import socket

    socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()


def _ptrace() -> None:
    import ctypes  # (imported already by from_environment, at set-up)

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(PTRACE_ATTACH, _NO_SUCH_PID, None, None) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _look() -> str:
    from kvmpy.isolation.jail import runtime_paths

    skip = {str(p) for p in runtime_paths()} | {"/proc", "/sys"}
    found = []
    for top, dirs, files in os.walk("/"):
        dirs[:] = [d for d in dirs if os.path.join(top, d) not in skip]
        found += [os.path.join(top, f) for f in files]
    return f"uid {os.getuid()} gid {os.getgid()} files {' '.join(sorted(found))}"


ATTEMPTS: dict[str, Callable[[], str | None]] = {
    "execve": _execve, "open": _open, "socket": _socket, "ptrace": _ptrace, "look": _look}


def from_environment() -> Callable[[], bytes] | None:
    """The escape the environment asks for, as the test device's hook; None (the
    normal case) when KVMPY_TEST_ESCAPE is not set."""
    names = [n for n in os.environ.get(ENV, "").split(",") if n]
    if not names:
        return None
    unknown = [n for n in names if n not in ATTEMPTS]
    if unknown:
        from kvmpy.errors import ConfigError

        raise ConfigError(f"{ENV}: {unknown[0]}: one of {', '.join(ATTEMPTS)}")
    # what the attempts import, imported now: at every start they would cost start-up,
    # and the attempts come when the machine is locked down (in a jail, beneath Landlock)
    if "ptrace" in names:
        import ctypes  # noqa: F401
    if "look" in names:
        import kvmpy.isolation.jail  # noqa: F401
    return lambda: attempt(names)


def attempt(names: list[str]) -> bytes:
    """Make each call; one line of outcome per call."""
    lines = []
    for name in names:
        try:
            outcome = ATTEMPTS[name]() or "ok"
        except OSError as e:
            outcome = errno.errorcode.get(e.errno or 0, str(e.errno))
        lines.append(f"{name}: {outcome}\n")
    return "".join(lines).encode()
