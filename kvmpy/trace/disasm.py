"""Guest instructions as text: capstone in the width the vCPU is executing.

What it is: which width (16, 32 or 64 bits) the CPU decodes in, read from
the segment cache and EFER exactly as the CPU does (Intel SDM Vol. 3A §5.2.1
and §2.2: in IA-32e mode CS.L selects 64-bit code; otherwise CS.D selects
32-bit; real mode is 16-bit), and a small wrapper around capstone that
decodes a few instructions at an address, or the one that ends at an
address (an instruction the CPU already executed, as an emulated `out`
leaves RIP after it). An instruction's operands come as capstone's detail
mode decodes them (`Insn.ops`, `Operand`: a register by name, an immediate,
or a memory reference, with its size), so callers reason about what an
instruction touches without reading its text. Detail mode costs time, so an
instruction is decoded again with it only when its operands are asked for.

What it is not: a reader of guest memory. Callers hand it bytes. capstone is
optional at run time: without it every instruction is shown as `.byte` hex.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

from kvmpy.cpu.registers import CR0_PE, EFER_LMA

# Instructions that cause port I/O exits (SDM Vol. 1 §19.4).
IO_MNEMONICS = frozenset({"in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd"})
MAX_INSN = 15  # the longest x86 instruction (SDM Vol. 2 §2.1)


class Operand(NamedTuple):
    """One operand as capstone's detail mode decodes it."""

    kind: str  # "reg", "imm" or "mem"
    size: int  # bytes it holds or moves
    reg: str = ""  # a "reg" operand's register, as capstone names it ("eax", "cr0", "dx")
    imm: int = 0  # an "imm" operand's value


@dataclass(frozen=True)
class Insn:
    address: int
    raw: bytes
    mnemonic: str
    operands: str  # as text, for people
    bits: int = 64  # the width it was decoded in

    @property
    def ops(self) -> tuple[Operand, ...]:
        """The operands as data, for rules (capstone's detail mode, on first use)."""
        return _detail(self.raw, self.address, self.bits)

    @property
    def text(self) -> str:
        return f"{self.mnemonic} {self.operands}".strip()

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def accesses_memory(self) -> bool:
        return any(op.kind == "mem" for op in self.ops)

    @property
    def is_io(self) -> bool:
        return self.mnemonic.split()[-1] in IO_MNEMONICS

    @property
    def is_out(self) -> bool:
        return self.is_io and self.mnemonic.split()[-1].startswith("out")

    @property
    def port(self) -> Operand | None:
        """An `in`/`out`'s port: the immediate, or DX (`ins`/`outs` always use DX)."""
        if not self.is_io or not self.ops:
            return None
        return next((op for op in self.ops if op.kind == "imm" or op.reg == "dx"), None)

    @property
    def access_size(self) -> int | None:
        """Bytes moved by the memory or port access."""
        memory = next((op for op in self.ops if op.kind == "mem"), None)
        if memory is not None:
            return memory.size
        if self.is_io:  # the accumulator (al, ax, eax): the operand that is not the port
            return next((op.size for op in self.ops if op is not self.port), None)
        return None


def code_bits(sregs: Any) -> int:
    """16, 32 or 64: the default operand/address width of the code at CS:RIP."""
    if not sregs.cr0 & CR0_PE:
        return 16
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return 64
    return 32 if sregs.cs.db else 16


def mode_name(sregs: Any) -> str:
    """Real, protected, compatibility or long mode, in words."""
    if not sregs.cr0 & CR0_PE:
        return "real mode"
    if sregs.efer & EFER_LMA:
        return "64-bit long mode" if sregs.cs.l else "compatibility mode"
    return f"{code_bits(sregs)}-bit protected mode"


@lru_cache(maxsize=6)
def _capstone(bits: int, detail: bool = False) -> Any:
    try:  # imported on first use: capstone is start-up a run without a dying vCPU never pays
        import capstone
    except ImportError:
        return None
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    md.detail = detail
    return md


@lru_cache(maxsize=1)
def _kinds() -> dict[int, str]:
    from capstone import x86

    return {x86.X86_OP_REG: "reg", x86.X86_OP_IMM: "imm", x86.X86_OP_MEM: "mem"}


@lru_cache(maxsize=1024)
def _detail(raw: bytes, address: int, bits: int) -> tuple[Operand, ...]:
    """The operands of the instruction `raw` at `address`. Remembered: detail mode costs
    several times a plain decode, and a trace meets the same few instructions again."""
    md = _capstone(bits, detail=True)
    decoded = next(md.disasm(raw, address, 1), None) if md is not None else None
    return _operands(decoded) if decoded is not None else ()


def _operands(insn: Any) -> tuple[Operand, ...]:
    kinds = _kinds()
    return tuple(Operand(kind, op.size, insn.reg_name(op.reg) if kind == "reg" else "",
                         op.imm if kind == "imm" else 0)
                 for op in insn.operands if (kind := kinds.get(op.type)) is not None)


def available() -> bool:
    return _capstone(64) is not None


def disassemble(code: bytes, address: int, bits: int, count: int = 1) -> list[Insn]:
    """Up to `count` instructions from the start of `code`; stops at undecodable bytes.

    Without capstone the first byte is returned as a one-byte `.byte` pseudo-instruction
    so callers always have something to show.
    """
    md = _capstone(bits)
    if md is None:
        return [Insn(address, code[:1], ".byte", f"{code[0]:#04x}", bits)] if code else []
    out = []
    for insn in md.disasm(code, address, count):
        out.append(Insn(insn.address, bytes(insn.bytes), insn.mnemonic, insn.op_str, bits))
    return out


def one(code: bytes, address: int, bits: int) -> Insn | None:
    """The instruction at the start of `code`, or None if it does not decode."""
    found = disassemble(code, address, bits, 1)
    return found[0] if found and found[0].mnemonic != ".byte" else None


def ending_at(code: bytes, end: int, bits: int, want: str = "any",
              size: int | None = None) -> Insn | None:
    """The instruction that ends exactly at `end`, decoding `code` (the bytes before `end`).

    x86 cannot be decoded backwards with certainty; this tries every start up to
    15 bytes back and keeps the shortest match of the wanted kind ("io", "io-out",
    "memory", "any", or a mnemonic) that moves `size` bytes when that is known (so a REX or
    operand-size prefix is not cut off), which is right for the short instructions
    that cause exits.
    """
    if size is not None:
        sized = _ending_at(code, end, bits, want, size)
        if sized is not None:
            return sized
    return _ending_at(code, end, bits, want, None)


def _ending_at(code: bytes, end: int, bits: int, want: str, size: int | None) -> Insn | None:
    for length in range(1, min(MAX_INSN, len(code)) + 1):
        insn = one(code[-length:], end - length, bits)
        if insn is None or insn.size != length:
            continue
        if want == "io" and not insn.is_io:
            continue
        if want == "io-out" and not insn.is_out:
            continue
        if want == "memory" and not insn.accesses_memory:
            continue
        if want not in ("io", "io-out", "memory", "any") and insn.mnemonic != want:
            continue
        if size is not None and insn.access_size != size:
            continue
        return insn
    return None


def around(code: bytes, start: int, rip: int, bits: int, after: int = 4) -> list[Insn]:
    """Instructions before and from `rip`, where `code` holds the bytes from `start`.

    The instructions before RIP are found by decoding from each possible start
    and keeping the earliest one that lands exactly on RIP (the longest
    synchronised run); they are a best guess, marked by the caller.
    """
    before: list[Insn] = []
    for offset in range(0, max(0, rip - start)):
        run = disassemble(code[offset : rip - start], start + offset, bits, 64)
        if run and run[-1].address + run[-1].size == rip and run[0].mnemonic != ".byte":
            before = run
            break
    return before[-4:] + disassemble(code[rip - start :], rip, bits, after)
