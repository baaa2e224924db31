"""Guest instructions as text: capstone in the width the vCPU is executing.

What it is: which width (16, 32 or 64 bits) the CPU decodes in, read from
the segment cache and EFER exactly as the CPU does (Intel SDM Vol. 3A §5.2.1
and §2.2: in IA-32e mode CS.L selects 64-bit code; otherwise CS.D selects
32-bit; real mode is 16-bit), and a small wrapper around capstone that
decodes a few instructions at an address, or the one that ends at an
address (an instruction the CPU already executed, as an emulated `out`
leaves RIP after it).

What it is not: a reader of guest memory. Callers hand it bytes. capstone is
optional at run time: without it every instruction is shown as `.byte` hex.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from kvmpy.cpu.registers import CR0_PE, EFER_LMA

# Instructions that cause port I/O exits (SDM Vol. 1 §19.4).
IO_MNEMONICS = frozenset({"in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd"})
MAX_INSN = 15  # the longest x86 instruction (SDM Vol. 2 §2.1)


@dataclass(frozen=True)
class Insn:
    address: int
    raw: bytes
    mnemonic: str
    operands: str

    @property
    def text(self) -> str:
        return f"{self.mnemonic} {self.operands}".strip()

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def accesses_memory(self) -> bool:
        return "[" in self.operands

    @property
    def is_io(self) -> bool:
        return self.mnemonic.split()[-1] in IO_MNEMONICS

    @property
    def is_out(self) -> bool:
        return self.is_io and self.mnemonic.split()[-1].startswith("out")

    @property
    def access_size(self) -> int | None:
        """Bytes moved by the memory or port access, when the text says."""
        for word, size in (("qword ptr", 8), ("dword ptr", 4), ("xmmword ptr", 16),
                           ("byte ptr", 1), ("word ptr", 2)):
            if word in self.operands:
                return size
        if self.is_io:
            last = self.mnemonic.split()[-1]
            if last[-1] in "bwd" and last[:-1] in ("ins", "outs"):
                return {"b": 1, "w": 2, "d": 4}[last[-1]]
            regs = {r.strip() for r in self.operands.split(",")}
            for reg, size in (("al", 1), ("ax", 2), ("eax", 4)):
                if reg in regs:
                    return size
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


@lru_cache(maxsize=3)
def _capstone(bits: int) -> Any:
    try:
        import capstone
    except ImportError:
        return None
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    return capstone.Cs(capstone.CS_ARCH_X86, mode)


def available() -> bool:
    return _capstone(64) is not None


def disassemble(code: bytes, address: int, bits: int, count: int = 1) -> list[Insn]:
    """Up to `count` instructions from the start of `code`; stops at undecodable bytes.

    Without capstone the first byte is returned as a one-byte `.byte` pseudo-instruction
    so callers always have something to show.
    """
    md = _capstone(bits)
    if md is None:
        return [Insn(address, code[:1], ".byte", f"{code[0]:#04x}")] if code else []
    out = []
    for insn in md.disasm(code, address, count):
        out.append(Insn(insn.address, bytes(insn.bytes), insn.mnemonic, insn.op_str))
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
