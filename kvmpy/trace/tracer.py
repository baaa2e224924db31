"""`--trace`: one line per VM exit, with the guest instruction that caused it.

    0.004512 vcpu0 IO out port=0x3f8 size=1 value=0x48 dev=serial0+0x0 | 0x10014: out dx, al
    0.004530 vcpu0 MMIO read addr=0xe0000000 size=4 value=0x7e57dev0 dev=testdev+0x0 | ...
    0.004700 vcpu0 HLT | 0x1001d: hlt

What it is: `Tracer.install(loop)` wraps each handler in a `VcpuLoop`'s
handler table. The wrapper lets the real handler run, then reads what the
exit was (kvm_run's io/mmio payload: direction, port or address, size, the
value moved, which after an IN or an MMIO read is the value the device
returned), asks the bus which device owns the address, reads RIP and the
segment registers (two ioctls) and disassembles the instruction with
capstone in the width the vCPU is executing.

Which instruction: KVM leaves RIP *at* the instruction for port/MMIO reads
(it finishes them on the next KVM_RUN) and, when it emulated a write, *after*
it. So for reads the instruction at RIP is shown; for writes the one at RIP
if it is the matching I/O instruction (hardware fast PIO), otherwise the one
that ends at RIP.

What it is not: free. It costs two ioctls and a disassembly per traced exit,
and is only ever installed when asked for. A loop without a tracer has no
tracing code on its path at all, not even an `if`.
"""

from __future__ import annotations

import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from kvmpy.errors import KvmpyError
from kvmpy.kvm.exits import IO_OUT, RUN_UNION, ExitReason
from kvmpy.trace import disasm, vmem
from kvmpy.trace.filter import TraceFilter
from kvmpy.trace.stats import reason_name

if TYPE_CHECKING:
    from kvmpy.exitloop import VcpuLoop

_IO = struct.Struct("<BBHIQ")  # kvm_run.io: direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # kvm_run.mmio: phys_addr, data[8], len, is_write
_DEBUG = struct.Struct("<IIQQQ")  # kvm_run.debug.arch: exception, pad, pc, dr6, dr7
_SYSTEM_EVENT = struct.Struct("<I")  # kvm_run.system_event.type
Handler = Callable[[], Any]
MASK64 = (1 << 64) - 1


class Tracer:
    """Writes trace lines for the exits `filter` lets through, from any number of vCPUs."""

    def __init__(self, filter: TraceFilter | None = None, out: TextIO | None = None,
                 *, instructions: bool = True) -> None:
        self.filter = filter or TraceFilter()
        self.out = out or sys.stderr
        self.instructions = instructions
        self.lines = 0
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    def install(self, loop: VcpuLoop) -> None:
        """Wrap every handler now in `loop.handlers` (install after everything else)."""
        for reason, handler in list(loop.handlers.items()):
            if reason == ExitReason.IO:
                loop.handlers[reason] = self._wrap_io(loop, handler)
            elif reason == ExitReason.MMIO:
                loop.handlers[reason] = self._wrap_mmio(loop, handler)
            else:
                loop.handlers[reason] = self._wrap_other(loop, int(reason), handler)

    # -- wrappers ---------------------------------------------------------
    def _wrap_io(self, loop: VcpuLoop, handler: Handler) -> Handler:
        page, matches = loop.vcpu.run_page, self.filter.matches
        labels: dict[int, tuple[str, int] | None] = {}

        def traced_io() -> Any:
            direction, size, port, count, offset = _IO.unpack_from(page, RUN_UNION)
            if port not in labels:
                hit = loop.pio.lookup(port)
                labels[port] = (hit[2], hit[1]) if hit else None
            dev = labels[port]
            if not matches(ExitReason.IO, "pio", port, dev[0] if dev else None):
                return handler()
            stop = handler()
            data = bytes(page[offset : offset + size * count])
            what = "out" if direction == IO_OUT else "in"
            text = (f"IO {what} port={port:#x} size={size}{_count(count)} "
                    f"value={_value(data, size)} dev={_device(dev)}")
            self._emit(loop, text, "io-out" if direction == IO_OUT else "io", port,
                       after=direction == IO_OUT, size=size)
            return stop

        return traced_io

    def _wrap_mmio(self, loop: VcpuLoop, handler: Handler) -> Handler:
        page, matches = loop.vcpu.run_page, self.filter.matches

        def traced_mmio() -> Any:
            gpa, _, length, is_write = _MMIO.unpack_from(page, RUN_UNION)
            hit = loop.mmio.lookup(gpa)
            dev = (hit[2], hit[1]) if hit else None
            if not matches(ExitReason.MMIO, "mmio", gpa, dev[0] if dev else None):
                return handler()
            stop = handler()
            data = _MMIO.unpack_from(page, RUN_UNION)[1][:length]  # a read's value lands here
            what = "write" if is_write else "read"
            text = (f"MMIO {what} addr={gpa:#x} size={length} value={_value(data, length)} "
                    f"dev={_device(dev)}")
            self._emit(loop, text, "memory", None, after=bool(is_write), size=length)
            return stop

        return traced_mmio

    def _wrap_other(self, loop: VcpuLoop, reason: int, handler: Handler) -> Handler:
        page = loop.vcpu.run_page
        if not self.filter.matches(reason):  # no address or device: decided once
            return handler
        name = reason_name(reason)

        def traced() -> Any:
            text = name
            if reason == ExitReason.DEBUG:
                exc, _, pc, dr6, _ = _DEBUG.unpack_from(page, RUN_UNION)
                text += f" exception={exc} pc={pc:#x} dr6={dr6:#x}"
            elif reason == ExitReason.SYSTEM_EVENT:
                text += f" type={_SYSTEM_EVENT.unpack_from(page, RUN_UNION)[0]}"
            # read state before the handler: a fatal handler may end the run
            # KVM skips a `hlt` before it exits: the instruction is the one before RIP
            kind = "hlt" if reason == ExitReason.HLT else "any"
            line = self._format(loop, text, kind, None, after=reason == ExitReason.HLT)
            stop = handler()
            self._write(line)
            return stop

        return traced

    # -- lines ------------------------------------------------------------
    def _emit(self, loop: VcpuLoop, text: str, kind: str, port: int | None,
              after: bool, size: int | None = None) -> None:
        self._write(self._format(loop, text, kind, port, after, size))

    def _write(self, line: str) -> None:
        with self._lock:
            self.out.write(line + "\n")
            self.out.flush()
            self.lines += 1

    def _format(self, loop: VcpuLoop, text: str, kind: str, port: int | None,
                after: bool, size: int | None = None) -> str:
        stamp = f"{time.perf_counter() - self._t0:.6f} vcpu{loop.vcpu.index} {text}"
        if not self.instructions:
            return stamp
        try:
            insn = self.instruction(loop, kind, port, after, size)
        except KvmpyError as e:
            return f"{stamp} | ({e})"
        return f"{stamp} | {insn}"

    def instruction(self, loop: VcpuLoop, kind: str = "any", port: int | None = None,
                    after: bool = False, size: int | None = None) -> str:
        """The instruction that caused the current exit of `loop`'s vCPU, as text.

        `kind` is what it must be ("io", "memory", a mnemonic, or "any"); `after`
        says RIP may already be past it (a write KVM emulated, a `hlt`); `size` is
        how many bytes the exit moved, to tell `out dx, eax` from `out dx, ax`.
        """
        vcpu = loop.vcpu
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        bits = disasm.code_bits(sregs)
        space = vmem.AddressSpace.from_sregs(sregs)
        rip = regs.rip
        linear = (sregs.cs.base + rip) & MASK64
        back = min(disasm.MAX_INSN, rip)
        before = vmem.read(loop.memory, space, linear - back, back) if back else b""
        if len(before) < back:
            before = b""
        here = vmem.read(loop.memory, space, linear, disasm.MAX_INSN)
        at = disasm.one(here, rip, bits) if here else None
        insn = at
        if after and kind != "any":
            if not (kind == "io-out" and at is not None and at.is_out
                    and _same_port(at, regs, port)):
                insn = disasm.ending_at(before, rip, bits, kind, size) or at
        if insn is None:
            where = _where(sregs, rip)
            return f"{where}: ({'not mapped' if not here else here[:4].hex(' ') + ' ?'})"
        return f"{_where(sregs, insn.address)}: {insn.text}"


def _where(sregs: Any, ip: int) -> str:
    """An instruction address as the CPU sees it: CS:IP in real mode, else the RIP."""
    if not sregs.cr0 & 1:
        return f"{sregs.cs.selector:04x}:{ip & 0xFFFF:04x}"
    return f"{ip:#x}"


def _same_port(insn: disasm.Insn, regs: Any, port: int | None) -> bool:
    """Does this `in`/`out` at RIP address `port` (immediate or DX)?"""
    if port is None:
        return True
    ops = insn.operands.replace(" ", "").split(",")
    target = ops[0] if insn.mnemonic.startswith("out") else ops[-1]
    if target == "dx":
        return regs.rdx & 0xFFFF == port
    try:
        return int(target, 0) == port
    except ValueError:
        return False


def _count(count: int) -> str:
    return f" count={count}" if count != 1 else ""


def _value(data: bytes, size: int) -> str:
    if len(data) == size and size <= 8:
        value = int.from_bytes(data, "little")
        char = chr(value) if size == 1 and 0x20 <= value < 0x7F else None
        return f"{value:#0{2 + 2 * size}x}" + (f" {char!r}" if char else "")
    return data.hex()


def _device(dev: tuple[str, int] | None) -> str:
    return f"{dev[0]}+{dev[1]:#x}" if dev else "(none)"


def open_output(path: str | None) -> TextIO:
    """stderr, or a line-buffered file for `--trace-file`."""
    if path is None:
        return sys.stderr
    try:
        return open(path, "w", buffering=1, encoding="utf-8")  # the caller closes it
    except OSError as e:
        raise KvmpyError(f"cannot write trace file {path}: {e.strerror}") from None
