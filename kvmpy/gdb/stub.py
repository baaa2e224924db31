"""`kvmpy run --gdb PORT`: a gdb remote-protocol server for the running VM.

    kvmpy run --flat guest.bin --mode long --gdb 1234 &
    gdb -ex 'target remote :1234' guest.elf

What it is: one server thread that accepts gdb on a TCP port (127.0.0.1 by
default: the stub can read and write all guest memory), and answers gdb's
packets (GDB manual, Appendix E "Packets"): registers (g/G/p/P, with a
target description so gdb knows the x86-64 layout and the control
registers), memory (m/M/X), breakpoints and watchpoints (Z1/Z2/Z4 in the
debug registers, see debugregs.py; Z0 as int3, or there too on PVM),
continue and single-step (c/s/vCont, KVM_GUESTDBG_SINGLESTEP), Ctrl-C,
threads (one per vCPU: qfThreadInfo, Hg, Hc, `thread:` in stop replies),
detach and kill.

Addresses: gdb's addresses are *linear* addresses (segment base + offset;
in 64-bit mode, virtual addresses). With paging on they are translated
through the page tables of the vCPU gdb has selected (Hg), by walking them
in guest memory (kvmpy.trace.vmem); with paging off they are physical.
Hardware breakpoints (and, on PVM, software ones) match linear addresses in
the debug registers, so they work on kernel addresses before the kernel has
mapped them. With hardware virtualization software breakpoints are int3
patched into guest memory while the vCPUs run (swbreak.py).

The VM is in all-stop mode: when one vCPU stops (breakpoint, step, Ctrl-C)
every vCPU is stopped, and gdb is told which one stopped first. The vCPUs
are stopped at their first instruction until gdb connects and continues.

What it is not: non-stop mode, int3 software breakpoints on PVM (see
debugregs.py for why), tracepoints, or a way to inject signals.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from kvmpy.errors import ConfigError, KvmpyError
from kvmpy.kvm.detect import KvmKind, kvm_kind
from kvmpy.stop import Stop, StopKind
from kvmpy.trace import vmem
from kvmpy.trace.disasm import mode_name

from . import registers
from .control import SIGINT, SIGTRAP, DebugControl, NotStopped, StopEvent
from .debugregs import HwPoint, NoSlot
from .protocol import PacketReader, frame, hex_to_bytes, parse_hex

if TYPE_CHECKING:
    from kvmpy.exitloop import ExitObserver
    from kvmpy.kvm.vcpu import Vcpu
    from kvmpy.memory import GuestMemory

PACKET_SIZE = 0x4000
MAX_MEMORY_READ = (PACKET_SIZE - 8) // 2
Z_KINDS = {0: "sw", 1: "hw", 2: "write", 4: "access"}  # Z3 (read) has no x86 equivalent


@dataclass(frozen=True)
class GdbConfig:
    port: int
    host: str = "127.0.0.1"

    @classmethod
    def parse(cls, text: str) -> GdbConfig:
        """`PORT` or `HOST:PORT` (port 0 picks a free port, announced on stderr)."""
        host, _, port = text.rpartition(":")
        try:
            number = int(port)
        except ValueError:
            raise ConfigError(f"--gdb: {text!r} is not PORT or HOST:PORT") from None
        if not 0 <= number <= 0xFFFF:
            raise ConfigError(f"--gdb: port {number} is out of range")
        return cls(number, host or "127.0.0.1")


class _Detach(Exception):
    """gdb detached or killed the VM: end the session."""


class GdbStub:
    """Serves one gdb at a time; the VM's vCPUs start stopped."""

    # one gdb session's state, set afresh by `_reset_session`
    no_ack: bool  # QStartNoAckMode
    running: bool  # the vCPUs were resumed and gdb waits for a stop reply
    ended_reported: bool  # gdb has been told how the VM ended
    current_g: int  # the vCPU `Hg` selected (registers, memory)
    current_c: int  # the vCPU `Hc` selected (continue, step)
    features: set[str]  # what gdb's qSupported offered
    last_reply: bytes  # sent again when gdb asks with `-`

    def __init__(self, vcpus: Sequence[Vcpu], memory: GuestMemory, config: GdbConfig, *,
                 irqchip: bool, request_stop: Callable[[Stop], None],
                 stopped: Callable[[], Stop | None], log: TextIO | None = None) -> None:
        self.memory = memory
        self.request_stop = request_stop
        self.log = log or sys.stderr
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # Z0: int3 with hardware virtualization (swbreak.py); the debug registers on PVM,
        # whose emulator cannot run int3 (debugregs.py)
        self.control = DebugControl(vcpus, memory, irqchip=irqchip, stopped=stopped,
                                    on_change=self._wake,
                                    software_breakpoints=kvm_kind() is KvmKind.HARDWARE)
        try:
            self.listener = socket.create_server((config.host, config.port), reuse_port=False)
        except OSError as e:
            raise ConfigError(f"--gdb: cannot listen on {config.host}:{config.port}: "
                              f"{e.strerror}") from None
        self.host, self.port = config.host, self.listener.getsockname()[1]
        # PVM emulates CPL0 code, and its emulator ignores data breakpoints (measured):
        # there, watchpoints are left to gdb, which single-steps and compares
        self.data_breakpoints = kvm_kind() is not KvmKind.PVM
        # the register layout gdb is told about, fixed for the VM's life: i386 for a guest
        # that starts in real mode (so that gdb may `set architecture i8086`), x86-64 for
        # the rest, kernels entered in 32-bit mode included. Read before the vCPU runs.
        real_mode = not vcpus[0].get_sregs().cr0 & 1
        self.layout = registers.I386 if real_mode else registers.X86_64
        self.control.stop_at_start()
        self._closing = False
        self._conn: socket.socket | None = None
        self._reset_session()
        self.thread = threading.Thread(target=self._serve, name="gdb", daemon=True)
        self.thread.start()
        self._say(f"gdb stub listening on {self.host}:{self.port}; the vCPUs wait at their "
                  "first instruction until gdb continues")
        if real_mode:
            self._say("gdb: the guest starts in real mode, described as i386 with $pc = "
                      "CS.base + IP; in gdb, `set architecture i8086` before `target remote`")

    def observer(self, index: int) -> ExitObserver:
        """What vCPU `index`'s exit loop calls around each of its exits."""
        return self.control.observer(index)

    # -- lifetime ---------------------------------------------------------------
    def close(self) -> None:
        """Tell a waiting gdb how the VM ended, then stop serving (VM teardown)."""
        self._closing = True
        self._wake()
        self.thread.join(timeout=3)
        self.control.close()
        self.listener.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _say(self, text: str) -> None:
        print(f"kvmpy: {text}", file=self.log, flush=True)

    def _reset_session(self) -> None:
        self.no_ack = False
        self.running = False
        self.ended_reported = False
        self.current_g = self.current_c = 0
        self.features = set()
        self.last_reply = b""

    # -- the server thread ----------------------------------------------------------
    def _serve(self) -> None:
        while not self._closing:
            ready, _, _ = select.select([self.listener.fileno(), self._wake_r], [], [], 0.5)
            if self._wake_r in ready:
                self._drain_wake()
            if self.listener.fileno() in ready and not self._closing:
                try:
                    conn, peer = self.listener.accept()
                except OSError:
                    return
                self._say(f"gdb connected from {peer[0]}:{peer[1]}")
                try:
                    self._session(conn)
                finally:
                    conn.close()
                    self._conn = None

    def _drain_wake(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except (BlockingIOError, OSError):
            pass

    def _session(self, conn: socket.socket) -> None:
        self._reset_session()
        self._conn = conn
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        control = self.control
        control.attached = True
        if not control.all_parked() and not control.vm_ended():
            control.request_stop()  # a second gdb attaches to a running VM: stop it
            control.wait_all_parked(5)
        first = control.first_event()
        if first is not None:
            self.current_g = self.current_c = first[0]
        reader = PacketReader()
        try:
            while True:
                ready, _, _ = select.select([conn.fileno(), self._wake_r], [], [], 0.1)
                if self._wake_r in ready:
                    self._drain_wake()
                if conn.fileno() in ready:
                    data = conn.recv(65536)
                    if not data:
                        self._say("gdb disconnected; the VM runs on")
                        break
                    for event in reader.feed(data):
                        self._on_event(conn, event.kind, event.payload)
                if self.running:
                    self._check_stopped(conn)
                if self._closing:
                    if control.vm_ended() and not self.ended_reported:
                        self._report_end(conn)
                    return
        except _Detach:
            return
        except OSError:
            self._say("gdb connection lost; the VM runs on")
        finally:
            if not control.vm_ended() and not self._closing:
                control.detach()

    def _on_event(self, conn: socket.socket, kind: str, payload: bytes) -> None:
        if kind == "interrupt":
            if self.running:
                self.control.request_stop()
            return
        if kind == "nak":
            if self.last_reply:
                conn.sendall(self.last_reply)
            return
        if kind == "bad":
            if not self.no_ack:
                conn.sendall(b"-")
            return
        if kind != "packet":
            return
        if not self.no_ack:
            conn.sendall(b"+")
        try:
            reply = self.dispatch(payload.decode("latin-1"))
        except NotStopped as e:
            reply = "E16"
            self._say(f"gdb: {e}")
        except _Detach:
            raise
        except Exception as e:  # a malformed packet or a refused ioctl: an error reply,
            reply = "E01"  # never the end of the session
            self._say(f"gdb: {payload[:40]!r} failed: {e}")
        if reply is not None:
            self._send(conn, reply)
        if payload == b"QStartNoAckMode":
            self.no_ack = True

    def _send(self, conn: socket.socket, payload: str | bytes) -> None:
        data = payload.encode("latin-1") if isinstance(payload, str) else payload
        self.last_reply = frame(data)
        conn.sendall(self.last_reply)

    def _check_stopped(self, conn: socket.socket) -> None:
        control = self.control
        if control.vm_ended():
            self._report_end(conn)
            return
        if not control.all_parked():
            return
        self.running = False
        control.unpatch()  # gdb reads the guest's own bytes while stopped
        first = control.first_event()
        if first is None:
            self._send(conn, self._stop_reply(self.current_g, StopEvent(SIGINT)))
            return
        index, event = first
        self.current_g = self.current_c = index
        if event.what:
            self._say(f"vCPU {index}: {event.what}")
        self._send(conn, self._stop_reply(index, event))

    def _report_end(self, conn: socket.socket) -> None:
        stop = self.control.stopped()
        status = stop.exit_status & 0xFF if stop is not None else 0
        self.running = False
        self.ended_reported = True
        self._send(conn, f"W{status:02x}")

    @staticmethod
    def _stop_reply(index: int, event: StopEvent) -> str:
        reply = f"T{event.signal:02x}thread:{index + 1:x};"
        if event.reason in ("swbreak", "hwbreak"):
            reply += f"{event.reason}:;"
        elif event.reason in ("watch", "awatch"):
            reply += f"{event.reason}:{event.addr:x};"
        return reply

    # -- packets -------------------------------------------------------------------
    def dispatch(self, packet: str) -> str | None:
        """The reply to one packet, or None when the vCPUs were resumed (reply at stop)."""
        if not packet:
            return ""
        head = packet[0]
        if packet.startswith("qSupported"):
            return self._q_supported(packet)
        if packet == "QStartNoAckMode":
            return "OK"
        if packet.startswith("qXfer:features:read:"):
            return self._q_xfer_features(packet)
        if packet in ("qfThreadInfo", "qsThreadInfo"):
            if packet == "qsThreadInfo":
                return "l"
            return "m" + ",".join(f"{d.index + 1:x}" for d in self.control.vcpus)
        if packet == "qC":
            return f"QC{self.current_g + 1:x}"
        if packet == "qAttached":
            return "1"
        if packet.startswith("qThreadExtraInfo,"):
            return self._thread_info(packet[len("qThreadExtraInfo,"):])
        if packet.startswith("qSymbol"):
            return "OK"
        if packet == "vCont?":
            return "vCont;c;C;s;S"
        if packet.startswith("vCont;"):
            return self._v_cont(packet[len("vCont;"):])
        if packet.startswith("vKill"):
            return self._kill(reply=True)
        if head == "?":
            first = self.control.first_event()
            if first is not None:
                return self._stop_reply(*first)
            return self._stop_reply(self.current_g, StopEvent(SIGTRAP))
        if head == "H":
            return self._set_thread(packet[1:2], packet[2:])
        if head == "T":
            return "OK" if self._thread_index(packet[1:]) is not None else "E01"
        if head == "g":
            return "".join(v.hex() for v in self._call(self._read_all))
        if head == "G":
            return self._write_all(hex_to_bytes(packet[1:]))
        if head == "p":
            return self._read_one(packet[1:])
        if head == "P":
            return self._write_one(packet[1:])
        if head == "m":
            return self._read_memory(packet[1:])
        if head in "MX":
            return self._write_memory(packet[1:], binary=head == "X")
        if head in "Zz":
            return self._breakpoint(packet[1:], insert=head == "Z")
        if head in "cCsS":
            return self._continue(packet)
        if head == "D":
            self.control.detach()
            self._say("gdb detached; the VM runs on")
            self._send_and_end("OK")
        if head == "k":
            return self._kill(reply=False)
        return ""

    def _send_and_end(self, reply: str) -> None:
        if self._conn is not None:
            self._send(self._conn, reply)
        raise _Detach()

    def _kill(self, reply: bool) -> str | None:
        self._say("gdb killed the VM")
        self.request_stop(Stop(StopKind.POWEROFF, "killed by gdb"))
        self.control.close()
        if reply:
            self._send_and_end("OK")
        raise _Detach()

    def _q_supported(self, packet: str) -> str:
        _, _, theirs = packet.partition(":")
        self.features = {f.rstrip("+") for f in theirs.split(";") if f.endswith("+")}
        ours = [f"PacketSize={PACKET_SIZE:x}", "qXfer:features:read+", "QStartNoAckMode+",
                "vContSupported+"]
        ours += [f"{f}+" for f in ("swbreak", "hwbreak") if f in self.features]
        return ";".join(ours)

    def _q_xfer_features(self, packet: str) -> str:
        annex, _, span = packet[len("qXfer:features:read:"):].partition(":")
        if annex != "target.xml":
            return "E00"
        try:
            offset, length = (parse_hex(x) for x in span.split(","))
        except ValueError:
            return "E01"
        xml = registers.target_xml(self.layout)
        chunk = xml[offset : offset + length]
        return ("l" if offset + length >= len(xml) else "m") + chunk

    # -- threads -------------------------------------------------------------------
    def _thread_index(self, text: str) -> int | None:
        try:
            tid = int(text, 16)
        except ValueError:
            return None
        return tid - 1 if 1 <= tid <= len(self.control.vcpus) else None

    def _set_thread(self, which: str, text: str) -> str:
        if text in ("0", "-1"):
            return "OK"  # "any" / "all": keep the current one
        index = self._thread_index(text)
        if index is None:
            return "E01"
        if which == "g":
            self.current_g = index
        else:
            self.current_c = index
        return "OK"

    def _thread_info(self, text: str) -> str:
        index = self._thread_index(text)
        if index is None:
            return "E01"

        def describe(vcpu: Any) -> str:
            return mode_name(vcpu.get_sregs())

        try:
            mode = self._call(describe, index)
        except NotStopped:
            mode = "running"
        return f"vCPU {index} ({mode})".encode().hex()

    # -- registers -----------------------------------------------------------------
    def _call(self, fn: Callable[[Any], Any], index: int | None = None) -> Any:
        return self.control.call(self.current_g if index is None else index, fn)

    def _read_all(self, vcpu: Any) -> list[bytes]:
        return registers.read_values(vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu(),
                                     self.layout)

    def _read_one(self, text: str) -> str:
        try:
            n = parse_hex(text)
        except ValueError:
            return "E01"
        if n >= len(self.layout):
            return "E45"
        return self._call(self._read_all)[n].hex()

    def _store(self, pieces: list[tuple[int, bytes]]) -> str:
        def store(vcpu: Any) -> None:
            regs, sregs, fpu = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu()
            changed = {registers.write_value(i, data, regs, sregs, fpu, self.layout)
                       for i, data in pieces}
            if "regs" in changed:
                vcpu.set_regs(regs)
            if "sregs" in changed:
                vcpu.set_sregs(sregs)
            if "fpu" in changed:
                vcpu.set_fpu(fpu)

        try:
            self._call(store)
        except (ValueError, KvmpyError) as e:
            self._say(f"gdb: register write refused: {e}")
            return "E22"
        return "OK"

    def _write_all(self, data: bytes) -> str:
        return self._store(list(enumerate(registers.split_packet(data, self.layout))))

    def _write_one(self, text: str) -> str:
        number, _, value = text.partition("=")
        try:
            n = parse_hex(number)
            data = hex_to_bytes(value)
        except ValueError:
            return "E01"
        if n >= len(self.layout):
            return "E45"
        return self._store([(n, data)])

    # -- memory ----------------------------------------------------------------------
    def _space(self, vcpu: Any) -> vmem.AddressSpace:
        return vmem.AddressSpace.from_sregs(vcpu.get_sregs())

    def _read_memory(self, text: str) -> str:
        try:
            addr, length = (parse_hex(x) for x in text.split(","))
        except ValueError:
            return "E01"
        length = min(length, MAX_MEMORY_READ)
        data = self._call(lambda v: vmem.read(self.memory, self._space(v), addr, length))
        return data.hex() if data or not length else "E14"

    def _write_memory(self, text: str, binary: bool) -> str:
        where, _, body = text.partition(":")
        try:
            addr, length = (parse_hex(x) for x in where.split(","))
            data = body.encode("latin-1") if binary else hex_to_bytes(body)
        except ValueError:
            return "E01"
        if len(data) != length:
            return "E01"
        done = self._call(lambda v: vmem.write(self.memory, self._space(v), addr, data))
        return "OK" if done == length else "E14"

    # -- breakpoints -------------------------------------------------------------------
    def _breakpoint(self, text: str, insert: bool) -> str:
        fields = text.split(";")[0].split(",")
        try:
            kind_no, addr, size = int(fields[0]), parse_hex(fields[1]), parse_hex(fields[2])
        except (ValueError, IndexError):
            return "E01"
        kind = Z_KINDS.get(kind_no)
        if kind is None:
            return ""  # not supported (x86 has no read-only watchpoints)
        if kind in ("write", "access") and not self.data_breakpoints:
            if insert:
                self._say("gdb: data breakpoints do not fire on PVM (CPL0 code is emulated); "
                          "in gdb, `set can-use-hw-watchpoints 0` makes software watchpoints")
            return ""
        sw = self.control.sw
        if kind == "sw" and sw is not None:
            if insert:
                sw.insert(addr)
            else:
                sw.remove(addr)
            return "OK"
        point = HwPoint(kind, addr, 1 if kind in ("sw", "hw") else size)
        if not insert:
            self.control.points.remove(point)
            return "OK"
        try:
            self.control.points.insert(point)
        except NoSlot as e:
            self._say(f"gdb: {e}")
            return "E28"
        except ValueError as e:
            self._say(f"gdb: {e}")
            return "E22"
        return "OK"

    # -- running -------------------------------------------------------------------------
    def _continue(self, packet: str) -> str | None:
        head, rest = packet[0], packet[1:]
        if head in "CS":
            rest = rest.partition(";")[2]  # the signal is not delivered to a VM
        if rest:
            try:
                addr = parse_hex(rest)
            except ValueError:
                return "E01"
            pc = self.layout.regs[self.layout.by_name["rip" if self.layout.wide else "eip"]]
            self._store([(self.layout.by_name[pc.name], addr.to_bytes(pc.size, "little"))])
        if head in "sS":
            actions = {self.current_c: "s"}
        else:
            actions = {d.index: "c" for d in self.control.vcpus}
        self._resume(actions)
        return None

    def _v_cont(self, text: str) -> str | None:
        actions: dict[int, str] = {}
        for item in text.split(";"):
            action, _, thread = item.partition(":")
            if not action:
                continue
            verb = {"c": "c", "C": "c", "s": "s", "S": "s"}.get(action[0])
            if verb is None:
                continue  # "t" (stop) is for non-stop mode
            if thread and thread != "-1":
                index = self._thread_index(thread)
                if index is None:
                    return "E01"
                actions.setdefault(index, verb)
            else:
                for d in self.control.vcpus:
                    actions.setdefault(d.index, verb)
        if not actions:
            return "E01"
        self._resume(actions)
        return None

    def _resume(self, actions: dict[int, str]) -> None:
        self.running = True
        self.control.resume(actions)
        return None
