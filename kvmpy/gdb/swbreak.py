"""gdb's software breakpoints (Z0) as `int3` patched into guest memory, for hardware KVM.

What it is: the list of breakpoint *linear* addresses gdb asked for, and the
bytes patched for them. With hardware virtualization (VMX/SVM) KVM intercepts
#BP for us with KVM_GUESTDBG_USE_SW_BP and reports it as KVM_EXIT_DEBUG with
exception 3 (Documentation/virt/kvm/api.rst, KVM_SET_GUEST_DEBUG); the guest
never sees it. Nested under QEMU TCG's SVM the debug registers do not fire
(measured in the lab), so there Z0 must be int3.

Patches live only while the vCPUs run: `patch` before they resume writes 0xCC
at the guest-physical address each breakpoint translates to *then*, and
`unpatch` when the VM stops puts the original bytes back, so gdb reading
memory (and disassembling) sees the guest's own code. An address that does not
translate yet (a kernel before it has mapped itself) is retried at each resume;
for the x86-64 Linux kernel image mapping (`__START_KERNEL_map`,
0xffffffff80000000 + physical, with phys_base 0 as an ELF vmlinux loaded at its
p_paddr has) the physical address is assumed, because the kernel builds that
mapping and reaches `start_kernel` without the VM stopping in between.

What it is not: used on PVM (its emulator cannot run int3 at CPL0: see
debugregs.py, which keeps Z0 there), or safe against a guest that moves its code
while breakpoints are patched (a byte the guest overwrote is left as the guest
wrote it).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from kvmpy.trace import vmem

if TYPE_CHECKING:
    from kvmpy.memory import GuestMemory

INT3 = 0xCC
IN_AL_DX = 0xEC  # `in al, dx`: the trap byte where int3 cannot be intercepted (see below)
BP_VECTOR = 3  # #BP, kvm_run.debug.arch.exception
# x86-64 Linux: the kernel image is mapped at __START_KERNEL_map + physical (1 GiB at most,
# KERNEL_IMAGE_SIZE), Documentation/arch/x86/x86_64/mm.rst
KERNEL_MAP = 0xFFFF_FFFF_8000_0000
KERNEL_MAP_END = 0xFFFF_FFFF_C000_0000


def int3_intercepted(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether KVM can intercept the guest's int3 on this CPU.

    Not under QEMU's TCG (the lab): its SVM checks the SWINT intercept for int3
    instead of the #BP exception intercept (target/i386/tcg/excp_helper.c,
    raise_interrupt2 with is_int set, QEMU 7.2), so KVM's #BP intercept never
    fires and the guest takes #BP itself (measured: a flat guest triple-faults, Linux
    halts in its early exception handler). There the trap is `in al, dx`: a port read
    KVM hands to userspace unless DX names an in-kernel device (PIC, PIT, ELCR).
    """
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            text = f.read(4096)
    except OSError:
        return True
    return "QEMU TCG CPU" not in text


class SoftBreakpoints:
    """Breakpoint addresses and the trap bytes currently patched for them."""

    def __init__(self, memory: GuestMemory, trap: int = INT3) -> None:
        self.memory = memory
        self.trap = trap
        self.addrs: set[int] = set()
        self.patched: dict[int, tuple[int, int]] = {}  # linear -> (gpa, original byte)
        self.lock = threading.Lock()  # the server thread and vCPU threads both patch

    @property
    def active(self) -> bool:
        return bool(self.addrs)

    def insert(self, addr: int) -> None:
        with self.lock:
            self.addrs.add(addr)

    def remove(self, addr: int) -> bool:
        with self.lock:
            found = addr in self.addrs
            self.addrs.discard(addr)
            self._unpatch_one(addr)
            return found

    def clear(self) -> None:
        with self.lock:
            self.addrs.clear()
            for addr in list(self.patched):
                self._unpatch_one(addr)

    def __contains__(self, addr: int) -> bool:
        return addr in self.addrs

    def physical(self, space: vmem.AddressSpace, addr: int) -> int | None:
        gpa = vmem.to_physical(self.memory, space, addr)
        if gpa is None and space.paging in ("none", "4-level") \
                and KERNEL_MAP <= addr < KERNEL_MAP_END:
            gpa = addr - KERNEL_MAP
        if gpa is None or not self.memory.contains(gpa, 1):
            return None
        return gpa

    def patch(self, space: vmem.AddressSpace, skip: frozenset[int] = frozenset()) -> None:
        """Write int3 at every breakpoint that translates, except those in `skip`."""
        with self.lock:
            for addr in self.addrs:
                if addr in self.patched or addr in skip:
                    continue
                gpa = self.physical(space, addr)
                if gpa is None:
                    continue  # not mapped yet: tried again at the next resume
                if any(g == gpa for g, _ in self.patched.values()):
                    continue  # two linear addresses, one byte: patched once
                original = self.memory.read_u8(gpa)
                self.memory.write_u8(gpa, self.trap)
                self.patched[addr] = (gpa, original)

    def unpatch(self) -> None:
        """Put every original byte back (the VM has stopped)."""
        with self.lock:
            for addr in list(self.patched):
                self._unpatch_one(addr)

    def _unpatch_one(self, addr: int) -> None:
        entry = self.patched.pop(addr, None)
        if entry is None:
            return
        gpa, original = entry
        if self.memory.read_u8(gpa) == self.trap:  # else the guest rewrote it: keep its byte
            self.memory.write_u8(gpa, original)
