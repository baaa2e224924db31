"""The sending side of a live migration: pre-copy rounds, a short pause, the handover.

What it is: a `Migration` runs on its own thread beside the vCPU threads, so the guest
keeps running while its RAM is copied:

1. connect and agree: each end sends its machine's identity (kvmpy.migration.agree);
   either refuses a mismatch before any page moves.
2. round 0: KVM's dirty log and kvmpy's own write log switched on (the logs a fast
   reset and incremental snapshots read, kvmpy.state.reset: the migration owns them
   while it runs), then every page the guest has used sent while it runs.
3. rounds 1..n: the pages dirtied meanwhile, read from both logs, sent again, until
   what is left would take no longer than the downtime limit at the rate the link
   has been measured at and rounds no longer halve it (or it is 1 MiB or less), and
   (for up to QUIET_WAIT_S) a round finds it small, between two of the guest's
   bursts of writes; or the round limit is reached (a guest that dirties faster than
   the link carries never converges: the limit ends it).
4. the pause: vCPUs held out of KVM_RUN and the I/O thread stopped between two
   requests (a disk request the guest made is done, or still in its queue for the
   destination to take); the last dirty pages, then every part's state (the same
   sections a snapshot holds, the registers as bytes), then END. Each step is timed
   (`phases`: query-migrate's x-pause-phases, the -v log).
5. the handover: the destination answers "running" once it has restored everything,
   just before it runs the guest; only then has the guest left. Any failure before
   that answer (a refusal, a dropped connection, a destination that dies, garbage)
   resumes the guest here: it is never lost, and never runs twice, because the
   destination runs only after telling us. An answer that never comes (silence,
   no close) leaves the guest paused here, with an error saying so: the destination
   might run it, so resuming here could run it twice.

What it is not: post-copy, compression or multiple streams; and the destination's
business (kvmpy.migration.destination).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from kvmpy import __version__
from kvmpy.errors import KvmpyError
from kvmpy.kvm import state as _kvm_state  # noqa: F401  (capture_state's: imported
from kvmpy.log import get_logger
from kvmpy.migration import agree, wire  # before the guest's pause, not in it)
from kvmpy.migration.wire import PAGE, MigrationError
from kvmpy.state import stream
from kvmpy.state.ram import used_runs
from kvmpy.state.reset import ResetPoint, dirty_pages, log_writes, stop_logging_writes
from kvmpy.stop import Stop, StopKind

if TYPE_CHECKING:
    from kvmpy.machine import Machine
    from kvmpy.memory import Region

log = get_logger(__name__)

CONNECT_TIMEOUT_S = 10.0
SILENCE_TIMEOUT_S = 60.0  # a destination that says nothing this long is gone
MIN_RATE_SAMPLE = 256  # pages: a round this small measures overhead, not the link
SMALL_REST = 256  # pages (1 MiB): a rest this small goes in the pause, however it shrinks
STEP_ASIDE_S = 1.5  # a migrated source's wait before its teardown (step_aside)
QUIET_WAIT_S = 0.5  # once the rest fits, how long rounds go on looking for a small one:
QUIET_REST = 64  # pages (256 KiB) or fewer (a few ms of the pause, even in the lab)
BATCH_BUFFERS = 512  # buffers in one sendmsg (headers and runs; the kernel takes 1024)
BATCH_BYTES = 4 << 20  # bytes in one sendmsg (a cancel waits at most for one)


class Parameters:
    """What `migrate-set-parameters` sets (QEMU's names, ours prefixed x-)."""

    def __init__(self) -> None:
        self.downtime_limit_ms = 300  # QEMU's default too
        self.max_rounds = 30
        self.max_bandwidth = 0  # bytes/s; 0: as fast as the link goes

    NAMES = {"downtime-limit": ("downtime_limit_ms", 1, 60_000),
             "x-max-rounds": ("max_rounds", 1, 10_000),
             "max-bandwidth": ("max_bandwidth", 0, 1 << 40)}

    def set(self, arguments: dict[str, Any]) -> None:
        """Every value checked before any is set; KvmpyError in one line."""
        values = {}
        for name, value in arguments.items():
            if name not in self.NAMES:
                raise KvmpyError(f"migrate-set-parameters: unknown parameter {name!r} "
                                 f"(known: {', '.join(sorted(self.NAMES))})")
            attr, low, high = self.NAMES[name]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise KvmpyError(f"migrate-set-parameters: {name} must be an integer from "
                                 f"{low} to {high}")
            values[attr] = value
        for attr, value in values.items():
            setattr(self, attr, value)

    def query(self) -> dict[str, int]:
        return {name: getattr(self, attr) for name, (attr, _, _) in self.NAMES.items()}


class Holder(Protocol):
    """Who pauses the guest for the last round (the QMP control, or the API's machine)."""

    def hold(self) -> bool: ...  # pause; True if the guest was running

    def let_go(self, resume: bool) -> None: ...  # the last round is over: resume or not


class MachineHolder:
    """`Holder` over a bare Machine (kvmpy.api.Guest)."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def hold(self) -> bool:
        was_running = not self.machine.paused
        self.machine.pause()
        return was_running

    def let_go(self, resume: bool) -> None:
        if resume:
            self.machine.resume()


class DirtyPages:
    """The migration's hold on the dirty logs (their owner, `Machine.dirty_log_owner`).

    An incremental-snapshot tracker that owned them is closed (the next incremental
    snapshot needs a full one first); a fast reset's mark is refused. A device records
    a page when it takes its window, before it writes: a write that lands after a
    `take` read its page would be missed, so each take also gives again the pages
    devices took in the interval before (the set is swapped, never cleared); the
    last take, with the I/O thread stopped, has them all."""

    def __init__(self, machine: Machine) -> None:
        owner = machine.dirty_log_owner
        if isinstance(owner, ResetPoint):
            raise MigrationError("this machine's dirty log is in use (a fast-reset mark)")
        if owner is not None:
            owner.close()
        self.machine = machine
        self._last: set[int] = set()
        log_writes(machine, self)

    def take(self) -> list[list[int]]:
        """Per region of guest RAM, the offsets of the pages written since the last take."""
        machine = self.machine
        if machine.dirty_log_owner is not self:
            raise MigrationError("the dirty log was taken over during the migration "
                                 "(a fast-reset mark)")
        written = machine.memory.written  # (the set `dirty_pages` swaps out)
        pages = dirty_pages(machine)
        late, self._last = self._last.copy(), written if written is not None else set()
        out = []
        for region, offsets in zip(machine.memory, pages, strict=True):
            first, last = region.gpa // PAGE, region.end // PAGE
            extra = {(p - first) * PAGE for p in late if first <= p < last}
            out.append(sorted(extra.union(offsets)) if extra else offsets)
        return out

    def close(self, stop_logging: bool = True) -> None:
        """Hand the logs back; `stop_logging` False leaves KVM's log on (a guest that has
        gone: turning it off makes KVM rebuild the huge pages of a VM about to close)."""
        stop_logging_writes(self.machine, self, stop_logging)


class Cancelled(MigrationError):
    pass


class Undecided(MigrationError):
    """No answer after END, and no close: the destination may be running the guest."""


class Migration:
    """One outgoing migration of `machine` to `address`, on its own thread (`start`).

    `on_status(status, info)` is told each change of status ("setup", "active",
    "device", then "completed", "failed" or "cancelled"); before "completed" the
    machine is stopped (StopKind.MIGRATED): the guest runs at the destination now.
    """

    def __init__(self, machine: Machine, address: wire.Address, params: Parameters,
                 holder: Holder, on_status: Callable[[str, dict[str, Any]], None]) -> None:
        self.machine = machine
        self.address = address
        self.params = params
        self.holder = holder
        self.on_status = on_status
        self.status = "setup"
        self.error = ""
        self.done = threading.Event()
        self._cancel = threading.Event()
        self._committed = False  # END sent: no cancel from here on
        self._sock: socket.socket | None = None
        self._log: DirtyPages | None = None
        self._thread = threading.Thread(target=self._run, name="migration", daemon=True)
        self._started = time.monotonic()
        self._setup_s = 0.0
        self.rounds = 0
        self.transferred = 0
        self.pages = 0
        self.remaining = 0
        self.dirty_rate = 0.0  # pages/s, last round
        self.rate = 0.0  # bytes/s the link has carried
        self.expected_downtime_s = 0.0
        self.downtime_s: float | None = None
        self.total_s: float | None = None
        self.phases = wire.Phases()  # the pause's steps

    # -- control ---------------------------------------------------------------------------
    def start(self) -> None:
        """Check the guest can go now (MigrationError in one line if not), then go."""
        if self.machine.stopped is not None:
            raise MigrationError(f"the guest has stopped ({self.machine.stopped.reason})")
        if self.machine.paused:
            raise MigrationError("the guest is paused: kvmpy migrates running guests "
                                 "(cont first)")
        if isinstance(self.machine.dirty_log_owner, ResetPoint):
            raise MigrationError("this machine's dirty log is in use (a fast-reset mark)")
        self._thread.start()

    def cancel(self) -> bool:
        """Stop a migration that has not handed over yet; False if it is too late."""
        if self._committed or self.done.is_set():
            return False
        self._cancel.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # a send blocked on a full socket returns
            except OSError:
                pass
        return True

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def info(self) -> dict[str, Any]:
        """query-migrate's answer, with QEMU's field names."""
        now = time.monotonic()
        total = self.total_s if self.total_s is not None else now - self._started
        out: dict[str, Any] = {
            "status": self.status,
            "total-time": round(total * 1000),
            "setup-time": round(self._setup_s * 1000),
            "expected-downtime": round(self.expected_downtime_s * 1000),
            "ram": {"transferred": self.transferred, "remaining": self.remaining,
                    "total": self.machine.memory.size, "normal": self.pages,
                    "normal-bytes": self.pages * PAGE, "dirty-sync-count": self.rounds,
                    "dirty-pages-rate": round(self.dirty_rate), "page-size": PAGE,
                    "mbps": round(self.rate * 8 / 1e6, 3)},
        }
        if self.downtime_s is not None:
            out["downtime"] = round(self.downtime_s * 1000, 3)
        if phases := self.phases.since("pause"):
            out["x-pause-phases"] = phases
        if self.error:
            out["error-desc"] = self.error
        return out

    def summary(self) -> str:
        mib = self.transferred / (1 << 20)
        downtime = "" if self.downtime_s is None else f", downtime {self.downtime_s * 1000:.0f} ms"
        return (f"{self.rounds} rounds, {mib:.1f} MiB in {(self.total_s or 0):.2f} s"
                f"{downtime}")

    # -- the thread ------------------------------------------------------------------------
    def _set(self, status: str) -> None:
        self.status = status
        try:
            self.on_status(status, self.info())
        except Exception as e:  # an observer must not break the migration
            log.warning("migration: status observer failed: %r", e)

    def _run(self) -> None:
        held = was_running = False
        outcome, resume = "failed", True
        self._set("setup")
        try:
            sock = self._sock = wire.connect(self.address, CONNECT_TIMEOUT_S)
            sock.settimeout(SILENCE_TIMEOUT_S)
            self._handshake(sock)
            self._setup_s = time.monotonic() - self._started
            self._set("active")
            tracker = self._log = DirtyPages(self.machine)
            pending = self._precopy(sock, tracker)
            paused_at = time.monotonic()  # (downtime counts the kick, as QEMU's does)
            self.phases.mark("pause")
            held, was_running = True, self.holder.hold()
            self.phases.mark("paused")
            self._set("device")
            if not was_running:
                raise MigrationError("the guest was paused during the migration")
            if self.machine.stopped is not None:
                raise MigrationError(f"the guest stopped during the migration "
                                     f"({self.machine.stopped.reason})")
            self._last_round(sock, tracker, pending)
            self._committed = True  # from here, only the destination's answer decides
            reply = self._answer(sock)
            if reply.get("status") != "running":  # said before running anything
                raise MigrationError(f"the destination failed: {_line(reply.get('error'))}")
            self.downtime_s = time.monotonic() - paused_at
            self.phases.mark("answer")
            log.info("migration: the pause's steps: %s", self.phases.text())
            outcome = "completed"
        except Cancelled:
            outcome, self.error = "cancelled", "cancelled"
        except Undecided as e:
            resume, self.error = False, str(e)
        except KvmpyError as e:  # MigrationError, or a pause that failed
            self.error = str(e)
        except Exception as e:  # a bug: the guest must still come back
            log.warning("migration: %r", e)
            self.error = f"internal error: {e!r}"
        finally:
            self.total_s = time.monotonic() - self._started
            # a guest gone leaves the logs on: turning KVM's off makes it rebuild the huge
            # mappings of a VM about to close (docs/migration.md, the guest's stall)
            if self._log is not None:
                self._log.close(stop_logging=outcome != "completed")
            if self._sock is not None:
                self._sock.close()
            if held:
                self.holder.let_go(resume=resume and was_running and outcome != "completed")
            if outcome != "completed":  # said before the status shows it
                log.warning("migration to %s %s: %s; %s", self.address.text, outcome,
                            self.error, "the guest runs on here" if resume or not held else
                            "the guest stays paused here")
            self._set(outcome)
            if outcome == "completed":  # the guest runs there now, never again here
                self.machine.request_stop(Stop(StopKind.MIGRATED, f"migrated to "
                                               f"{self.address.text} ({self.summary()})"))
            self.done.set()

    def _handshake(self, sock: socket.socket) -> None:
        mine = agree.identity(self.machine)
        try:
            wire.send_hello(sock, {"kvmpy": __version__, "machine": mine})
            theirs = wire.recv_hello(sock)
        except OSError as e:
            raise MigrationError(f"{self.address.text}: {e.strerror or e}") from None
        if theirs.get("ok") is not True:
            raise MigrationError(f"the destination refused: {_line(theirs.get('error'))}")
        difference = agree.differ(mine, theirs.get("machine"))
        if difference is not None:
            raise MigrationError(f"the destination's machine is not this one: {difference}")

    def _precopy(self, sock: socket.socket, tracker: DirtyPages) -> list[list[int]]:
        """Rounds while the guest runs; returns the dirty pages left for the last round."""
        memory = self.machine.memory
        self._send_record(sock, wire.ROUND, 0, 0)
        started = time.monotonic()
        sent = self._send_runs(sock, ((r, s - r.offset, n) for r in memory
                                      for s, n in used_runs(memory, r)))
        self._measure(sent, time.monotonic() - started)
        last_take, before, fitted = started, None, None
        while True:
            self.rounds += 1
            now = time.monotonic()
            pending = tracker.take()
            count = sum(len(p) for p in pending)
            self.remaining = count * PAGE
            self.dirty_rate = count / max(now - last_take, 1e-6)
            last_take = now
            self.expected_downtime_s = self.remaining / self.rate if self.rate else 0.0
            fits = self.expected_downtime_s * 1000 <= self.params.downtime_limit_ms
            if fits and fitted is None:
                fitted = now
            # within the limit, one more round is worth it while rounds still halve what
            # is left: the pause then carries only what the guest dirties in a round;
            # and, for a while, until a round finds little: a guest that writes in
            # bursts (most do: a tick's work, then a sleep) is caught between two
            shrinking = count > SMALL_REST and (before is None or count < before / 2)
            waiting = count > QUIET_REST and fitted is not None and \
                now - fitted < QUIET_WAIT_S
            if (fits and not shrinking and not waiting) or \
                    self.rounds >= self.params.max_rounds:
                return pending
            before = count
            self._send_record(sock, wire.ROUND, self.rounds, 0)
            started = time.monotonic()
            sent = self._send_runs(sock, _runs(memory, pending))
            self._measure(sent, time.monotonic() - started)

    def _last_round(self, sock: socket.socket, tracker: DirtyPages,
                    pending: list[list[int]]) -> None:
        memory = self.machine.memory
        last = [sorted(set(a) | set(b)) for a, b in zip(pending, tracker.take(),
                                                          strict=True)]
        self.remaining = sum(len(p) for p in last) * PAGE
        self.phases.mark("taken")
        self._send_record(sock, wire.ROUND, self.rounds + 1, 0)
        self._send_runs(sock, _runs(memory, last))
        self.remaining = 0
        self.phases.mark("pages-sent")
        sections = self.machine.capture_state(compact=True, live=True)
        self.phases.mark("captured")
        state = stream.encode(sections)
        self.phases.mark("encoded")
        self._send_record(sock, wire.STATE, len(state), 0)
        self._send(sock, state)
        self._send_record(sock, wire.END, 0, 0)
        self.phases.mark("state-sent")

    def _answer(self, sock: socket.socket) -> dict[str, Any]:
        """The destination's last word. A close or a break without it means the guest
        did not run there (it says "running" first); silence means it may have."""
        try:
            return wire.recv_message(sock, "the destination's answer")
        except wire.Silence as e:
            raise Undecided(f"{e}; it may be running the guest, so this one stays paused "
                            "(QMP cont resumes it)") from None

    # -- sending ---------------------------------------------------------------------------
    def _measure(self, sent_pages: int, seconds: float) -> None:
        if sent_pages >= MIN_RATE_SAMPLE or not self.rate:
            self.rate = sent_pages * PAGE / max(seconds, 1e-6)

    def _send_runs(self, sock: socket.socket, runs: Iterable[tuple[Region, int, int]]) -> int:
        """Send each (region, offset, length) of guest RAM as PAGES records; returns pages.
        Records go out many to a `sendmsg` (each header and window of guest RAM one
        buffer of it, nothing copied): the scattered pages of a last round cost a
        system call per batch, not two per run."""
        pages = 0
        batch: list[bytes | memoryview] = []
        size = 0
        for region, offset, length in runs:
            for start in range(offset, offset + length, wire.MAX_PAGES * PAGE):
                n = min(wire.MAX_PAGES * PAGE, offset + length - start)
                batch += (wire.RECORD.pack(wire.PAGES, n // PAGE, region.gpa + start),
                          region.view[start : start + n])
                size += n
                pages += n // PAGE
                if len(batch) >= BATCH_BUFFERS or size >= BATCH_BYTES:
                    self._send(sock, batch)
                    batch, size = [], 0
        if batch:
            self._send(sock, batch)
        self.pages += pages
        return pages

    def _send_record(self, sock: socket.socket, kind: int, count: int, gpa: int) -> None:
        self._send(sock, wire.RECORD.pack(kind, count, gpa))

    def _send(self, sock: socket.socket, data: bytes | memoryview | list[bytes | memoryview]
              ) -> None:
        """Send `data` (one buffer, or several in order) whole, or raise MigrationError
        (Cancelled once cancelled)."""
        if self._cancel.is_set():
            raise Cancelled("cancelled")
        try:
            if isinstance(data, list):
                sent = _sendmsg_all(sock, data)
            else:
                sock.sendall(data)
                sent = len(data)
        except TimeoutError:
            raise MigrationError(f"the destination took nothing for {SILENCE_TIMEOUT_S:g} s"
                                 ) from None
        except OSError as e:
            if self._cancel.is_set():
                raise Cancelled("cancelled") from None
            raise MigrationError(f"the connection to the destination broke: "
                                 f"{e.strerror or e}") from None
        self.transferred += sent
        limit = self.params.max_bandwidth
        if limit:
            ahead = self.transferred / limit - (time.monotonic() - self._started)
            if ahead > 0:
                time.sleep(min(ahead, 1.0))


def _sendmsg_all(sock: socket.socket, buffers: list[bytes | memoryview]) -> int:
    """`sendall` for several buffers: `sendmsg` until every byte has gone; returns bytes.
    (A socket with a timeout may take part of them.)"""
    total = sum(len(b) for b in buffers)
    left = total
    while True:
        sent = sock.sendmsg(buffers)
        left -= sent
        if not left:
            return total
        while sent >= len(buffers[0]):  # drop what went, cut into the first that did not
            sent -= len(buffers[0])
            buffers = buffers[1:]
        buffers = [memoryview(buffers[0])[sent:], *buffers[1:]]


def _runs(memory: Any, pending: list[list[int]]) -> Iterator[tuple[Region, int, int]]:
    """(region, offset, length) of each run of consecutive pages in `pending` (per
    region, sorted offsets)."""
    for region, offsets in zip(memory, pending, strict=True):
        start = end = -1
        for offset in offsets:
            if offset == end:
                end += PAGE
                continue
            if start >= 0:
                yield region, start, end - start
            start, end = offset, offset + PAGE
        if start >= 0:
            yield region, start, end - start


def _line(text: object) -> str:
    """One line of what the other end said (untrusted: cut, control characters out)."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    return s[:300] or "(no reason given)"


def step_aside() -> None:
    """The guest runs on at the destination: what is left to do here, closing the VM and
    freeing its RAM, must not take CPU time from its first moments there. On one host (a
    local migration, the lab) that teardown, run at once, made the guest's first copy
    there 270 ms long instead of 55 (docs/migration.md, "Where the guest's stall goes").
    So the source waits STEP_ASIDE_S, then tears down at its own priority. A lower one
    (SCHED_IDLE, tried) starves the teardown for minutes wherever the destination's vCPUs
    keep every CPU busy, as in a lab of one CPU, and the source must exit."""
    time.sleep(STEP_ASIDE_S)
