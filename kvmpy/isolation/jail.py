"""`kvmpy run --jail DIR --uid U --gid G`: kvmpy in a jail, as Firecracker's jailer puts
its VMM in one.

Two steps, because the kernel allows some only before threads exist and others only
once the machine holds what it needs:

`enter()`, at the start of `kvmpy run` (one thread, nothing opened yet):
- new PID, mount, IPC and UTS namespaces. For the PID namespace kvmpy forks: the parent
  stays outside, waits, and ends as its child ended (status, or the same signal); the
  child is PID 1 of a namespace with no other process in it, so it can signal no one.
- a new root: a tmpfs at DIR holding, at their own paths, only what the VM needs: its
  files bind-mounted (kernel, initrd, disks, shares; read-only where the VM may not
  write), /dev/kvm, /dev/net/tun when it has a network, a /proc of its own namespace,
  and, read-only, what the interpreter runs on (/usr and its /lib, /bin links, the venv
  and kvmpy's package). `pivot_root` into it and the old root detached: nothing else of
  the host is reachable, by any path.
- a cgroup v2 with memory.max (guest RAM + MEM_OVERHEAD) and cpu.max (one CPU per
  vCPU), where a writable cgroup v2 has both controllers; else one line saying so.

`drop()`, at the end of set-up (Machine.lock_down, before seccomp and Landlock):
- a new network namespace: empty, no interfaces. The taps were opened in the host's
  namespace during set-up and their fds keep working (a tap belongs to the namespace
  it was made in, not to its user).
- privileges: supplementary groups cleared, gid then uid set to the unprivileged G and U
  (every thread: glibc's setuid applies to all). The files kvmpy was given were opened
  as root during set-up; what it opens later (a share's files, snapshots) it opens as U.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from kvmpy.errors import ConfigError

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155
MEM_OVERHEAD = 512 << 20  # the interpreter, kvmpy, page tables: beyond guest RAM
CGROUP_PERIOD_US = 100_000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(r: int, what: str) -> None:
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]),
           f"mount {target}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


class Jail(NamedTuple):
    root: Path
    uid: int
    gid: int

    @staticmethod
    def parse(root: Path, uid: int | None, gid: int | None) -> Jail:
        if uid is None or gid is None:
            raise ConfigError("--jail: give --uid and --gid (an unprivileged user to run as)")
        if uid == 0 or gid == 0:
            raise ConfigError("--jail: --uid and --gid must not be 0: the jail's point is "
                              "to leave root behind")
        if os.geteuid() != 0:
            raise ConfigError("--jail: needs root (namespaces, mounts, then --uid/--gid)")
        return Jail(root.absolute(), uid, gid)


def runtime_paths() -> list[Path]:
    """What the interpreter needs after set-up, read-only: /usr (the interpreter, its
    standard library, libc and libseccomp) and the root's links into it (merged /usr),
    the venv and kvmpy's package."""
    paths = {Path("/usr"), Path(sys.prefix), Path(__file__).resolve().parent.parent}
    paths |= {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    return sorted(p for p in paths if p.exists())


def enter(jail: Jail, *, read: Iterable[Path], write: Iterable[Path], devices: Iterable[Path],
          mem_size: int, cpus: int) -> int | None:
    """Fork into the jail's namespaces and root. The parent returns the child's exit
    status when it ends; the child returns None, in the jail, and goes on."""
    limits = _cgroup(mem_size, cpus)
    unshare(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        status = _wait(pid)
        if limits is not None:
            limits.rmdir()
        return status
    try:
        if limits is not None:
            limits.joinpath("cgroup.procs").write_text("0")
        _make_root(jail.root, read=read, write=write, devices=devices)
        _libc.sethostname(b"kvmpy", 5)
    except OSError as e:
        print(f"kvmpy: --jail {jail.root}: {e}", file=sys.stderr)
        os._exit(1)
    return None


def _wait(pid: int) -> int:
    """The parent: pass SIGINT/SIGTERM on, and end as the child did."""
    for forwarded in (signal.SIGINT, signal.SIGTERM):
        signal.signal(forwarded, lambda s, _f: os.kill(pid, s))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return os.waitstatus_to_exitcode(status)


def _make_root(root: Path, *, read: Iterable[Path], write: Iterable[Path],
               devices: Iterable[Path]) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks to the host
    root.mkdir(parents=True, exist_ok=True)
    _mount("kvmpy-jail", str(root), "tmpfs", MS_NOSUID, "mode=0755")
    for path in runtime_paths():
        _bind(root, path, read_only=True)
    for link in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        target = Path("/", link)
        if target.is_symlink():
            (root / link).symlink_to(os.readlink(target))
    for path in read:
        _bind(root, path, read_only=True)
    for path in write:
        _bind(root, path, read_only=False)
    for path in devices:
        _bind(root, path, read_only=False)
    (root / "proc").mkdir(exist_ok=True)
    (root / "old").mkdir()
    os.chdir(root)
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"old"), "pivot_root")
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _check(_libc.umount2(b"/old", MNT_DETACH), "umount the old root")
    os.rmdir("/old")
    os.chdir("/")


def _bind(root: Path, path: Path, *, read_only: bool) -> None:
    """`path` (a file, a directory, a device) at the same path under `root`."""
    path = path.resolve()
    inside = root / path.relative_to("/")
    if not inside.exists():  # (one that does is under a tree bound already: bound over)
        inside.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if path.is_dir():
            inside.mkdir(mode=0o755)
        else:
            inside.touch(mode=0o600)
    _mount(str(path), str(inside), None, MS_BIND | MS_REC)
    if read_only:
        _mount(None, str(inside), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)


def _cgroup(mem_size: int, cpus: int) -> Path | None:
    """A cgroup v2 for this VM with its memory and CPU limits, if this host has a
    writable one with both controllers; else None, said in one line."""
    base = next((p for p in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
                 if (p / "cgroup.controllers").exists()), None)
    controllers = set((base / "cgroup.controllers").read_text().split()) if base else set()
    if base is None or not {"memory", "cpu"} <= controllers:
        print("kvmpy: --jail: no cgroup v2 with the memory and cpu controllers here "
              f"({'have: ' + ' '.join(sorted(controllers)) if base else 'none mounted'}): "
              "no memory or CPU limit", file=sys.stderr)
        return None
    try:
        (base / "cgroup.subtree_control").write_text("+memory +cpu")
        group = base / f"kvmpy-{os.getpid()}"
        group.mkdir()
        (group / "memory.max").write_text(str(mem_size + MEM_OVERHEAD))
        (group / "cpu.max").write_text(f"{cpus * CGROUP_PERIOD_US} {CGROUP_PERIOD_US}")
    except OSError as e:
        print(f"kvmpy: --jail: cgroup v2 at {base} not writable ({e.strerror}): no memory "
              "or CPU limit", file=sys.stderr)
        return None
    return group


def drop(jail: Jail) -> None:
    """The end of set-up: an empty network namespace, then the unprivileged user."""
    unshare(CLONE_NEWNET)
    os.setgroups([])
    os.setgid(jail.gid)
    os.setuid(jail.uid)
