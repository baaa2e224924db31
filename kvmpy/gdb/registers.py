"""gdb's view of an x86 vCPU: the target description, and registers as bytes.

What it is: the register list gdb is told about (qXfer:features:read
target.xml) in gdb's own feature names, and the conversion between KVM's
kvm_regs / kvm_sregs / kvm_fpu and the little-endian byte strings of gdb's
`g`, `G`, `p` and `P` packets, in that list's order.

Features (GDB manual, "i386 Features"): org.gnu.gdb.i386.core (the GPRs,
rip, eflags, segment selectors and the x87 state), org.gnu.gdb.i386.sse
(xmm0-15, mxcsr), org.gnu.gdb.i386.segments (fs_base, gs_base), and
org.kvmpy.x86.sys (cr0, cr2, cr3, cr4, cr8, efer: what a kernel debugger
wants, shown by gdb as $cr3 and so on).

Two layouts. `X86_64` (architecture i386:x86-64) is what a 64-bit guest or a
kernel's vmlinux needs, and what protected-mode guests get too (as from QEMU:
their 32-bit registers read zero-extended, and gdb disassembles them as
64-bit code). `I386` (architecture i386: eax..edi, eip, xmm0-7) is for a
guest that is in real mode when gdb connects, so that `set architecture
i8086` is allowed and disassembles 16-bit code. The stub picks one per gdb
session; a guest that climbs to long mode while debugged keeps the 32-bit
view until gdb reconnects.

The program counter gdb sees is a linear address: outside 64-bit mode it is
CS.base + IP (see `read_values`), like every address the stub takes.

What it is not: a writer of segment descriptors. A selector written from gdb
changes the visible selector only (and, in real mode, the base = selector*16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
GPRS32 = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"]  # gdb's i386 order
SEGMENTS = ["cs", "ss", "ds", "es", "fs", "gs"]
X87_CONTROL = ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
SYSTEM = ["cr0", "cr2", "cr3", "cr4", "cr8", "efer"]
PC_NAMES = ("rip", "eip")


@dataclass(frozen=True)
class Reg:
    name: str
    bits: int
    type: str
    feature: str
    group: str = ""

    @property
    def size(self) -> int:
        return self.bits // 8

    @property
    def field(self) -> str:
        """The kvm_regs field behind a GPR name (eax -> rax)."""
        if self.name in GPRS32:
            return "r" + self.name[1:]
        return "rip" if self.name == "eip" else self.name


class Layout:
    """One register list and the target description that announces it."""

    def __init__(self, architecture: str, regs: list[Reg]) -> None:
        self.architecture = architecture
        self.regs = regs
        self.by_name = {r.name: i for i, r in enumerate(regs)}
        self.packet_bytes = sum(r.size for r in regs)
        self.wide = architecture == "i386:x86-64"

    def __len__(self) -> int:
        return len(self.regs)


def _layout(wide: bool) -> Layout:
    core, sse = "org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse"
    word = 64 if wide else 32
    names = GPRS if wide else GPRS32
    regs = [Reg(n, word, "data_ptr" if n[1:] in ("bp", "sp") else f"int{word}", core)
            for n in names]
    regs.append(Reg("rip" if wide else "eip", word, "code_ptr", core))
    regs.append(Reg("eflags", 32, "i386_eflags", core))
    regs += [Reg(n, 32, "int32", core) for n in SEGMENTS]
    regs += [Reg(f"st{i}", 80, "i387_ext", core) for i in range(8)]
    regs += [Reg(n, 32, "int", core, "float") for n in X87_CONTROL]
    regs += [Reg(f"xmm{i}", 128, "vec128", sse) for i in range(16 if wide else 8)]
    regs.append(Reg("mxcsr", 32, "i386_mxcsr", sse, "vector"))
    if wide:  # gdb 13 asserts on org.gnu.gdb.i386.segments in a 32-bit description
        regs += [Reg(n, 64, "int", "org.gnu.gdb.i386.segments") for n in ("fs_base", "gs_base")]
    regs += [Reg(n, 64 if n == "efer" or wide else 32, "int", "org.kvmpy.x86.sys", "system")
             for n in SYSTEM]
    return Layout("i386:x86-64" if wide else "i386", regs)


X86_64 = _layout(wide=True)
I386 = _layout(wide=False)
REGISTERS = X86_64.regs  # the default layout, as a plain list
BY_NAME = X86_64.by_name

_TYPES = {
    "org.gnu.gdb.i386.core": """
    <flags id="i386_eflags" size="4">
      <field name="CF" start="0" end="0"/><field name="" start="1" end="1"/>
      <field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/>
      <field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
      <field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/>
      <field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/>
      <field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
      <field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/>
      <field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/>
      <field name="ID" start="21" end="21"/>
    </flags>""",
    "org.gnu.gdb.i386.sse": """
    <vector id="v8bf16" type="bfloat16" count="8"/>
    <vector id="v4f" type="ieee_single" count="4"/>
    <vector id="v2d" type="ieee_double" count="2"/>
    <vector id="v16i8" type="int8" count="16"/>
    <vector id="v8i16" type="int16" count="8"/>
    <vector id="v4i32" type="int32" count="4"/>
    <vector id="v2i64" type="int64" count="2"/>
    <union id="vec128">
      <field name="v8_bfloat16" type="v8bf16"/><field name="v4_float" type="v4f"/>
      <field name="v2_double" type="v2d"/><field name="v16_int8" type="v16i8"/>
      <field name="v8_int16" type="v8i16"/><field name="v4_int32" type="v4i32"/>
      <field name="v2_int64" type="v2i64"/><field name="uint128" type="uint128"/>
    </union>
    <flags id="i386_mxcsr" size="4">
      <field name="IE" start="0" end="0"/><field name="DE" start="1" end="1"/>
      <field name="ZE" start="2" end="2"/><field name="OE" start="3" end="3"/>
      <field name="UE" start="4" end="4"/><field name="PE" start="5" end="5"/>
      <field name="DAZ" start="6" end="6"/><field name="IM" start="7" end="7"/>
      <field name="DM" start="8" end="8"/><field name="ZM" start="9" end="9"/>
      <field name="OM" start="10" end="10"/><field name="UM" start="11" end="11"/>
      <field name="PM" start="12" end="12"/><field name="FZ" start="15" end="15"/>
    </flags>""",
}


def target_xml(layout: Layout = X86_64) -> str:
    """The target description gdb reads with qXfer:features:read:target.xml."""
    parts = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
             '<target version="1.0">', f"  <architecture>{layout.architecture}</architecture>"]
    feature = None
    for num, reg in enumerate(layout.regs):
        if reg.feature != feature:
            if feature is not None:
                parts.append("  </feature>")
            feature = reg.feature
            parts.append(f'  <feature name="{feature}">{_TYPES.get(feature, "")}')
        group = f' group="{reg.group}"' if reg.group else ""
        parts.append(f'    <reg name="{reg.name}" bitsize="{reg.bits}" type="{reg.type}" '
                     f'regnum="{num}"{group}/>')
    parts += ["  </feature>", "</target>"]
    return "\n".join(parts) + "\n"


# -- KVM structs <-> values ------------------------------------------------------
def _code64(sregs: Any) -> bool:
    return bool(sregs.efer & (1 << 10) and sregs.cs.l)


def read_values(regs: Any, sregs: Any, fpu: Any, layout: Layout = X86_64) -> list[bytes]:
    """Every register in the layout's order, as its little-endian bytes.

    The program counter is the *linear* address CS.base + IP outside 64-bit mode,
    so that it matches breakpoint addresses and a flat guest's symbols (a real-mode
    guest at CS=0x1000, IP=0x16 shows $pc = 0x10016; $cs says 0x1000).
    """
    ints: dict[str, int] = {}
    ints["eflags"] = regs.rflags & 0xFFFFFFFF
    for n in SEGMENTS:
        ints[n] = getattr(sregs, n).selector
    ints["fctrl"], ints["fstat"] = fpu.fcw, fpu.fsw
    ints["ftag"] = _full_tag(fpu.ftwx)
    ints["fiseg"], ints["fioff"] = 0, fpu.last_ip & 0xFFFFFFFF
    ints["foseg"], ints["fooff"] = 0, fpu.last_dp & 0xFFFFFFFF
    ints["fop"] = fpu.last_opcode
    ints["mxcsr"] = fpu.mxcsr
    ints["fs_base"], ints["gs_base"] = sregs.fs.base, sregs.gs.base
    for n in SYSTEM:
        ints[n] = getattr(sregs, n)
    out = []
    for reg in layout.regs:
        if reg.name.startswith("st"):
            out.append(bytes(fpu.fpr[int(reg.name[2:])][0:10]))
            continue
        if reg.name.startswith("xmm"):
            out.append(bytes(fpu.xmm[int(reg.name[3:])][0:16]))
            continue
        if reg.name in PC_NAMES:
            value = regs.rip if _code64(sregs) else (sregs.cs.base + regs.rip) & 0xFFFFFFFF
        elif reg.name in ints:
            value = ints[reg.name]
        else:
            value = getattr(regs, reg.field)
        out.append((value & ((1 << reg.bits) - 1)).to_bytes(reg.size, "little"))
    return out


def write_value(index: int, data: bytes, regs: Any, sregs: Any, fpu: Any,
                layout: Layout = X86_64) -> str:
    """Store one register into the KVM structs; returns which struct changed."""
    reg = layout.regs[index]
    if len(data) != reg.size:
        raise ValueError(f"{reg.name} is {reg.size} bytes, got {len(data)}")
    name = reg.name
    value = int.from_bytes(data, "little")
    if name in PC_NAMES:
        regs.rip = value if _code64(sregs) else (value - sregs.cs.base) & 0xFFFFFFFF
        return "regs"
    if name in GPRS or name in GPRS32:
        setattr(regs, reg.field, value)
        return "regs"
    if name == "eflags":
        regs.rflags = (regs.rflags & ~0xFFFFFFFF) | value
        return "regs"
    if name in SEGMENTS:
        seg = getattr(sregs, name)
        if seg.selector != value & 0xFFFF:
            seg.selector = value & 0xFFFF
            if not sregs.cr0 & 1:  # real mode: the base follows the selector
                seg.base = (value & 0xFFFF) << 4
        return "sregs"
    if name in ("fs_base", "gs_base"):
        getattr(sregs, name[:2]).base = value
        return "sregs"
    if name in SYSTEM:
        setattr(sregs, name, value)
        return "sregs"
    if name.startswith("st"):
        i = int(name[2:])
        for j in range(10):
            fpu.fpr[i][j] = data[j]
        return "fpu"
    if name.startswith("xmm"):
        i = int(name[3:])
        for j in range(16):
            fpu.xmm[i][j] = data[j]
        return "fpu"
    if name == "ftag":
        fpu.ftwx = _abridged_tag(value)
    elif name == "fctrl":
        fpu.fcw = value
    elif name == "fstat":
        fpu.fsw = value
    elif name == "fop":
        fpu.last_opcode = value
    elif name == "fioff":
        fpu.last_ip = value
    elif name == "fooff":
        fpu.last_dp = value
    elif name == "mxcsr":
        fpu.mxcsr = value
    return "fpu"  # fiseg/foseg have no home in kvm_fpu: ignored


def _full_tag(abridged: int) -> int:
    """FXSAVE's one bit per register (1 = in use) to the x87 two bits (11 = empty)."""
    tag = 0
    for i in range(8):
        if not abridged >> i & 1:
            tag |= 3 << (2 * i)
    return tag


def _abridged_tag(full: int) -> int:
    return sum(1 << i for i in range(8) if (full >> (2 * i)) & 3 != 3)


def split_packet(data: bytes, layout: Layout = X86_64) -> list[bytes]:
    """A `G` packet's bytes into per-register pieces (a shorter packet sets fewer)."""
    out, offset = [], 0
    for reg in layout.regs:
        if offset + reg.size > len(data):
            break
        out.append(data[offset : offset + reg.size])
        offset += reg.size
    return out


PACKET_BYTES = X86_64.packet_bytes
