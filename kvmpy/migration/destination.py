"""The receiving side of a live migration: `kvmpy run ... --incoming unix:PATH|tcp:HOST:PORT`.

What it is: `receive(machine, address)` takes one migration into `machine`, a machine
built `incoming` (the same recipe as any, from this process's own options, with fresh
zeroed RAM and no boot): it listens, accepts one connection, answers the source's
hello with its own identity (kvmpy.migration.agree: a mismatch is refused here and
there, before any page moves), writes each PAGES record straight into guest RAM,
restores every part from the STATE record at END, and only then answers "running".
The caller runs the guest after that. Disks: this end opens the same image files
(shared storage); the source has finished its requests before it sent the state.
Network devices attach to this end's own taps.

Everything that arrives is untrusted: a record of an unknown kind, pages outside
guest RAM, a cut or damaged stream, state no part will take: each is one
MigrationError (the command line prints it as one line and exits non-zero), and the
source, which hears "failed" or sees the connection close, keeps its guest.

What it is not: a server. One migration per process, then the socket is gone.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any

from kvmpy import __version__
from kvmpy.errors import KvmpyError
from kvmpy.kvm import state as _kvm_state  # noqa: F401  (restore_state's: imported
from kvmpy.log import get_logger
from kvmpy.migration import agree, wire  # before the guest's pause, not in it)
from kvmpy.migration.wire import PAGE, MigrationError
from kvmpy.state import stream

if TYPE_CHECKING:
    from kvmpy.machine import Machine

log = get_logger(__name__)

SILENCE_TIMEOUT_S = 60.0  # a source that sends nothing this long (mid-stream) is gone


class Incoming:
    """What one received migration moved."""

    def __init__(self) -> None:
        self.pages = 0
        self.rounds = 0
        self.seconds = 0.0
        self.phases = wire.Phases()  # the last steps, from the STATE record on


def receive(machine: Machine, address: wire.Address, on_listening: Any = None,
            on_agreed: Any = None) -> Incoming:
    """Wait for one migration at `address` and put it into `machine`; MigrationError in
    one line for anything that is not a whole, matching stream. `on_agreed()` runs once
    both ends have agreed, while the source sends its first round: what the guest's
    state does not change (kvmpy.cli starts the vCPU threads, held) is done there,
    not in the pause."""
    listener = wire.listen(address)
    try:
        if on_listening is not None:
            on_listening()
        conn, _ = listener.accept()
    finally:
        listener.close()
        if address.family == socket.AF_UNIX:
            _unlink(str(address.where))
    started = time.monotonic()
    incoming = Incoming()
    with conn:
        conn.settimeout(SILENCE_TIMEOUT_S)
        error = None
        try:
            _agree(conn, machine)
            machine.vm.msrs_to_save(machine.vcpus[0])  # (found once: not in the pause)
            if on_agreed is not None:
                on_agreed()
            sections = _records(conn, machine, incoming)
            machine.restore_state(sections, live=True)
            incoming.phases.mark("restored")
        except KvmpyError as e:
            error = str(e)
        if error is not None:  # (raised out here: no traceback left holding guest RAM)
            _tell(conn, {"status": "failed", "error": error})
            raise MigrationError(f"incoming migration: {error}")
        # the guest runs here from now on: say so first, so that a source that does
        # not hear it (gone, or the connection broken) knows the guest did not run here
        try:
            wire.send_message(conn, {"status": "running"})
            incoming.phases.mark("running-sent")
        except OSError as e:
            raise MigrationError("incoming migration: the source went away before the "
                                 f"handover ({e.strerror or e}); the guest was not "
                                 "started here") from None
    incoming.seconds = time.monotonic() - started
    return incoming


def _agree(conn: socket.socket, machine: Machine) -> None:
    mine = agree.identity(machine)
    hello = wire.recv_hello(conn)
    difference = agree.differ(mine, hello.get("machine"))
    reply: dict[str, Any] = {"kvmpy": __version__, "machine": mine, "ok": difference is None}
    if difference is not None:
        reply["error"] = f"the destination's machine is not the source's: {difference}"
    _tell(conn, reply, hello=True)
    if difference is not None:
        raise MigrationError(f"refused: the source's machine is not this one: {difference}")


class _Stream:
    """The connection read through a buffer: the many small records of a round of
    scattered pages (a header, a page or a few) come a buffer's worth to a `recv`, not
    two `recv`s each; a large run of pages is read straight into guest RAM."""

    BUFFER = 256 << 10

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = bytearray(self.BUFFER)
        self.start = self.end = 0  # what is buffered and not yet read

    def into(self, view: memoryview, what: str) -> None:
        """Fill `view` (MigrationError if the stream ends or breaks first)."""
        got = min(len(view), self.end - self.start)
        view[:got] = self.buffer[self.start : self.start + got]
        self.start += got
        while got < len(view):
            if len(view) - got >= self.BUFFER // 2:
                wire.recv_into_exactly(self.conn, view[got:], what)
                return
            self.end = wire.recv_into_some(self.conn, memoryview(self.buffer), what)
            self.start = take = min(len(view) - got, self.end)
            view[got : got + take] = self.buffer[:take]
            got += take

    def exactly(self, n: int, what: str) -> bytes:
        data = bytearray(n)
        self.into(memoryview(data), what)
        return bytes(data)


def _records(conn: socket.socket, machine: Machine, incoming: Incoming) -> dict[str, Any]:
    """Every record up to END into guest RAM; returns the STATE record's sections."""
    memory = machine.memory
    reader = _Stream(conn)
    header = memoryview(bytearray(wire.RECORD.size))
    sections: dict[str, Any] | None = None
    while True:
        reader.into(header, "a record header")
        kind, count, gpa = wire.RECORD.unpack(header)
        if kind == wire.PAGES or kind == wire.ZEROS:
            if not 0 < count <= wire.MAX_PAGES or gpa % PAGE or \
                    not memory.contains(gpa, count * PAGE):
                raise MigrationError(f"a {wire.KINDS[kind]} record for "
                                     f"[{gpa:#x}, +{count} pages), not guest RAM here")
            window = memory.view(gpa, count * PAGE)
            if kind == wire.PAGES:
                reader.into(window, "a page record")
                incoming.pages += count
            else:
                window[:] = bytes(count * PAGE)
        elif kind == wire.ROUND:
            incoming.rounds = count
        elif kind == wire.STATE:
            if sections is not None or count > wire.MAX_STATE:
                raise MigrationError("a second or oversized STATE record")
            incoming.phases.mark("state-record")
            data = reader.exactly(count, "the state record")
            incoming.phases.mark("state-received")
            sections = stream.decode(data, "the state")
            incoming.phases.mark("decoded")
        elif kind == wire.END:
            if sections is None:
                raise MigrationError("END before any state")
            return sections
        else:
            raise MigrationError(f"a record of unknown kind {kind} "
                                 "(not a kvmpy migration stream, or a damaged one)")


def _tell(conn: socket.socket, body: dict[str, Any], hello: bool = False) -> None:
    try:
        (wire.send_hello if hello else wire.send_message)(conn, body)
    except OSError:
        pass  # the source is gone; it keeps (or has lost) its guest either way


def _unlink(path: str) -> None:
    import os

    try:
        os.unlink(path)
    except OSError:
        pass
