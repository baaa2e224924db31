"""`kvmpy sandbox [--share DIR[,tag=TAG][,ro]]... [--vsock CID,uds=PATH] -- COMMAND...`

Runs COMMAND in a VM over the host's own files, like kvmtool's `lkvm sandbox`: kvmpy's
minimal kernel boots with the host's root shared read-only over virtio-9p under a tmpfs
overlay (the command can write anywhere; what it writes vanishes with the VM), each
--share directory mounted read-write (or ,ro) at its own path, and the command started
in the same working directory with the same environment. Its stdout and stderr stream
back as they come, and its exit status is kvmpy's.

How the pieces talk (none of it can be confused with the command's own output):

    host  /tmp/kvmpy-sandbox-XXXX/cmd.sh, shares   -- the job, read through the root share
    guest kvmpy.job=/tmp/kvmpy-sandbox-XXXX         -- on the kernel command line
    hvc0  the command's stdout (a pipe for the command)   -> this process's stdout
    hvc1  the command's stderr                             -> this process's stderr
    hvc2  `status N` or `error: WHY`, written only by /init -> kvmpy's exit status
    ttyS0 the kernel's console: kept for error messages, shown with -v

The sandbox ends as soon as the status line arrives (the command and everything it
started have closed stdout and stderr by then, so no output is lost), without waiting
for the guest to power off. stdin is /dev/null.

Where this machine's /dev/kvm cannot boot Linux, `kvmpy sandbox` (kvmpy.cli) runs the
same command inside the lab, with the --share directories passed as its --rw ones.

What it is not: a security boundary for the host's secrets. The guest reads everything
under / that kvmpy's user can read; it cannot write there (docs/9p.md).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kvmpy.errors import ConfigError, KvmpyError
from kvmpy.hostcommand import STATUS_NO_CWD, check_argv, command_script
from kvmpy.initramfs import BUSYBOX, NINEP_MOUNT_OPTIONS

ROOT_TAG = "kvmpyroot"

SANDBOX_INIT = f"""#!/bin/sh
# kvmpy sandbox init (kvmpy/sandbox.py): the host's root under a tmpfs overlay, COMMAND
# chrooted into it, its status on hvc2.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# hvc0/1/2 stay open here: the hvc driver resets a tty's modes at its last close
exec 3>/dev/hvc2 4>/dev/hvc0 5>/dev/hvc1
for tty in /dev/hvc0 /dev/hvc1 /dev/hvc2; do stty -F $tty raw -echo; done
die() {{ echo "error: $*" >&3; poweroff -f; sleep 10; }}
job=$(sed -n 's/.*kvmpy\\.job=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
[ -n "$job" ] || die "no kvmpy.job= on the kernel command line"
mkdir -p /lower /rw /newroot
# cache=loose: the host's root is read-mostly while a command runs, and lookups cost trips
mount -t 9p -o {NINEP_MOUNT_OPTIONS},ro,cache=loose {ROOT_TAG} /lower \\
  || die "cannot mount the host's root over 9p"
[ -f "/lower$job/cmd.sh" ] || die "the job $job is not visible through the host's root"
mount -t tmpfs -o mode=0755 tmpfs /rw && mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \\
  || die "cannot mount the overlay over the host's root"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
while read -r tag mode path; do
  [ -n "$tag" ] || continue
  mkdir -p "/newroot$path"
  mount -t 9p -o "{NINEP_MOUNT_OPTIONS},$mode" "$tag" "/newroot$path" \\
    || die "cannot mount the share of $path"
done < "/lower$job/shares"
ip link set lo up 2>/dev/null
mkfifo /run/out /run/err
cat /run/out >&4 &
cat /run/err >&5 &
chroot /newroot /bin/sh "$job/cmd.sh" < /dev/null > /run/out 2> /run/err 3>&- 4>&- 5>&-
status=$?
wait
echo "status $status" >&3
poweroff -f
"""
_RECIPE_VERSION = b"kvmpy-sandbox-1"

if TYPE_CHECKING:
    from kvmpy.machine import ShareConfig, VsockConfig


def check(argv: Sequence[str], shares: Sequence[ShareConfig]) -> None:
    """What the sandbox cannot run, found before anything boots."""
    check_argv(argv, "kvmpy sandbox")
    for s in shares:
        if s.tag == ROOT_TAG:
            raise ConfigError(f"--share {s.path}: the tag {ROOT_TAG} is the sandbox's own")
        if "\n" in str(s.path):
            raise ConfigError(f"--share {s.path!r}: a newline in the path is not supported")


def sandbox_initrd() -> Path:
    """The sandbox's initramfs (uncompressed: nothing to inflate at boot), built once into
    the cache, or into the temp directory when the cache cannot be written."""
    from kvmpy.cachedir import cache_dir
    from kvmpy.initramfs import busybox_initramfs

    h = hashlib.sha256(_RECIPE_VERSION + SANDBOX_INIT.encode())
    st = BUSYBOX.stat() if BUSYBOX.exists() else None
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode() if st else b"none")
    name = f"sandbox-{h.hexdigest()[:12]}.cpio"
    for directory in (cache_dir() / "initramfs", Path(tempfile.gettempdir())):
        path = directory / name
        if path.exists():
            return path
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{name}.{os.getpid()}")
            tmp.write_bytes(busybox_initramfs(SANDBOX_INIT).to_cpio())
            tmp.rename(path)
            return path
        except OSError:
            continue
    raise ConfigError(f"cannot write the sandbox's initramfs in {cache_dir()} or "
                      f"{tempfile.gettempdir()}")


class StatusChannel:
    """hvc2: the init's one line, `status N` or `error: WHY`; ends the VM when it comes."""

    def __init__(self) -> None:
        self.buf = b""
        self.status: int | None = None
        self.error: str | None = None
        self.done = threading.Event()
        self.on_done: Callable[[], None] = lambda: None

    def feed(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf and not self.done.is_set():
            line, self.buf = self.buf.split(b"\n", 1)
            text = line.decode(errors="replace").strip()
            if text.startswith("status ") and text[7:].isdigit():
                self.status = int(text[7:])
            elif text.startswith("error: "):
                self.error = text[7:]
            else:
                continue
            self.done.set()
            self.on_done()


def _to_fd(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
        except BrokenPipeError:
            pass  # the reader went away; the command goes on, as with a closed pipe

    return write


def write_job(job: Path, argv: Sequence[str], cwd: str | None = None,
              env: Mapping[str, str] | None = None, shares: Sequence[ShareConfig] = ()
              ) -> list[ShareConfig]:
    """The job directory /init reads through the root share: `cmd.sh` (cd, env, exec) and
    `shares` (`TAG ro|rw PATH` per line). Returns the shares in mounting order: parents
    before children, so a nested share is mounted over its parent's."""
    if any(c.isspace() for c in str(job)):
        raise ConfigError(f"the sandbox's job directory {job} has a space in its path: "
                          "set TMPDIR to a path without one")
    workdir = str(Path(cwd if cwd is not None else os.getcwd()).resolve())
    environ = dict(os.environ if env is None else env)
    environ["KVMPY_IN_SANDBOX"] = "1"
    (job / "cmd.sh").write_text(command_script(list(argv), workdir, environ,
                                               who="kvmpy sandbox"))
    ordered = sorted(shares, key=lambda s: len(Path(s.path).parts))
    (job / "shares").write_text("".join(f"{s.tag} {'ro' if s.read_only else 'rw'} {s.path}\n"
                                        for s in ordered))
    return ordered


def run_sandbox(argv: Sequence[str], *, shares: Sequence[ShareConfig] = (),
                vsock: VsockConfig | None = None,
                mem: int = 512 << 20, cpus: int = 1, verbose: bool = False,
                cwd: str | None = None, env: Mapping[str, str] | None = None,
                stdout: int = 1, stderr: int = 2) -> int:
    """Run `argv` in a sandbox VM here (this /dev/kvm must boot Linux); its exit status.

    `cwd` and `env` default to this process's; `stdout`/`stderr` are the fds the
    command's output goes to.
    """
    from kvmpy import assets
    from kvmpy.console import ConsoleOutput
    from kvmpy.machine import LinuxConfig, Machine, MachineConfig, ShareConfig
    from kvmpy.stop import Stop, StopKind

    job = Path(tempfile.mkdtemp(prefix="kvmpy-sandbox-")).resolve()
    try:
        try:
            ordered = write_job(job, argv, cwd, env, shares)
        except OSError as e:
            raise ConfigError(f"sandbox job directory {job}: {e.strerror}") from None
        kernel = assets.kernel_path().bzimage
        console = ConsoleOutput(forward=sys.stderr.buffer if verbose else None)
        status = StatusChannel()
        config = MachineConfig(
            mem_size=mem, cpus=cpus,
            linux=LinuxConfig(kernel=kernel, initrd=sandbox_initrd(),
                              append=f"quiet kvmpy.job={job}"),
            shares=[ShareConfig(Path("/"), ROOT_TAG, read_only=True), *ordered],
            vsock=vsock,
            channels=[_to_fd(stdout), _to_fd(stderr), status.feed],
            rng=True, console=console)
        machine = Machine(config)
        try:
            status.on_done = lambda: machine.request_stop(
                Stop(StopKind.POWEROFF, "the sandbox's command finished"))
            stop = machine.run()
        finally:
            machine.close()
    finally:
        shutil.rmtree(job, ignore_errors=True)
    if status.status is not None:
        return status.status
    if status.error is not None:
        raise SandboxError(f"the sandbox could not run the command: {status.error}")
    if stop.kind in (StopKind.SIGINT, StopKind.SIGTERM):
        return stop.exit_status
    tail = [line for line in console.text.splitlines() if line.strip()][-5:]
    raise SandboxError(f"the VM stopped before the command finished ({stop.reason})"
                       + (f"; its console ended with: {' | '.join(tail)}" if tail else ""))


class SandboxError(KvmpyError):
    """The sandbox's VM could not run the command; the message says why."""

    exit_status = STATUS_NO_CWD

