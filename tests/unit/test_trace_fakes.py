"""A vCPU without KVM, for the trace, diagnostics and gdb unit tests (and its own checks).

`FakeVcpu` holds real cffi `kvm_regs`/`kvm_sregs`/`kvm_fpu` structs (the
shim module loads without /dev/kvm) and a kvm_run page in a bytearray, so
kvmpy's own mode setup (`kvmpy.cpu.modes`) and the real `VcpuLoop` work on
it unchanged. Tests hand typed exits to `VcpuLoop.handle`, or put an exit in the
run page with `set_exit` (by hand-written layouts: a check of kvmpy's decoder).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from kvmpy.bus import Bus
from kvmpy.cpu.modes import setup_long, setup_protected, setup_real
from kvmpy.exitloop import ExitObserver, VcpuLoop
from kvmpy.kvm.exits import (
    RUN_EXIT_REASON,
    RUN_IMMEDIATE_EXIT,
    RUN_UNION,
    ExitReason,
    IoOut,
    VcpuExit,
    decode,
)
from kvmpy.kvm.ioctl import ffi
from kvmpy.memory import GuestMemory

CODE = 0x10000
STACK = 0x9F000


class FakeVcpu:
    def __init__(self, index: int = 0) -> None:
        self.index = index
        self.page = bytearray(4096)
        self.run_page = memoryview(self.page)
        self._regs = ffi.new("struct kvm_regs *")
        self._sregs = ffi.new("struct kvm_sregs *")
        self._fpu = ffi.new("struct kvm_fpu *")
        self.guest_debug: list[tuple[int, list[int]]] = []
        self.ioctls = 0

    def get_regs(self) -> Any:
        self.ioctls += 1
        return ffi.new("struct kvm_regs *", self._regs[0])

    def set_regs(self, regs: Any) -> None:
        self._regs[0] = regs[0]

    def get_sregs(self) -> Any:
        self.ioctls += 1
        return ffi.new("struct kvm_sregs *", self._sregs[0])

    def set_sregs(self, sregs: Any) -> None:
        self._sregs[0] = sregs[0]

    def get_fpu(self) -> Any:
        return ffi.new("struct kvm_fpu *", self._fpu[0])

    def set_fpu(self, fpu: Any) -> None:
        self._fpu[0] = fpu[0]

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        self.guest_debug.append((control, list(debugreg or [])))

    def set_immediate_exit(self, value: bool) -> None:
        self.page[RUN_IMMEDIATE_EXIT] = int(value)

    def run(self) -> VcpuExit:
        """KVM_RUN as far as the page goes: the exit `set_exit` put there."""
        return decode(self.run_page)

    def set_exit(self, reason: int, fmt: str = "", *values: Any) -> None:
        struct.pack_into("<I", self.page, RUN_EXIT_REASON, reason)
        if fmt:
            struct.pack_into(fmt, self.page, RUN_UNION, *values)

    def set_rip(self, rip: int, **gprs: int) -> None:
        regs = self.get_regs()
        regs.rip = rip
        for name, value in gprs.items():
            setattr(regs, name, value)
        self.set_regs(regs)


def fake_vcpu(mode: str = "long", code: bytes = b"\xf4", mem_size: int = 1 << 20,
              index: int = 0) -> tuple[FakeVcpu, GuestMemory]:
    """A fake vCPU set up by kvmpy's own mode code, with `code` at CODE in its memory."""
    memory = GuestMemory.from_buffer(bytearray(mem_size))
    memory.write(CODE, code)
    vcpu = FakeVcpu(index)
    if mode == "long":
        setup_long(vcpu, memory, CODE, STACK)
    elif mode == "protected":
        setup_protected(vcpu, memory, CODE, STACK)
    else:
        setup_real(vcpu, CODE)
    return vcpu, memory


def machine(mode: str = "long", code: bytes = b"\xf4", mem_size: int = 1 << 20,
            index: int = 0, observers: Sequence[ExitObserver] = (),
            ) -> tuple[FakeVcpu, GuestMemory, VcpuLoop]:
    """`fake_vcpu`, and a real VcpuLoop for it with empty buses."""
    vcpu, memory = fake_vcpu(mode, code, mem_size, index)
    loop = VcpuLoop(vcpu, memory, Bus("pio"), Bus("mmio"),  # type: ignore[arg-type]
                    observers=observers)
    return vcpu, memory, loop


def test_fake_vcpu_holds_kvmpys_long_mode_state() -> None:
    vcpu, _, _ = machine("long")
    sregs = vcpu.get_sregs()
    assert sregs.cs.l == 1 and sregs.efer & (1 << 10) and sregs.cr0 & (1 << 31)
    assert vcpu.get_regs().rip == CODE


def test_fake_vcpu_returns_copies_like_kvm() -> None:
    vcpu, _, _ = machine("real")
    regs = vcpu.get_regs()
    regs.rax = 7
    assert vcpu.get_regs().rax == 0
    vcpu.set_regs(regs)
    assert vcpu.get_regs().rax == 7


def test_set_exit_writes_reason_and_payload() -> None:
    vcpu = FakeVcpu()
    vcpu.set_exit(ExitReason.IO, "<BBHIQ", 1, 1, 0x3F8, 1, 0x100)
    vcpu.page[0x100] = 0x41
    assert struct.unpack_from("<I", vcpu.page, RUN_EXIT_REASON)[0] == ExitReason.IO
    assert struct.unpack_from("<BBH", vcpu.page, RUN_UNION) == (1, 1, 0x3F8)
    assert vcpu.run() == IoOut(0x3F8, 1, b"A")
