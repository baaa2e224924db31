"""What KVM holds of a VM, read back as plain values and put into another VM.

What it is: `capture_vcpu` / `restore_vcpu` for one vCPU (registers, special
registers, XSAVE area, XCRs, debug registers, local APIC, MSRs, pending events,
MP state, CPUID, TSC frequency) and `capture_vm` / `restore_vm` /
`restore_clock` for the VM (in-kernel PIC and IO-APIC, PIT, kvmclock). Values are
those of `kvmpy.state.values`: register sets as objects of named integers (the
cffi struct's own field names), opaque kernel structs (LAPIC page, vCPU events,
irqchip, PIT) as base64 of the struct's bytes. Each value is checked as it is
read back, and an ioctl that refuses one becomes a one-line `SnapshotError`.

Order matters, and is the one Firecracker (vstate/vcpu.rs, arch/x86_64/vcpu.rs)
and QEMU (target/i386/kvm/kvm.c, kvm_arch_put_registers) learned:

  capture: MP state first (KVM_GET_MP_STATE may accept pending LAPIC events),
           then registers, sregs, XSAVE, XCRs, debug registers, LAPIC, CPUID,
           MSRs, and the vCPU events last (the other GETs can change them);
  restore: MP state, registers (KVM_SET_REGS drops a pending exception, which
           the events put back), sregs (they set the APIC base the LAPIC needs),
           XSAVE, XCRs, debug registers, LAPIC (the TSC-deadline MSR only takes
           with the LAPIC set up), MSRs with IA32_TSC first and
           IA32_TSC_DEADLINE last (the deadline is armed against the TSC), then
           the events.

CPUID is captured (as kvmpy set it: KVM_GET_CPUID2 answers with bits KVM derives
from registers at run time) but not put back here: KVM takes CPUID before a vCPU
first runs, so the machine sets it when it creates the vCPU (and refuses a
snapshot whose CPUID this host would not give). The VM's irqchip and PIT go back before
the vCPUs; kvmclock last, just before the vCPUs run again, so guest time
continues from the value it had (`restore_clock`).

What it is not: guest RAM (kvmpy.state.ram) or device state (each device's own
`state()`); and it never runs a vCPU: callers hold every vCPU out of KVM_RUN.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvmpy.errors import KvmIoctlError, SnapshotError
from kvmpy.kvm.ioctl import ffi, lib
from kvmpy.kvm.vcpu import MAX_CPUID_ENTRIES
from kvmpy.log import get_logger
from kvmpy.state.values import U32, U64, StateReader, b64

if TYPE_CHECKING:
    from kvmpy.kvm.vcpu import Vcpu
    from kvmpy.kvm.vm import Vm

log = get_logger(__name__)

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
MAX_MSRS = 1024
# The TSC frequency may differ this much (parts per million) between two boots of
# the same host, from calibration alone (QEMU's and Firecracker's tolerance).
TSC_KHZ_TOLERANCE_PPM = 250
IRQCHIPS = {"pic_master": "KVM_IRQCHIP_PIC_MASTER", "pic_slave": "KVM_IRQCHIP_PIC_SLAVE",
            "ioapic": "KVM_IRQCHIP_IOAPIC"}


# -- cffi structs as values ------------------------------------------------------------------
def struct_value(cdata: Any) -> dict[str, Any]:
    """A struct's declared fields as an object: integers, lists, nested objects."""
    out: dict[str, Any] = {}
    for name, kind, _, _ in _fields(_struct_type(cdata)):
        value = getattr(cdata, name)
        if kind == "struct":
            out[name] = struct_value(value)
        elif kind == "array":  # (of integers: `_fields` says so)
            out[name] = list(value)
        else:
            out[name] = int(value)
    return out


def fill_struct(cdata: Any, reader: StateReader) -> None:
    """Set every declared field of a (zeroed) struct from `reader`, checking each."""
    for name, kind, length, top in _fields(_struct_type(cdata)):
        if kind == "struct":
            sub = reader.sub(name)
            fill_struct(getattr(cdata, name), sub)
            sub.done()
        elif kind == "array":
            getattr(cdata, name)[0:length] = reader.ints(name, length, 0, top, exact=length)
        else:
            setattr(cdata, name, reader.int(name, 0, top))
    reader.done()


_FIELDS: dict[Any, list[tuple[str, str, int, int]]] = {}


def _fields(ctype: Any) -> list[tuple[str, str, int, int]]:
    """(name, kind, array length, largest value) of each field of a struct type, found
    once per type (a migration's pause reads and fills a few hundred fields)."""
    fields = _FIELDS.get(ctype)
    if fields is None:
        fields = []
        for name, field in ctype.fields:
            t = field.type
            if t.kind == "struct":
                fields.append((name, "struct", 0, 0))
            elif t.kind == "array":
                fields.append((name, "array", t.length, _max(t.item)))
            else:
                fields.append((name, "primitive", 0, _max(t)))
        _FIELDS[ctype] = fields
    return fields


def _struct_type(cdata: Any) -> Any:
    """The struct type of a struct or of a pointer to one (what ffi.new returns)."""
    ctype = ffi.typeof(cdata)
    return ctype.item if ctype.kind == "pointer" else ctype


def _max(ctype: Any) -> int:
    if ctype.kind != "primitive":
        raise TypeError(f"{ctype.cname}: not a struct of integers")
    return (1 << 8 * ffi.sizeof(ctype)) - 1


def _struct_bytes(cdata: Any) -> str:
    return b64(ffi.buffer(cdata))


def _struct_from(ctype: str, reader: StateReader, key: str) -> Any:
    """The struct saved at `key`: an object of its fields (each checked), or its bytes
    in base64 (`capture_vcpu(compact=True)`)."""
    cdata = ffi.new(f"{ctype} *")
    if reader.is_str(key):
        size = ffi.sizeof(ctype)
        ffi.memmove(cdata, reader.bytes(key, size, exact=size), size)
    else:
        fill_struct(cdata, reader.sub(key))
    return cdata


def _put(where: str, what: str, fn: Callable[..., None], *args: Any) -> None:
    """An ioctl that sets saved state; KVM refusing it is the snapshot's fault."""
    try:
        fn(*args)
    except (KvmIoctlError, ValueError) as e:
        reason = e.strerror if isinstance(e, KvmIoctlError) else str(e)
        raise SnapshotError(f"snapshot state {where}.{what}: KVM refused it ({reason})") \
            from None


# -- a vCPU ------------------------------------------------------------------------------------
def capture_vcpu(vcpu: Vcpu, compact: bool = False) -> dict[str, Any]:
    """Everything KVM holds of `vcpu` (which must be out of KVM_RUN), in capture order.
    `compact`: the register structs (regs, sregs, debugregs) as their bytes in base64,
    not an object of their fields: a migration's pause, where reading and checking
    a few hundred fields one by one costs milliseconds under the lab's emulation
    (KVM checks what it is given all the same); snapshots keep them readable."""
    vm = vcpu.vm
    value = _struct_bytes if compact else struct_value
    state: dict[str, Any] = {"mp_state": vcpu.get_mp_state(), "regs": value(vcpu.get_regs())}
    if vm.kvm.check_extension("KVM_CAP_SREGS2"):
        state["sregs2"] = value(vcpu.get_sregs2())
    else:
        state["sregs"] = value(vcpu.get_sregs())
    state["xsave"] = b64(vcpu.get_xsave())
    xcrs = vcpu.get_xcrs()
    state["xcrs"] = [[xcrs.xcrs[i].xcr, xcrs.xcrs[i].value] for i in range(xcrs.nr_xcrs)]
    state["debugregs"] = value(vcpu.get_debugregs())
    state["lapic"] = b64(vcpu.get_lapic()) if vm.irqchip else None
    state["tsc_khz"] = _tsc_khz(vcpu)
    state["cpuid"] = [list(e) for e in (vcpu.cpuid or vcpu.get_cpuid2())]
    msrs = vm.msrs_to_save(vcpu)
    values = vcpu.get_msrs(msrs)
    state["msrs"] = [[index, values[index]] for index in msrs if index in values]
    state["events"] = b64(vcpu.get_vcpu_events())
    return state


def _tsc_khz(vcpu: Vcpu) -> int | None:
    if not vcpu.vm.kvm.check_extension("KVM_CAP_GET_TSC_KHZ"):
        return None
    try:
        return vcpu.get_tsc_khz()
    except KvmIoctlError:
        return None


def cpuid_of(state: object, where: str) -> list[tuple[int, ...]]:
    """The CPUID entries a saved vCPU had, checked (the machine sets them at creation)."""
    return _cpuid(StateReader(state, where))


def _cpuid(reader: StateReader) -> list[tuple[int, ...]]:
    return [tuple(_ints(e, 7, f"{reader.where}.cpuid[{i}]"))
            for i, e in enumerate(reader.list("cpuid", MAX_CPUID_ENTRIES))]


def restore_vcpu(vcpu: Vcpu, state: object, where: str) -> None:
    """Put a captured state into `vcpu` (created, CPUID set, never run since, or held
    out of KVM_RUN); `where` names it in errors ("vcpu0")."""
    prepare_vcpu(vcpu, state, where)()


def prepare_vcpu(vcpu: Vcpu, state: object, where: str,
                 since: int | None = None) -> Callable[[], None]:
    """Check a captured state and build the structs KVM takes; returns what puts them
    into `vcpu`, as often as asked (a fast reset, kvmpy.state.reset, puts the same
    state back many times: the checks and the MSRs KVM refuses are found once, and
    later puts set the MSRs in one ioctl). `since` (a live migration's): when the
    state was captured, the host's CLOCK_REALTIME in ns; the first put moves the
    guest's TSC on by the host time since then, as `restore_clock(advance=True)` moves
    kvmclock, so that the guest's timers keep to the host's time."""
    vm = vcpu.vm
    r = StateReader(state, where)
    # set when the vCPU was created; read here only to be checked: at once when they
    # are this vCPU's own (as a migration's are: its ends compared them first)
    own = [list(e) for e in vcpu.cpuid] if vcpu.cpuid else None
    saved = r.again().list("cpuid", MAX_CPUID_ENTRIES)
    if saved == own and all(type(v) is int for e in saved for v in e):
        r.list("cpuid", MAX_CPUID_ENTRIES)
    else:
        _cpuid(r)
    mp_state = r.int("mp_state", 0, U32)
    regs = _struct_from("struct kvm_regs", r, "regs")
    if r.has("sregs2"):
        if not vm.kvm.check_extension("KVM_CAP_SREGS2"):
            raise r.fail("sregs2", "this KVM has no KVM_CAP_SREGS2")
        sregs, set_sregs = _struct_from("struct kvm_sregs2", r, "sregs2"), vcpu.set_sregs2
    else:
        sregs, set_sregs = _struct_from("struct kvm_sregs", r, "sregs"), vcpu.set_sregs
    xsave = r.bytes("xsave", 1 << 20)
    if len(xsave) != vm.xsave_size:
        raise r.fail("xsave", f"{len(xsave)} bytes; this host's XSAVE area is "
                     f"{vm.xsave_size} (a snapshot from another CPU?)")
    xcrs = ffi.new("struct kvm_xcrs *")
    pairs = r.list("xcrs", len(xcrs.xcrs))
    xcrs.nr_xcrs = len(pairs)
    for i, pair in enumerate(pairs):
        xcrs.xcrs[i].xcr, xcrs.xcrs[i].value = _ints(pair, 2, f"{where}.xcrs[{i}]", (U32, U64))
    debugregs = _struct_from("struct kvm_debugregs", r, "debugregs")
    lapic_size = ffi.sizeof("struct kvm_lapic_state")
    lapic = r.bytes("lapic", lapic_size, exact=lapic_size) if vm.irqchip else None
    if not vm.irqchip and r.optional_int("lapic") is not None:
        raise r.fail("lapic", "a LAPIC for a VM without the in-kernel irqchip")
    tsc_khz = r.optional_int("tsc_khz", 1, U32)
    known = set(vm.msrs_to_save(vcpu))
    msrs = [tuple(_ints(pair, 2, f"{where}.msrs[{i}]", (U32, U64)))
            for i, pair in enumerate(r.list("msrs", MAX_MSRS))]
    for index, _ in msrs:
        if index not in known:
            raise r.fail("msrs", f"MSR {index:#x} is not one this KVM saves and restores")
    msrs.sort(key=lambda m: (m[0] != MSR_IA32_TSC, m[0] == MSR_IA32_TSC_DEADLINE))
    events_size = ffi.sizeof("struct kvm_vcpu_events")
    events = r.bytes("events", events_size, exact=events_size)
    r.done()
    set_accepted: Callable[[], None] | None = None  # the MSRs KVM took, once it has

    def put() -> None:
        nonlocal set_accepted
        _put(where, "mp_state", vcpu.set_mp_state, mp_state)
        _put(where, "regs", vcpu.set_regs, regs)
        _put(where, "sregs", set_sregs, sregs)
        _put(where, "xsave", vcpu.set_xsave, xsave)
        _put(where, "xcrs", vcpu.set_xcrs, xcrs)
        _put(where, "debugregs", vcpu.set_debugregs, debugregs)
        if lapic is not None:
            _put(where, "lapic", vcpu.set_lapic, lapic)
        if set_accepted is None:
            if tsc_khz is not None:
                _match_tsc_khz(vcpu, tsc_khz, where)
            khz = None if since is None else tsc_khz or _tsc_khz(vcpu)
            first = msrs if since is None or khz is None else _tsc_moved_on(msrs, khz, since)
            set_accepted = vcpu.msrs_setter(_set_msrs(vcpu, first, where))
        else:
            _put(where, "msrs", set_accepted)
        _put(where, "events", vcpu.set_vcpu_events, events)

    return put


def _tsc_moved_on(msrs: list[tuple[int, ...]], khz: int, since: int) -> list[tuple[int, ...]]:
    """`msrs` with IA32_TSC on by the cycles of the host time since `since` (ns)."""
    cycles = _ns_since(since) * khz // 1_000_000
    return [(index, (value + cycles) & U64) if index == MSR_IA32_TSC else (index, value)
            for index, value in msrs]


def _ns_since(realtime: int) -> int:
    """The host time since `realtime` (CLOCK_REALTIME, ns); never negative, should the
    host's clock have been set back."""
    return max(0, time.clock_gettime_ns(time.CLOCK_REALTIME) - realtime)


def _set_msrs(vcpu: Vcpu, msrs: list[tuple[int, ...]], where: str) -> list[tuple[int, int]]:
    """KVM_SET_MSRS of every MSR in order; returns those KVM took. KVM sets them in
    order and stops at the first it refuses, saying how many it set: the rest go
    again in one call after it (a few ioctls, not one per MSR: each costs a good part
    of a millisecond in the lab, inside a migration's pause). One that KVM refuses is
    skipped only when the vCPU already holds the saved value (MSR_KVM_ASYNC_PF_INT
    reads 0 but cannot be written without an in-kernel LAPIC); any other refusal is
    the snapshot's fault."""
    accepted: list[tuple[int, int]] = []
    rest = [(index, value) for index, value in msrs]
    while rest:
        done = vcpu.set_msrs_upto(rest)
        accepted += rest[:done]
        if done == len(rest):
            break
        index, value = rest[done]
        if vcpu.get_msrs([index]).get(index) != value:
            raise SnapshotError(f"snapshot state {where}.msrs: KVM refused MSR "
                                f"{index:#x} = {value:#x}")
        rest = rest[done + 1:]
    return accepted


def _ints(value: object, n: int, where: str, limits: tuple[int, ...] | None = None) -> list[int]:
    """A list of exactly `n` unsigned integers (each below its limit, U32 by default)."""
    limits = limits or (U32,) * n
    if not isinstance(value, list) or len(value) != n:
        raise SnapshotError(f"snapshot state {where}: expected a list of {n} integers")
    for v, hi in zip(value, limits, strict=True):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
            raise SnapshotError(f"snapshot state {where}: {v!r} is not an integer in 0..{hi:#x}")
    return list(value)


def _match_tsc_khz(vcpu: Vcpu, saved: int, where: str) -> None:
    """Keep the guest's TSC at the frequency it had: scale it if this host's differs
    (KVM_CAP_TSC_CONTROL), else go on with a warning (its timers run fast or slow)."""
    current = _tsc_khz(vcpu)
    if current is None or abs(current - saved) * 1_000_000 <= saved * TSC_KHZ_TOLERANCE_PPM:
        return
    if vcpu.vm.kvm.check_extension("KVM_CAP_TSC_CONTROL"):
        _put(where, "tsc_khz", vcpu.set_tsc_khz, saved)
    elif vcpu.index == 0:
        log.warning("the snapshot's TSC ran at %d kHz, this host's at %d kHz and KVM cannot "
                    "scale it: the guest's TSC-based timers run at another speed",
                    saved, current)


# -- the VM ---------------------------------------------------------------------------------------
def capture_clock(vm: Vm) -> dict[str, Any]:
    """kvmclock now: its nanoseconds, and the host's CLOCK_REALTIME with them: KVM's,
    where it says it (KVM_CLOCK_REALTIME, read with the clock in one step), else read
    here just after. TSC_STABLE and HOST_TSC describe this host's clock and are not
    kept; a restore moves the clock on by the time since `realtime` or not, as it
    chooses (`restore_clock`)."""
    clock = vm.get_clock()
    realtime = (int(clock.realtime) if clock.flags & lib.KVM_CLOCK_REALTIME else
                time.clock_gettime_ns(time.CLOCK_REALTIME))
    return {"ns": int(clock.clock), "realtime": realtime}


def capture_vm(vm: Vm, clock: dict[str, Any]) -> dict[str, Any]:
    """The VM-wide state KVM holds: kvmclock (`clock`, as `capture_clock` read it when the
    caller wants it read), and the in-kernel irqchip and PIT if any."""
    return {
        "clock": clock,
        "irqchip": {name: b64(vm.get_irqchip(getattr(lib, chip)))
                    for name, chip in IRQCHIPS.items()} if vm.irqchip else None,
        "pit": b64(vm.get_pit2()) if vm.pit else None,
    }


def restore_vm(vm: Vm, state: object, where: str = "vm") -> dict[str, Any]:
    """The PIT and irqchip, before any vCPU's state; returns the clock for
    `restore_clock`, to be put back last."""
    r = StateReader(state, where)
    clock = r.sub("clock")
    saved_clock = {"ns": clock.int("ns", 0, U64), "realtime": clock.optional_int("realtime")}
    clock.done()
    chips: dict[str, bytes] = {}
    if vm.irqchip:
        sub = r.sub("irqchip")
        size = ffi.sizeof("struct kvm_irqchip")
        for name, chip in IRQCHIPS.items():
            data = sub.bytes(name, size, exact=size)
            if int.from_bytes(data[:4], "little") != getattr(lib, chip):
                raise sub.fail(name, "its chip_id names another chip")
            chips[name] = data
        sub.done()
    elif r.optional_int("irqchip") is not None:
        raise r.fail("irqchip", "irqchip state for a VM without one")
    pit = None
    if vm.pit:
        size = ffi.sizeof("struct kvm_pit_state2")
        pit = r.bytes("pit", size, exact=size)
    elif r.optional_int("pit") is not None:
        raise r.fail("pit", "PIT state for a VM without one")
    r.done()
    if pit is not None:
        _put(where, "pit", vm.set_pit2, pit)
    for name, data in chips.items():
        _put(where, f"irqchip.{name}", vm.set_irqchip, data)
    return saved_clock


def restore_clock(vm: Vm, clock: dict[str, Any], *, advance: bool = False) -> None:
    """kvmclock back to its saved value, so guest time goes on from where it stopped.
    `advance` (a live migration) adds the host time that passed since it was read
    (KVM adds it, with KVM_CLOCK_REALTIME, where it can)."""
    ns, flags, realtime = clock["ns"], 0, 0
    if advance and clock["realtime"] is not None:
        if vm.kvm.check_extension("KVM_CAP_ADJUST_CLOCK") & lib.KVM_CLOCK_REALTIME:
            flags, realtime = lib.KVM_CLOCK_REALTIME, clock["realtime"]  # (KVM adds it)
        else:
            ns += _ns_since(clock["realtime"])
    _put("vm", "clock", vm.set_clock, ns & U64, flags, realtime)
