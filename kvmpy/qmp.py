"""A QMP server: QEMU's JSON machine protocol on a unix socket, so QMP tools drive kvmpy.

What it is: the wire protocol of QEMU's docs/interop/qmp-spec.rst, server side. A
client that connects gets the greeting

    {"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0},
                         "package": "kvmpy 0.1.0"}, "capabilities": []}}

must send {"execute": "qmp_capabilities"} before anything else, and then sends
commands ({"execute": NAME, "arguments": {...}, "id": ANY}) that are answered in
order with {"return": VALUE, "id": ANY} or {"error": {"class": CLASS, "desc":
TEXT}, "id": ANY}. Events reach every client in command mode as {"event": NAME,
"data": {...}, "timestamp": {"seconds": S, "microseconds": US}}. Messages are JSON
objects one after another (a client need not end them with a newline); the server
ends each of its own with CRLF, as QEMU does.

Commands: qmp_capabilities, query-status, query-version, query-commands, stop,
cont, system_powerdown, quit, live migration as QEMU names it (migrate {"uri"},
query-migrate, migrate_cancel, migrate-set-parameters, query-migrate-parameters:
kvmpy.migration), and kvmpy's own, named as QMP names extensions:
x-kvmpy-snapshot-save {"path": DIR, "incremental": bool} and x-kvmpy-stats. An
argument a command does not take is refused as QEMU refuses it ("Parameter 'x' is
unexpected"), never ignored. Events:
STOP, RESUME, POWERDOWN, SHUTDOWN {"guest": bool, "reason": ...}, MIGRATION
{"status": ...}, with QEMU's names and reasons.

What it is not: the machine. The server asks a `QmpTarget` (the command line's
adapter around a `Machine`) to act; every client runs on its own thread and the
target serialises what they ask. No out-of-band execution, no TCP (a unix socket's
file mode is its access control).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kvmpy import __version__
from kvmpy.errors import ConfigError, KvmpyError
from kvmpy.log import get_logger
from kvmpy.stop import Stop, StopKind

if TYPE_CHECKING:
    from kvmpy.machine import Machine
    from kvmpy.migration.source import Migration

log = get_logger(__name__)

MAX_MESSAGE = 1 << 20  # bytes a client may send without finishing a JSON object
MAX_CLIENTS = 16


class QmpTarget(Protocol):
    """What the server asks of the VM (kvmpy.cli's MachineControl)."""

    def status(self) -> str: ...  # "running", "paused" or "shutdown"

    def stop(self) -> None: ...

    def cont(self) -> None: ...

    def powerdown(self) -> None: ...

    def quit(self) -> None: ...

    def snapshot_save(self, path: str, incremental: bool = False) -> dict[str, Any]: ...

    def stats(self) -> dict[str, Any]: ...

    def migrate(self, uri: str) -> None: ...

    def migrate_cancel(self) -> None: ...

    def query_migrate(self) -> dict[str, Any]: ...

    def migrate_set_parameters(self, arguments: dict[str, Any]) -> None: ...

    def query_migrate_parameters(self) -> dict[str, Any]: ...


class QmpError(Exception):
    """A command that failed: its QMP error class and description."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.error_class = error_class


def _string(arguments: dict[str, Any], name: str) -> str:
    value = arguments.get(name)
    if not isinstance(value, str) or not value or "\0" in value:
        raise QmpError(f"Parameter '{name}' is missing or not a string (without NUL bytes)")
    return value


def parse_address(spec: str) -> Path:
    """`unix:PATH` -> PATH, checked as `kvmpy run --qmp` takes it (before anything runs).

    An existing socket at PATH is replaced, as QEMU replaces one; any other file is not.
    """
    kind, _, path = spec.partition(":")
    if kind != "unix" or not path:
        raise ConfigError(f"--qmp {spec}: unix:PATH (a unix socket kvmpy creates)")
    where = Path(path)
    if not where.parent.is_dir():
        raise ConfigError(f"--qmp {spec}: no directory {where.parent}")
    try:
        mode = os.stat(where, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return where
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"--qmp {spec}: {where} exists and is not a socket")
    return where


class QmpServer:
    """Listens on a unix socket; `emit` sends an event to every negotiated client."""

    def __init__(self, path: Path, target: QmpTarget) -> None:
        self.path = Path(path)
        self.target = target
        self._clients: list[_Client] = []
        self._lock = threading.Lock()
        self._closed = False
        if self.path.exists():
            self.path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)  # only this user may connect
        try:
            self._sock.bind(str(self.path))
            self._sock.listen(MAX_CLIENTS)
        except OSError as e:  # (a file system without sockets, a path too long...)
            self._sock.close()
            raise ConfigError(f"--qmp unix:{self.path}: {e.strerror or e}") from None
        finally:
            os.umask(old)
        self._thread = threading.Thread(target=self._accept, name="qmp", daemon=True)
        self._commands: dict[str, Callable[[dict[str, Any]], Any]] = {
            "qmp_capabilities": lambda _: {},
            "query-status": self._query_status,
            "query-version": lambda _: VERSION,
            "query-commands": lambda _: [{"name": n} for n in sorted(self._commands)],
            "stop": lambda _: self.target.stop(),
            "cont": lambda _: self.target.cont(),
            "system_powerdown": lambda _: self.target.powerdown(),
            "quit": lambda _: self.target.quit(),
            "x-kvmpy-snapshot-save": self._snapshot_save,
            "x-kvmpy-stats": lambda _: self.target.stats(),
            "migrate": self._migrate,
            "migrate_cancel": lambda _: self.target.migrate_cancel(),
            "query-migrate": lambda _: self.target.query_migrate(),
            "migrate-set-parameters": lambda a: self.target.migrate_set_parameters(a),
            "query-migrate-parameters": lambda _: self.target.query_migrate_parameters(),
        }

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.close()
        try:
            self.path.unlink()
        except OSError:
            pass

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        now = time.time()
        message: dict[str, Any] = {"event": event, "timestamp": {
            "seconds": int(now), "microseconds": int(now % 1 * 1_000_000)}}
        if data is not None:
            message["data"] = data
        with self._lock:
            clients = [c for c in self._clients if c.negotiated]
        for client in clients:
            client.send(message)

    # -- commands -------------------------------------------------------------------------
    def execute(self, name: str, arguments: dict[str, Any]) -> Any:
        command = self._commands.get(name)
        if command is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        if name != "migrate-set-parameters":  # (which checks its own: kvmpy.migration)
            unexpected = sorted(set(arguments) - PARAMETERS.get(name, set()))
            if unexpected:  # (QEMU's answer: a misspelt option is not silently ignored)
                raise QmpError(f"Parameter '{unexpected[0]}' is unexpected")
        result = command(arguments)
        return {} if result is None else result

    def _query_status(self, _: dict[str, Any]) -> dict[str, Any]:
        status = self.target.status()
        return {"status": status, "running": status == "running", "singlestep": False}

    def _snapshot_save(self, arguments: dict[str, Any]) -> dict[str, Any]:
        path = _string(arguments, "path")
        incremental = arguments.get("incremental", False)
        if not isinstance(incremental, bool):
            raise QmpError("Parameter 'incremental' is not a boolean")
        meta = self.target.snapshot_save(path, incremental)
        return {"path": path, "seconds": meta["seconds"], "ram_bytes": meta["ram"]["data_bytes"]}

    def _migrate(self, arguments: dict[str, Any]) -> None:
        self.target.migrate(_string(arguments, "uri"))

    # -- connections ------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            client = _Client(self, conn)
            with self._lock:
                if len(self._clients) >= MAX_CLIENTS:
                    conn.close()
                    continue
                self._clients.append(client)
            threading.Thread(target=client.serve, name="qmp-client", daemon=True).start()

    def _gone(self, client: _Client) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)


VERSION = {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": f"kvmpy {__version__}"}
# The arguments each command takes (none where it is not named here).
PARAMETERS = {"qmp_capabilities": {"enable"}, "x-kvmpy-snapshot-save": {"path", "incremental"},
              "migrate": {"uri"}}


class _Client:
    """One connection: the greeting, negotiation, then commands until EOF."""

    def __init__(self, server: QmpServer, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn
        self.negotiated = False
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\r\n"
        with self._send_lock:
            try:
                self.conn.sendall(data)
            except OSError:
                pass  # the client went away; its reader thread notices

    def close(self) -> None:
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def serve(self) -> None:
        try:
            self.send({"QMP": {"version": VERSION, "capabilities": []}})
            for message in self._messages():
                self._handle(message)
        finally:
            self.server._gone(self)
            self.conn.close()

    def _messages(self) -> Iterator[Any]:
        """Each JSON value the client sends (a framing error is answered, then skipped)."""
        framer = _Framer()
        while True:
            try:
                chunk = self.conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            try:
                frames = framer.feed(chunk)
            except ValueError as e:  # a message longer than MAX_MESSAGE
                self.send(_error("GenericError", str(e)))
                return
            for frame in frames:
                if frame is None:
                    self.send(_error("GenericError", "JSON parse error, expecting an object"))
                    continue
                try:
                    yield json.loads(frame)
                except (ValueError, RecursionError):
                    self.send(_error("GenericError", "JSON parse error"))

    def _handle(self, message: Any) -> None:
        if not isinstance(message, dict):
            self.send(_error("GenericError", "QMP input must be a JSON object"))
            return
        ident = message.get("id")
        name = message.get("execute")
        arguments = message.get("arguments", {})
        if "exec-oob" in message:
            self.send(_error("GenericError", "QMP input member 'exec-oob' is unexpected",
                             ident))
            return
        if not isinstance(name, str):
            self.send(_error("GenericError", "QMP input lacks member 'execute'", ident))
            return
        if not isinstance(arguments, dict):
            self.send(_error("GenericError", "QMP input member 'arguments' must be an object",
                             ident))
            return
        if not self.negotiated and name != "qmp_capabilities":
            self.send(_error("CommandNotFound", "Expecting capabilities negotiation with "
                             "'qmp_capabilities'", ident))
            return
        if self.negotiated and name == "qmp_capabilities":
            self.send(_error("CommandNotFound", "Capabilities negotiation is already complete, "
                             "command ignored", ident))
            return
        try:
            result = self.server.execute(name, arguments)
        except QmpError as e:
            self.send(_error(e.error_class, str(e), ident))
            return
        except KvmpyError as e:
            self.send(_error("GenericError", str(e), ident))
            return
        except Exception as e:  # a bug must not take the monitor down with it
            log.warning("qmp: %s failed: %r", name, e)
            self.send(_error("GenericError", f"{name}: internal error: {e!r}", ident))
            return
        reply: dict[str, Any] = {"return": result}
        if ident is not None:
            reply["id"] = ident
        self.send(reply)
        if name == "qmp_capabilities":
            self.negotiated = True


class _Framer:
    """Cuts a byte stream into top-level JSON objects by counting brackets outside
    strings, as QEMU's JSON streamer does: a message may span reads, and several may
    come in one. Bytes outside any object (other than whitespace) give a None."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_string = self._escaped = False
        self._scanned = 0  # bytes of _buf already scanned

    def feed(self, data: bytes) -> list[bytes | None]:
        self._buf += data
        out: list[bytes | None] = []
        i = self._scanned
        buf = self._buf
        while i < len(buf):
            c = buf[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == 0x5C:  # backslash
                    self._escaped = True
                elif c == 0x22:  # quote
                    self._in_string = False
            elif c == 0x22 and self._depth > 0:
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
            elif c in b"}]":
                self._depth -= 1
                if self._depth <= 0:
                    out.append(bytes(buf[: i + 1]) if self._depth == 0 else None)
                    del buf[: i + 1]
                    self._depth, i = 0, -1
            elif self._depth == 0 and c not in b" \t\r\n":
                # a value that is not an object or array (a number, a string, junk): one
                # error, skipped to the next
                ends = [j for j in (buf.find(b"{", i), buf.find(b"[", i)) if j >= 0]
                out.append(None)
                del buf[: min(ends, default=len(buf))]
                i = -1
            i += 1
        self._scanned = len(buf)
        if len(buf) > MAX_MESSAGE:
            raise ValueError(f"a QMP message longer than {MAX_MESSAGE} bytes")
        return out


def _error(error_class: str, desc: str, ident: Any = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if ident is not None:
        reply["id"] = ident
    return reply


class MachineControl:
    """The `QmpTarget` for a running `Machine`: one command at a time, with QEMU's events.

    `shutdown_event(stop)` is the SHUTDOWN event's data for how the run ended.
    """

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.server: QmpServer | None = None
        self.quit_asked = False
        self._lock = threading.Lock()
        from kvmpy.migration.source import Parameters

        self.migration: Migration | None = None  # the last one started
        self.migration_parameters = Parameters()

    def _emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        if self.server is not None:
            self.server.emit(event, data)

    def status(self) -> str:
        if self.machine.stopped is not None:
            return "shutdown"
        return "paused" if self.machine.paused else "running"

    def stop(self) -> None:
        if self._migrating():
            raise QmpError("a migration is in progress: migrate_cancel it first (kvmpy "
                           "migrates running guests)")
        with self._lock:
            if self.machine.stopped is None and not self.machine.paused:
                self.machine.pause()
                self._emit("STOP")

    def cont(self) -> None:
        with self._lock:
            if self.machine.stopped is not None:
                raise QmpError("The guest has shut down; it cannot continue")
            if self.machine.paused:
                self.machine.resume()
                self._emit("RESUME")

    def powerdown(self) -> None:
        with self._lock:
            self._emit("POWERDOWN")
            if not self.machine.press_power_button():
                log.warning("system_powerdown: this guest has no power button (kvmpy gives "
                            "one to guests with ACPI); nothing happens")

    def quit(self) -> None:
        self.quit_asked = True
        self.machine.request_stop(Stop(StopKind.POWEROFF, "quit (QMP)"))

    def snapshot_save(self, path: str, incremental: bool = False) -> dict[str, Any]:
        from kvmpy.state.snapshot import take_snapshot

        with self._lock:
            running = self.machine.stopped is None and not self.machine.paused
            if running:
                self._emit("STOP")
            try:
                return take_snapshot(self.machine, path, incremental=incremental)
            finally:
                if running:
                    self._emit("RESUME")

    def stats(self) -> dict[str, Any]:
        return {"status": self.status(), **self.machine.stats()}

    # -- live migration (kvmpy.migration.source) --------------------------------------
    def migrate(self, uri: str) -> None:
        from kvmpy.migration.source import Migration
        from kvmpy.migration.wire import parse_address

        if self._migrating():
            raise QmpError("a migration is already in progress")
        address = parse_address(uri)
        migration = Migration(self.machine, address, self.migration_parameters, self,
                              self._migration_status)
        migration.start()
        self.migration = migration

    def migrate_cancel(self) -> None:
        if self.migration is not None:
            self.migration.cancel()

    def query_migrate(self) -> dict[str, Any]:
        return {} if self.migration is None else self.migration.info()

    def migrate_set_parameters(self, arguments: dict[str, Any]) -> None:
        self.migration_parameters.set(arguments)

    def query_migrate_parameters(self) -> dict[str, Any]:
        return self.migration_parameters.query()

    def _migrating(self) -> bool:
        return self.migration is not None and not self.migration.done.is_set()

    def hold(self) -> bool:
        """The migration's last round begins: the guest paused, QMP's stop and cont held
        off until `let_go` (a Holder, kvmpy.migration.source)."""
        self._lock.acquire()
        try:
            running = self.machine.stopped is None and not self.machine.paused
            if running:
                self.machine.pause()
                self._emit("STOP")
            return running
        except BaseException:
            self._lock.release()
            raise

    def let_go(self, resume: bool) -> None:
        try:
            if resume:
                self.machine.resume()
                self._emit("RESUME")
        finally:
            self._lock.release()

    def _migration_status(self, status: str, info: dict[str, Any]) -> None:
        self._emit("MIGRATION", {"status": status})

    def shutdown_event(self, stop: Stop) -> dict[str, Any]:
        if self.quit_asked:
            return {"guest": False, "reason": "host-qmp-quit"}
        reason = {StopKind.POWEROFF: "guest-shutdown", StopKind.DEBUG_EXIT: "guest-shutdown",
                  StopKind.REBOOT: "guest-reset", StopKind.FAULT: "guest-panic",
                  StopKind.HALTED: "guest-panic", StopKind.ERROR: "host-error",
                  StopKind.MIGRATED: "host-migrated",
                  StopKind.SIGINT: "host-signal", StopKind.SIGTERM: "host-signal"}[stop.kind]
        return {"guest": reason.startswith("guest"), "reason": reason}
