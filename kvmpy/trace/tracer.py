"""`--trace`: one line per VM exit, with the guest instruction that caused it.

    0.004512 vcpu0 IO out port=0x3f8 size=1 value=0x48 dev=serial0+0x0 | 0x10014: out dx, al
    0.004530 vcpu0 MMIO read addr=0xe0000000 size=4 value=0x7e57dev0 dev=testdev+0x0 | ...
    0.004700 vcpu0 HLT | 0x1001d: hlt

What it is: an observer of every `VcpuLoop` (kvmpy.exitloop.ExitObserver), given
to the loops as their outermost one. Around each exit it lets the real handler
run, then writes what the exit was (direction, port or address, size, the value
moved, which after an IN or an MMIO read is the value the device returned),
which device owns the address, and the instruction: it reads RIP and the
segment registers (two ioctls) and disassembles with capstone in the width the
vCPU is executing. Other exits are described before their handler runs (a fatal
one may end the run; a debugger may park the vCPU) and written after it.

Which instruction: KVM leaves RIP *at* the instruction for port/MMIO reads
(it finishes them on the next KVM_RUN) and, when it emulated a write, *after*
it. So for reads the instruction at RIP is shown; for writes the one at RIP
if it is the matching I/O instruction (hardware fast PIO), otherwise the one
that ends at RIP.

What it is not: free. It costs two ioctls and a disassembly per traced exit,
and is only ever given to the loops when asked for. A loop without a tracer
has no tracing code on its path at all.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

from kvmpy.errors import KvmpyError
from kvmpy.kvm.exits import (
    Debug,
    Hlt,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    SystemEvent,
    VcpuExit,
    reason_name,
    reason_of,
)
from kvmpy.trace import disasm, vmem
from kvmpy.trace.filter import TraceFilter

if TYPE_CHECKING:
    from kvmpy.exitloop import VcpuLoop
    from kvmpy.stop import Stop

MASK64 = (1 << 64) - 1


class _Pending(NamedTuple):
    """What `before` decided about a traced exit, for `after` to finish."""

    line: str  # the whole line (other exits), or "" for an access, described after
    device: tuple[str, int] | None  # an access's device label and offset


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
        self._pending: dict[int, _Pending] = {}  # per vCPU index: the exit being handled

    # -- the observer -----------------------------------------------------
    def before(self, loop: VcpuLoop, exit: VcpuExit) -> bool:
        index = loop.vcpu.index
        kind = type(exit)
        if kind is IoOut or kind is IoIn:
            port = exit.port  # type: ignore[union-attr]
            hit = loop.pio.lookup(port)
            if self.filter.matches(reason_of(exit), "pio", port, hit[2] if hit else None):
                self._pending[index] = _Pending("", (hit[2], hit[1]) if hit else None)
        elif kind is MmioWrite or kind is MmioRead:
            gpa = exit.gpa  # type: ignore[union-attr]
            hit = loop.mmio.lookup(gpa)
            if self.filter.matches(reason_of(exit), "mmio", gpa, hit[2] if hit else None):
                self._pending[index] = _Pending("", (hit[2], hit[1]) if hit else None)
        elif self.filter.matches(reason_of(exit)):
            # KVM skips a `hlt` before it exits: the instruction is the one before RIP
            is_hlt = kind is Hlt
            line = self._format(loop, _describe(exit), "hlt" if is_hlt else "any", None,
                                after=is_hlt)
            self._pending[index] = _Pending(line, None)
        return False

    def after(self, loop: VcpuLoop, exit: VcpuExit, stop: Stop | None) -> None:
        pending = self._pending.pop(loop.vcpu.index, None)
        if pending is None:
            return
        if pending.line:
            self._write(pending.line)
        elif isinstance(exit, IoOut | IoIn):
            out = isinstance(exit, IoOut)
            port, size, data = exit
            text = (f"IO {'out' if out else 'in'} port={port:#x} size={size}"
                    f"{_count(len(data) // size)} value={_value(bytes(data), size)} "
                    f"dev={_device(pending.device)}")
            self._emit(loop, text, "io-out" if out else "io", port, after=out, size=size)
        elif isinstance(exit, MmioWrite | MmioRead):
            write = isinstance(exit, MmioWrite)
            gpa, data = exit
            text = (f"MMIO {'write' if write else 'read'} addr={gpa:#x} size={len(data)} "
                    f"value={_value(bytes(data), len(data))} dev={_device(pending.device)}")
            self._emit(loop, text, "memory", None, after=write, size=len(data))

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


def _describe(exit: VcpuExit) -> str:
    """An exit other than an access, in words: its reason and what KVM said about it."""
    text = reason_name(reason_of(exit))
    if isinstance(exit, Debug):
        text += f" exception={exit.exception} pc={exit.pc:#x} dr6={exit.dr6:#x}"
    elif isinstance(exit, SystemEvent):
        text += f" type={exit.type}"
    return text


def _where(sregs: Any, ip: int) -> str:
    """An instruction address as the CPU sees it: CS:IP in real mode, else the RIP."""
    if not sregs.cr0 & 1:
        return f"{sregs.cs.selector:04x}:{ip & 0xFFFF:04x}"
    return f"{ip:#x}"


def _same_port(insn: disasm.Insn, regs: Any, port: int | None) -> bool:
    """Does this `in`/`out` at RIP address `port` (immediate or DX)?"""
    if port is None:
        return True
    target = insn.port
    if target is None:
        return False
    return (regs.rdx & 0xFFFF if target.kind == "reg" else target.imm) == port


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
