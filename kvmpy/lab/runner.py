"""Running one command in the lab: QEMU TCG with `-cpu max`, the host tree over 9p, kvm_amd.

`run_in_lab(argv)` boots the lab image (`kvmpy.lab.image`), runs `argv` chrooted into
the host's file tree (same paths, same working directory and environment, everything
writable through a throw-away tmpfs overlay, `--rw` directories shared back), streams
its stdout and stderr as they come, and returns its exit status. The command's stdin is
/dev/null unless `interactive`. A lab that cannot boot or cannot run the command raises
`LabError` with one line saying why.

How the pieces talk: a host temp directory is the `kvmpyjob` 9p share (see
`kvmpy.lab.image` for its files); the command's output comes back on two virtio-serial
ports whose QEMU chardevs write into pipes that threads here copy to the caller's
stdout/stderr; the kernel console (ttyS0) goes to a third pipe that is kept in memory
for the error message (and shown live with `verbose`).

This is not a sandbox: the command runs as root over the host's files, and the `--rw`
directories are written for real.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from kvmpy.hostcommand import command_script
from kvmpy.lab.errors import LabError
from kvmpy.lab.host import DEFAULT_CPUS, DEFAULT_MEM, QEMU, lab_status
from kvmpy.lab.image import (
    ERROR_PREFIX,
    JOB_TAG,
    PORT_HEARTBEAT,
    PORT_KICK,
    PORT_STDERR,
    PORT_STDIN,
    PORT_STDOUT,
    ROOT_TAG,
    LabImage,
    build_lab_image,
)
from kvmpy.lab.monitor import cpu_states
from kvmpy.lab.symbols import lab_symbolizer, save_kallsyms
from kvmpy.libc import set_parent_death_signal

MiB = 1 << 20
# TCG on 2 loaded cores: the first heartbeat comes ~2-3 s after QEMU starts; allow for a
# busy machine.
DEFAULT_BOOT_TIMEOUT = float(os.environ.get("KVMPY_LAB_BOOT_TIMEOUT", "120"))
# Every lab CPU beats once a second (kvmpy.lab.image); one silent for this long has
# stopped. The longest gap in healthy labs is in docs/lab.md ("The soak").
HEARTBEAT_TIMEOUT = float(os.environ.get("KVMPY_LAB_HEARTBEAT_TIMEOUT", "20"))
DEFAULT_ACCEL = "tcg,thread=multi"
DEFAULT_CPU_MODEL = "max"  # emulates AMD SVM, so the lab's kvm_amd loads
# The instruction clock, for figures that must not move with the host's load (`make bench`'s
# isolation_cost): QEMU's -icount makes the lab's clock count the instructions the lab runs,
# the nested guest's included (shift=2: 4 ns each, near TCG's own pace here, so a lab
# second, and a heartbeat, still takes a few host seconds), and never advance on its own
# (sleep=off); it needs a single TCG thread. The lab's kernel must not idle (idle=poll):
# an idle lab's clock jumps to its next timer, however far off, while it waits for the
# host. What is left to vary is how long the lab spins waiting for the host's I/O.
# `run_in_lab(..., instruction_clock=True)`; its heartbeats come per lab second, so a
# loaded host spaces them further apart: INSTRUCTION_CLOCK_HEARTBEAT_TIMEOUT.
ICOUNT_INSTRUCTIONS = "shift=2,align=off,sleep=off"
ICOUNT_ACCEL = "tcg,thread=single"
INSTRUCTION_CLOCK_HEARTBEAT_TIMEOUT = 120.0
INSIDE_ENV = "KVMPY_IN_LAB"  # set to 1 in every command the lab runs
KERNEL_CMDLINE = "console=ttyS0 panic=-1 quiet mitigations=off"
# For timing VM start-up (`run_in_lab(..., kernel_args=[ZERO_FREED_PAGES])`): the lab kernel
# zeroes pages as they are freed. Without it, a page that held a guest's code can still
# have TCG translations attached, and the next process to fault it in (its first write,
# zeroing a 2 MiB huge page) pays for invalidating them: up to a second, on whichever VMM
# came next. Not the default: zeroing every freed page under TCG costs page-cache-heavy
# work 12-15% and the test suite 5% (docs/lab.md, "Timing in the lab").
ZERO_FREED_PAGES = "init_on_free=1"
# QEMU's human monitor, for looking into a lab that stopped making progress:
# connect any Unix-socket client (socat) to /tmp/kvmpy-lab-*/monitor.sock, `info registers -a`.
MONITOR_SOCKET = "monitor.sock"
KICK_FIFO = "kick"  # in the job directory: the kick port's bytes (`_Kick`)
KICK_INTERVAL = 1.0  # seconds between two kicks

Output = int | BinaryIO


def qemu_argv(image: LabImage, job: Path, rw: Sequence[Path], mem: int, cpus: int,
              fds: Mapping[str, int], interactive: bool = False,
              kernel_args: Sequence[str] = (), accel: str = DEFAULT_ACCEL,
              cpu_model: str = DEFAULT_CPU_MODEL, icount: str | None = None) -> list[str]:
    """The QEMU command line of one lab run (`fds`: chardev id -> fd QEMU inherits)."""
    argv = [
        QEMU, "-accel", accel, "-cpu", cpu_model, "-smp", str(cpus),
        "-m", f"{mem // MiB}M", "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
        "-append", " ".join([KERNEL_CMDLINE, *kernel_args]),
        "-display", "none", "-monitor", f"unix:{job / MONITOR_SOCKET},server=on,wait=off",
        "-nodefaults", "-no-user-config", "-no-reboot",
        *(["-icount", icount] if icount else []),
        "-virtfs", f"local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on,"
                   "multidevs=remap",
        "-virtfs", f"local,path={job},mount_tag={JOB_TAG},security_model=none,multidevs=remap",
    ]
    for i, path in enumerate(rw):
        argv += ["-virtfs", f"local,path={path},mount_tag=kvmpyrw{i},security_model=none,"
                            "multidevs=remap"]
    for cid, fd in fds.items():
        argv += ["-chardev", f"file,id={cid},path=/proc/self/fd/{fd},append=on"]
    argv += ["-serial", "chardev:console",
             "-device", "virtio-serial-pci,id=vser",
             "-device", f"virtserialport,bus=vser.0,chardev=out,name={PORT_STDOUT}",
             "-device", f"virtserialport,bus=vser.0,chardev=err,name={PORT_STDERR}",
             "-device", f"virtserialport,bus=vser.0,chardev=beat,name={PORT_HEARTBEAT}",
             "-chardev", f"pipe,id=kick,path={job / KICK_FIFO}",
             "-device", f"virtserialport,bus=vser.0,chardev=kick,name={PORT_KICK}"]
    if interactive:
        # our stdin becomes the command's: QEMU puts a terminal in raw mode (and restores
        # it), signal=off so Ctrl-C reaches the command instead of killing the lab
        argv += ["-chardev", "stdio,id=in,signal=off",
                 "-device", f"virtserialport,bus=vser.0,chardev=in,name={PORT_STDIN}"]
    return argv


class _Relay(threading.Thread):
    """Copies a pipe to an output as data arrives; keeps the tail for error messages."""

    def __init__(self, fd: int, sink: Output | None, keep_lines: int = 0) -> None:
        super().__init__(daemon=True)
        self.fd, self.sink = fd, sink
        self.tail: deque[bytes] = deque(maxlen=keep_lines or None)
        self.keep = keep_lines > 0
        self._partial = b""
        self.last_output = time.monotonic()

    def run(self) -> None:
        while chunk := os.read(self.fd, 65536):
            self.last_output = time.monotonic()
            if self.sink is not None:
                _write(self.sink, chunk)
            if self.keep:
                *lines, self._partial = (self._partial + chunk).split(b"\n")
                self.tail.extend(lines)
        if self._partial:
            self.tail.append(self._partial)
        os.close(self.fd)

    def lines(self) -> list[str]:
        return [b.decode(errors="replace").strip("\r\x00 ") for b in self.tail]


class _Heartbeat(threading.Thread):
    """Reads the lab's heartbeat port: "CPU UPTIME" lines, one a second from each lab CPU."""

    def __init__(self, fd: int, cpus: int) -> None:
        super().__init__(daemon=True)
        self.fd, self.cpus = fd, cpus
        self.first: float | None = None  # when the first beat came
        self.last: dict[int, float] = {}  # lab CPU -> when it last beat
        self.longest_gap = 0.0
        self._lock = threading.Lock()

    def run(self) -> None:
        partial = b""
        while chunk := os.read(self.fd, 4096):
            now = time.monotonic()
            *lines, partial = (partial + chunk).split(b"\n")
            with self._lock:
                for line in lines:
                    try:
                        cpu = int(line.split()[0])
                    except (IndexError, ValueError):
                        continue
                    self.first = self.first or now
                    self.longest_gap = max(self.longest_gap,
                                           now - self.last.get(cpu, self.first))
                    self.last[cpu] = now
        os.close(self.fd)

    def silent(self) -> tuple[int, float] | None:
        """(the lab CPU silent longest, for how many seconds); None before the first beat."""
        with self._lock:
            if self.first is None:
                return None
            now = time.monotonic()
            return max(((cpu, now - self.last.get(cpu, self.first)) for cpu in range(self.cpus)),
                       key=lambda quiet: quiet[1])


class _Kick:
    """A byte a second into the lab's kick port, for the interrupt it raises there.

    Why: QEMU's TCG can lose a lab CPU's request to look at its APIC. `helper_vmrun`
    (entering a nested guest) sets CPU_INTERRUPT_VIRQ in the CPU's `interrupt_request`
    with a plain read-modify-write, outside the lock under which QEMU's main loop sets
    CPU_INTERRUPT_POLL for the APIC's timer and devices (QEMU 7.2 and master; docs/lab.md,
    "Stalls"). A request lost there leaves the lab CPU's timer vector pending in its APIC
    with nothing to ask for it. If that CPU is inside a nested guest that does not exit
    (a guest vCPU spinning, interrupts off, on a lock another vCPU holds, which the lab's
    scheduler now never runs), the lab stops for good: "running, the RIP in the guest's
    queued_spin_lock_slowpath, if=0, the timer's vector in IRR". Any interrupt the main
    loop delivers to the CPU sets the request again, and the CPU then takes whatever its
    APIC holds: the byte's virtio-serial interrupt is one, a second at most after the loss.
    """

    def __init__(self, fifo: Path) -> None:
        # read-write: opening never waits for QEMU, and a write never fails for want of
        # a reader (the bytes wait in the FIFO until QEMU takes them)
        self.fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        self.last = 0.0

    def __call__(self, now: float) -> None:
        if now - self.last >= KICK_INTERVAL:
            self.last = now
            try:
                os.write(self.fd, b"\n")
            except BlockingIOError:
                pass  # 64 KiB unread: the lab reads none, and has no use for more

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class LabStats:
    """What a lab run measured of the lab itself (pass one to `run_in_lab` to get them)."""

    lab_s: float = 0.0  # QEMU's whole run
    boot_s: float | None = None  # QEMU's start to the first heartbeat
    longest_heartbeat_gap_s: float = 0.0  # the most time between two beats of one CPU


def _write(sink: Output, data: bytes) -> None:
    try:
        if isinstance(sink, int):
            view = memoryview(data)
            while view:
                view = view[os.write(sink, view):]
        else:
            sink.write(data)
            sink.flush()
    except (BrokenPipeError, ValueError):
        pass  # the reader went away; the command goes on, like with a closed pipe


def _check_dirs(rw: Sequence[str | os.PathLike[str]]) -> list[Path]:
    out = []
    for d in rw:
        path = Path(d).resolve()
        if not path.is_dir():
            raise LabError(f"--rw {d}: not a directory")
        if "\n" in str(path):
            raise LabError(f"--rw {d}: a newline in the path is not supported")
        out.append(path)
    # Parents before children, so a nested --rw is mounted over its parent share.
    return sorted(set(out), key=lambda p: len(p.parts))


def run_in_lab(argv: Sequence[str], *, rw: Sequence[str | os.PathLike[str]] = (),
               mem: int = DEFAULT_MEM, cpus: int = DEFAULT_CPUS,
               cwd: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
               stdout: Output = 1, stderr: Output = 2, timeout: float | None = None,
               boot_timeout: float = DEFAULT_BOOT_TIMEOUT, verbose: bool = False,
               interactive: bool = False, quiet_timeout: float | None = None,
               kernel_args: Sequence[str] = (), accel: str | None = None,
               cpu_model: str = DEFAULT_CPU_MODEL, instruction_clock: bool = False,
               heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
               stats: LabStats | None = None) -> int:
    """Run `argv` in the lab and return its exit status; raise LabError if the lab fails.

    `stdout`/`stderr` are fds or binary files, written as output arrives. `cwd` and
    `env` default to this process's. `timeout` bounds the whole run (boot included).
    `interactive` passes this process's stdin to the command (else it reads /dev/null).
    A lab CPU whose heartbeat stops for `heartbeat_timeout` seconds, or a lab that
    sends none within `boot_timeout`, has stopped making progress: LabStalled, with
    where its CPUs were. `quiet_timeout`: a command that prints nothing for this long,
    once started, is killed (LabError).
    The lab VM: `cpus`, `mem`, `accel` (default DEFAULT_ACCEL) and `cpu_model` (QEMU's
    -accel and -cpu), and `kernel_args` added to the lab kernel's command line (e.g.
    `ZERO_FREED_PAGES`).
    `instruction_clock`: the lab's clock counts its instructions (ICOUNT_INSTRUCTIONS;
    it needs QEMU's single TCG thread, so another `accel` is refused).
    `stats`, if given, is filled in with what the run measured of the lab.
    """
    if instruction_clock and accel not in (None, ICOUNT_ACCEL):
        raise LabError(f"the lab's instruction clock needs -accel {ICOUNT_ACCEL}, not {accel}")
    ok, why = lab_status()
    if not ok:
        raise LabError(why)
    if mem < 256 * MiB:
        raise LabError(f"--mem {mem // MiB}M is too small for the lab: give at least 256M")
    if cpus < 1:
        raise LabError("--cpus must be at least 1")
    rw_dirs = _check_dirs(rw)
    icount = None
    if instruction_clock:
        icount, accel, kernel_args = ICOUNT_INSTRUCTIONS, ICOUNT_ACCEL, [
            *kernel_args, "idle=poll"]
        heartbeat_timeout = max(heartbeat_timeout, INSTRUCTION_CLOCK_HEARTBEAT_TIMEOUT)
    accel = accel or DEFAULT_ACCEL
    workdir = str(Path(cwd if cwd is not None else os.getcwd()).resolve())
    environ = dict(os.environ if env is None else env)
    environ[INSIDE_ENV] = "1"
    # kvmpy.lab.static_keys says why; this Python runs it, not the command's environment
    script = (f"{shlex.quote(sys.executable)} -m kvmpy.lab.static_keys\n"
              + command_script(list(argv), workdir, environ))
    image = build_lab_image()

    try:
        job = Path(tempfile.mkdtemp(prefix="kvmpy-lab-"))
    except OSError as e:
        raise LabError(f"cannot create the lab's job directory in {tempfile.gettempdir()}: "
                       f"{e.strerror}") from None
    readers: dict[str, int] = {}
    relays: list[_Relay] = []
    proc: subprocess.Popen[bytes] | None = None
    started = time.monotonic()
    heartbeat: _Heartbeat | None = None
    kick: _Kick | None = None
    try:
        try:
            (job / "cmd.sh").write_text(script)
            (job / "rw").write_text("".join(f"kvmpyrw{i} {p}\n" for i, p in enumerate(rw_dirs)))
            if not image.kallsyms.exists():
                (job / "want-kallsyms").touch()
            os.mkfifo(job / KICK_FIFO)
            kick = _Kick(job / KICK_FIFO)
        except OSError as e:
            raise LabError(f"cannot write the lab's job files in {job}: {e.strerror}") from None
        writers: dict[str, int] = {}
        try:
            for cid in ("console", "out", "err", "beat"):
                readers[cid], writers[cid] = os.pipe()
            with open(job / "qemu.log", "wb") as qemu_log:
                proc = subprocess.Popen(
                    qemu_argv(image, job, rw_dirs, mem, cpus, writers, interactive,
                              kernel_args, accel, cpu_model, icount),
                    stdin=None if interactive else subprocess.DEVNULL,
                    stdout=qemu_log, stderr=qemu_log,
                    pass_fds=list(writers.values()), preexec_fn=_die_with_parent)
        finally:
            for w in writers.values():
                os.close(w)  # QEMU holds the only write ends: EOF when it exits
        started = time.monotonic()
        heartbeat = _Heartbeat(readers.pop("beat"), cpus)
        heartbeat.start()
        sinks: dict[str, Output | None] = {"console": stderr if verbose else None,
                                           "out": stdout, "err": stderr}
        for cid in list(readers):
            relays.append(_Relay(readers.pop(cid), sinks[cid],
                                 keep_lines=60 if cid == "console" else 0))
            relays[-1].start()
        # relays[0] is the console; after it, the command's stdout and stderr
        try:
            _wait(proc, job, _Limits(timeout, boot_timeout, quiet_timeout, heartbeat_timeout),
                  heartbeat, lambda: max(relay.last_output for relay in relays[1:]), kick)
        except LabStalled as e:
            save_kallsyms(job, image.kallsyms)  # if this is the run that read them
            e.cpus = cpu_states(job / MONITOR_SOCKET, cpus,
                                lab_symbolizer(image.kallsyms, job / "modules"))
            e.args = (f"{e}; the lab's CPUs: {e.cpus}",)
            raise
        finally:
            proc.kill()  # nothing, if it has exited
        for relay in relays:
            relay.join(timeout=5)
        status = job / "status"
        if status.exists():
            return int(status.read_text().strip() or "125")
        raise _lab_failure(job, proc.returncode, relays[0].lines())
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if stats is not None and heartbeat is not None:
            stats.lab_s = time.monotonic() - started
            stats.boot_s = None if heartbeat.first is None else heartbeat.first - started
            stats.longest_heartbeat_gap_s = heartbeat.longest_gap
        for r in readers.values():
            os.close(r)
        if kick is not None:
            kick.close()
        save_kallsyms(job, image.kallsyms)
        shutil.rmtree(job, ignore_errors=True)


def _die_with_parent() -> None:
    """In the QEMU child: SIGKILL it if we die (a killed `kvmpy lab` leaves no VM spinning)."""
    set_parent_death_signal(signal.SIGKILL)


class LabBroke(LabError):
    """The lab itself failed under the command: it stalled, or it died. QEMU's TCG has
    done both for no reason of the command's (docs/lab.md, "Stalls, lab deaths and
    retries")."""


class LabStalled(LabBroke):
    """The lab stopped making progress: a lab CPU's heartbeat stopped, or never came.

    `cpus`: where the lab's CPUs were, as QEMU's monitor told (`kvmpy.lab.monitor`)."""

    cpus = ""


class LabDied(LabBroke):
    """The lab went down under the command: its kernel panicked, or QEMU ended (a reset
    of the emulated machine, with -no-reboot) with no word from the lab."""


class _Limits(NamedTuple):
    timeout: float | None  # the whole run
    boot: float  # QEMU's start to the first heartbeat
    quiet: float | None  # the command's silence, once it has started
    heartbeat: float  # a lab CPU's silence


def _wait(proc: subprocess.Popen[bytes], job: Path, limits: _Limits, heartbeat: _Heartbeat,
          last_output: Callable[[], float] = time.monotonic,
          kick: Callable[[float], None] = lambda now: None) -> None:
    """Wait for QEMU to exit; raise (QEMU is killed by the caller) if the lab does not
    boot, stalls, times out, or the command goes quiet.

    `last_output()`: when the command last printed (time.monotonic); `kick(now)` is
    called as this waits (`_Kick`)."""
    started = time.monotonic()
    ready_at: float | None = None  # when the lab started the command
    try:
        while proc.poll() is None:
            now = time.monotonic()
            kick(now)
            if ready_at is None and (job / "ready").exists():
                ready_at = now
            silent = heartbeat.silent()
            if silent is None and now - started > limits.boot:
                raise LabStalled(f"the lab sent no heartbeat within {limits.boot:.0f} s of "
                                 "starting (set KVMPY_LAB_BOOT_TIMEOUT to wait longer)")
            if silent is not None and silent[1] > limits.heartbeat and proc.poll() is None:
                raise LabStalled(f"the lab stalled: lab CPU {silent[0]} sent no heartbeat "
                                 f"for {silent[1]:.0f} s")
            if (ready_at is not None and limits.quiet is not None
                    and now - max(last_output(), ready_at) > limits.quiet):
                raise LabError(f"the command printed nothing for {limits.quiet:.0f} s")
            if limits.timeout is not None and now - started > limits.timeout:
                raise LabError(f"the command did not finish in the lab within "
                               f"{limits.timeout:.0f} s")
            try:
                proc.wait(timeout=0.05 if ready_at is None else 0.5)
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise


def _lab_failure(job: Path, qemu_status: int | None, console: list[str]) -> LabError:
    """Why the lab ended without the command's exit status: LabDied if the lab itself
    went down under the command (a kernel panic, or QEMU gone for no reason it gave),
    else a LabError saying what could not be done."""
    reason = _failure_reason(job, qemu_status, console)
    died = reason.startswith(("the lab kernel panicked", "the lab stopped"))
    return LabDied(reason) if died else LabError(reason)


def _failure_reason(job: Path, qemu_status: int | None, console: list[str]) -> str:
    """One line: why the lab ended without the command's exit status."""
    err = job / "error"
    if err.exists() and err.read_text().strip():
        return "the lab could not run the command: " + err.read_text().strip().splitlines()[0]
    for line in reversed(console):
        if ERROR_PREFIX in line:
            return "the lab could not run the command: " + line.split(ERROR_PREFIX, 1)[1].strip()
    qemu_log = job / "qemu.log"
    qlines = [ln for ln in (qemu_log.read_text(errors="replace").splitlines()
                            if qemu_log.exists() else []) if ln.strip()]
    if qlines:
        return f"QEMU failed (status {qemu_status}): {qlines[-1].strip()}"
    for line in reversed(console):
        if "Kernel panic" in line or "panic" in line.lower():
            return f"the lab kernel panicked: {line}"
    last = next((ln for ln in reversed(console) if ln), "no console output")
    return f"the lab stopped (QEMU status {qemu_status}) before the command finished: {last}"


if __name__ == "__main__":  # pragma: no cover - manual use: python -m kvmpy.lab.runner CMD...
    sys.exit(run_in_lab(sys.argv[1:]))
