"""Why KVM_RUN returned, as typed values: the one decoder of the vCPU's kvm_run page.

KVM_RUN leaves its answer in the vCPU's shared page (<linux/kvm.h>, struct
kvm_run): `exit_reason`, and the details in the member of an anonymous union
that the reason names (`io`, `mmio`, `fail_entry`, ...). `decode(page)` reads
both and returns one of the exit types below, so the rest of kvmpy matches on
what happened (`IoOut(port=0x3f8, size=1, data=b"A")`), never on raw numbers or
offsets. Learned from rust-vmm kvm-ioctls' `VcpuExit`.

The layout comes from the C compiler: csrc/kvm_shim.cdef declares struct
kvm_run, cffi checks it against the kernel header at build time, and `_member`
turns a union member's fields into one `struct.Struct` from cffi's offsets, so
decoding an exit is one `unpack_from` and nothing here repeats a layout by hand.

Exits that need an answer carry a window on the page to write it into:
`IoIn.data` and `MmioRead.data` are what the guest's `in` or MMIO load returns
when KVM_RUN is entered again.

What it is not: a handler. The exit loop (kvmpy.exitloop) decides what each
exit means for the VM.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, NamedTuple

from kvmpy.kvm.ioctl import ffi, lib


class ExitReason(enum.IntEnum):
    """KVM_EXIT_* (the ones x86 can return): the one place exit reasons get names."""

    UNKNOWN = lib.KVM_EXIT_UNKNOWN
    EXCEPTION = lib.KVM_EXIT_EXCEPTION
    IO = lib.KVM_EXIT_IO
    HYPERCALL = lib.KVM_EXIT_HYPERCALL
    DEBUG = lib.KVM_EXIT_DEBUG
    HLT = lib.KVM_EXIT_HLT
    MMIO = lib.KVM_EXIT_MMIO
    IRQ_WINDOW_OPEN = lib.KVM_EXIT_IRQ_WINDOW_OPEN
    SHUTDOWN = lib.KVM_EXIT_SHUTDOWN
    FAIL_ENTRY = lib.KVM_EXIT_FAIL_ENTRY
    INTR = lib.KVM_EXIT_INTR
    SET_TPR = lib.KVM_EXIT_SET_TPR
    TPR_ACCESS = lib.KVM_EXIT_TPR_ACCESS
    NMI = lib.KVM_EXIT_NMI
    INTERNAL_ERROR = lib.KVM_EXIT_INTERNAL_ERROR
    SYSTEM_EVENT = lib.KVM_EXIT_SYSTEM_EVENT
    IOAPIC_EOI = lib.KVM_EXIT_IOAPIC_EOI
    X86_RDMSR = lib.KVM_EXIT_X86_RDMSR
    X86_WRMSR = lib.KVM_EXIT_X86_WRMSR
    X86_BUS_LOCK = lib.KVM_EXIT_X86_BUS_LOCK
    NOTIFY = lib.KVM_EXIT_NOTIFY


def reason_name(reason: int) -> str:
    """"IO", "SHUTDOWN"...; the number itself for a reason kvmpy has no name for."""
    return _name(ExitReason, reason) or str(reason)


def _name(kind: type[enum.IntEnum], value: int) -> str | None:
    try:
        return kind(value).name
    except ValueError:
        return None


class Suberror(enum.IntEnum):
    """KVM_INTERNAL_ERROR_* (kvm_run.internal.suberror)."""

    EMULATION = lib.KVM_INTERNAL_ERROR_EMULATION
    SIMUL_EX = lib.KVM_INTERNAL_ERROR_SIMUL_EX
    DELIVERY_EV = lib.KVM_INTERNAL_ERROR_DELIVERY_EV
    UNEXPECTED_EXIT_REASON = lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON


def suberror_name(suberror: int) -> str:
    """"emulation", "simul ex"...; "suberror N" for one kvmpy has no name for."""
    name = _name(Suberror, suberror)
    return name.lower().replace("_", " ") if name else f"suberror {suberror}"


class SystemEventType(enum.IntEnum):
    """KVM_SYSTEM_EVENT_* (kvm_run.system_event.type)."""

    SHUTDOWN = lib.KVM_SYSTEM_EVENT_SHUTDOWN
    RESET = lib.KVM_SYSTEM_EVENT_RESET
    CRASH = lib.KVM_SYSTEM_EVENT_CRASH


# -- the exits ------------------------------------------------------------------
class IoIn(NamedTuple):
    """The guest reads `size` bytes from `port` (`count` times for `rep ins`): fill
    `data`, size * count bytes of the kvm_run page, before entering again."""

    port: int
    size: int
    data: memoryview


class IoOut(NamedTuple):
    """The guest wrote `data` to `port`, `size` bytes at a time (`rep outs`: several)."""

    port: int
    size: int
    data: bytes


class MmioRead(NamedTuple):
    """The guest loads len(data) bytes from `gpa`, which no RAM backs: fill `data`."""

    gpa: int
    data: memoryview


class MmioWrite(NamedTuple):
    """The guest stored `data` at `gpa`, which no RAM backs."""

    gpa: int
    data: bytes


class Hlt(NamedTuple):
    """The vCPU executed `hlt` (only without the in-kernel irqchip, which keeps it)."""

    interrupts: bool  # RFLAGS.IF as it halted (kvm_run.if_flag)


class Interrupted(NamedTuple):
    """KVM_RUN returned EINTR: a signal, or `immediate_exit`, got the vCPU out."""


class IrqWindowOpen(NamedTuple):
    """The guest can take an interrupt now (only when asked for one)."""


class Shutdown(NamedTuple):
    """A triple fault: the CPU could not deliver an exception and would reset."""


class FailEntry(NamedTuple):
    """The CPU refused to enter the guest with this vCPU state."""

    hardware_reason: int  # VMX exit reason (or SVM's -1)
    cpu: int  # the host CPU it happened on


class InternalError(NamedTuple):
    """KVM could not go on: an instruction its emulator cannot run, and the like."""

    suberror: int  # Suberror
    data: tuple[int, ...]


class SystemEvent(NamedTuple):
    """The guest asked for a shutdown, reset or crash through KVM (PSCI, Hyper-V...)."""

    type: int  # SystemEventType


class Debug(NamedTuple):
    """A breakpoint, watchpoint or single step that KVM_SET_GUEST_DEBUG asked for."""

    exception: int  # 1 (#DB) or 3 (#BP)
    pc: int  # linear address of the instruction
    dr6: int
    dr7: int


class GuestException(NamedTuple):
    """An exception KVM hands to userspace instead of delivering it."""

    exception: int
    error_code: int


class Unknown(NamedTuple):
    """KVM_EXIT_UNKNOWN: the hardware exited for a reason KVM does not know."""

    hardware_reason: int


class Unsupported(NamedTuple):
    """Any other exit reason: kvmpy decodes no payload for it."""

    reason: int


VcpuExit = (IoIn | IoOut | MmioRead | MmioWrite | Hlt | Interrupted | IrqWindowOpen | Shutdown
            | FailEntry | InternalError | SystemEvent | Debug | GuestException | Unknown
            | Unsupported)

INTERRUPTED = Interrupted()  # the exits without a payload, made once
IRQ_WINDOW_OPEN = IrqWindowOpen()
SHUTDOWN = Shutdown()
_HLT = (Hlt(False), Hlt(True))

_REASONS: dict[type, ExitReason] = {
    IoIn: ExitReason.IO, IoOut: ExitReason.IO, MmioRead: ExitReason.MMIO,
    MmioWrite: ExitReason.MMIO, Hlt: ExitReason.HLT, Interrupted: ExitReason.INTR,
    IrqWindowOpen: ExitReason.IRQ_WINDOW_OPEN, Shutdown: ExitReason.SHUTDOWN,
    FailEntry: ExitReason.FAIL_ENTRY, InternalError: ExitReason.INTERNAL_ERROR,
    SystemEvent: ExitReason.SYSTEM_EVENT, Debug: ExitReason.DEBUG,
    GuestException: ExitReason.EXCEPTION, Unknown: ExitReason.UNKNOWN,
}


def reason_of(exit: VcpuExit) -> int:
    """The KVM_EXIT_* number an exit came with."""
    if type(exit) is Unsupported:
        return exit.reason  # type: ignore[union-attr]
    return _REASONS[type(exit)]


# -- the layout, from cffi ------------------------------------------------------------
_RUN = ffi.typeof("struct kvm_run")
_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


def _fields(ctype: Any, names: list[str], base: int = 0) -> list[tuple[int, int, str]]:
    """(offset, size, struct code) of each named field of `ctype`; "a.b" reaches into a
    member struct. Arrays of bytes read as `bytes`, other arrays as that many numbers."""
    layout = dict(ctype.fields)
    out = []
    for name in names:
        head, _, rest = name.partition(".")
        field = layout[head]
        if rest:
            out += _fields(field.type, [rest], base + field.offset)
            continue
        t = field.type
        if t.kind == "array":
            item = ffi.sizeof(t.item)
            code = f"{t.length}s" if item == 1 else f"{t.length}{_CODES[item]}"
        else:
            code = _CODES[ffi.sizeof(t)]
        out.append((base + field.offset, ffi.sizeof(t), code))
    return out


def _struct(fields: list[tuple[int, int, str]], start: int = 0) -> struct.Struct:
    """A Struct reading `fields` (offset, size, code), unpacked from offset `start`."""
    fmt, at = "<", start
    for offset, size, code in fields:
        fmt += "x" * (offset - at) + code
        at = offset + size
    return struct.Struct(fmt)


def _member(member: str, *names: str) -> struct.Struct:
    """A Struct reading `names` of kvm_run's union member `member`, from its start."""
    return _struct(_fields(dict(_RUN.fields)[member].type, list(names)))


RUN_EXIT_REASON = ffi.offsetof("struct kvm_run", "exit_reason")
RUN_IF_FLAG = ffi.offsetof("struct kvm_run", "if_flag")
RUN_IMMEDIATE_EXIT = ffi.offsetof("struct kvm_run", "immediate_exit")
RUN_UNION = ffi.offsetof("struct kvm_run", "io")  # every union member starts here
# exit_reason and the io member in one unpack: the commonest exit costs one call
_HEAD = _struct(_fields(_RUN, ["exit_reason", "io.direction", "io.size", "io.port", "io.count",
                               "io.data_offset"]), RUN_EXIT_REASON)
_MMIO = _member("mmio", "phys_addr", "data", "len", "is_write")
_MMIO_DATA = RUN_UNION + dict(dict(_RUN.fields)["mmio"].type.fields)["data"].offset
_FAIL_ENTRY = _member("fail_entry", "hardware_entry_failure_reason", "cpu")
_EXCEPTION = _member("ex", "exception", "error_code")
_DEBUG = _member("debug", "arch.exception", "arch.pc", "arch.dr6", "arch.dr7")
_INTERNAL = _member("internal", "suberror", "ndata", "data")
_SYSTEM_EVENT = _member("system_event", "type")
_UNKNOWN = _member("hw", "hardware_exit_reason")
IO_OUT = lib.KVM_EXIT_IO_OUT


# -- the decoder -------------------------------------------------------------------------
_KVM_EXIT_IO = int(ExitReason.IO)
_KVM_EXIT_MMIO = int(ExitReason.MMIO)
_new = tuple.__new__  # what `IoOut(port, size, data)` does, without its Python frame


def _mmio(page: memoryview) -> VcpuExit:
    gpa, data, length, is_write = _MMIO.unpack_from(page, RUN_UNION)
    length = min(length, 8)
    if is_write:
        return _new(MmioWrite, (gpa, data[:length]))  # type: ignore[no-any-return]
    return _new(MmioRead, (gpa, page[_MMIO_DATA : _MMIO_DATA + length]))  # type: ignore[no-any-return]


def _internal(page: memoryview) -> VcpuExit:
    suberror, ndata, *data = _INTERNAL.unpack_from(page, RUN_UNION)
    return InternalError(suberror, tuple(data[:ndata]))


_DECODERS: dict[int, Any] = {
    ExitReason.MMIO: _mmio,
    ExitReason.HLT: lambda page: _HLT[page[RUN_IF_FLAG] & 1],
    ExitReason.IRQ_WINDOW_OPEN: lambda page: IRQ_WINDOW_OPEN,
    ExitReason.SHUTDOWN: lambda page: SHUTDOWN,
    ExitReason.FAIL_ENTRY: lambda page: FailEntry(*_FAIL_ENTRY.unpack_from(page, RUN_UNION)),
    ExitReason.INTERNAL_ERROR: _internal,
    ExitReason.SYSTEM_EVENT: lambda page: SystemEvent(*_SYSTEM_EVENT.unpack_from(page,
                                                                                 RUN_UNION)),
    ExitReason.DEBUG: lambda page: Debug(*_DEBUG.unpack_from(page, RUN_UNION)),
    ExitReason.EXCEPTION: lambda page: GuestException(*_EXCEPTION.unpack_from(page, RUN_UNION)),
    ExitReason.UNKNOWN: lambda page: Unknown(*_UNKNOWN.unpack_from(page, RUN_UNION)),
}


def decode(page: memoryview) -> VcpuExit:
    """The exit a kvm_run page holds (read it before the vCPU enters the guest again)."""
    reason, direction, size, port, count, offset = _HEAD.unpack_from(page, RUN_EXIT_REASON)
    if reason == _KVM_EXIT_IO:  # the commonest exit by far: decoded here, with no call
        data = page[offset : offset + size * count]
        if direction == IO_OUT:
            return _new(IoOut, (port, size, bytes(data)))  # type: ignore[no-any-return]
        return _new(IoIn, (port, size, data))  # type: ignore[no-any-return]
    if reason == _KVM_EXIT_MMIO:  # the next commonest
        return _mmio(page)
    decoder = _DECODERS.get(reason)
    return Unsupported(reason) if decoder is None else decoder(page)
