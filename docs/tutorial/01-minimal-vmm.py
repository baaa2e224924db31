"""Chapter 1's guest on a VMM of fifty lines: the raw KVM API, through kvmpy.kvm.

What it is: every step kvmpy's `Machine` takes to run a real-mode flat guest,
minus the buses and devices. It opens /dev/kvm, makes a VM with 1 MiB of RAM,
copies the guest in, makes one vCPU, points it at the guest, and runs it,
answering each I/O exit itself: a read of the UART's line status register
gets "transmitter empty", a write to the UART's data register is one byte of
output. It prints one line per exit and stops at the guest's `hlt`.

What it is not: kvmpy. Run the same guest with `python -m kvmpy run --flat
~/.cache/kvmpy/tutorial/01-real-mode.bin --trace` to see the real exit loop.

    .venv/bin/python docs/tutorial/01-minimal-vmm.py
"""

from __future__ import annotations

import sys

from kvmpy import layout
from kvmpy.cachedir import cache_dir
from kvmpy.kvm import Kvm
from kvmpy.kvm.exits import Hlt, IoIn, IoOut
from kvmpy.memory import GuestMemory

GUEST = cache_dir() / "tutorial" / "01-real-mode.bin"
COM1 = 0x3F8  # 16550 transmit holding register
COM1_LSR = 0x3FD  # line status register
LSR_THRE = 0x20  # transmitter holding register empty


def main() -> int:
    kvm = Kvm()  # open /dev/kvm; KVM_GET_API_VERSION must say 12
    vm = kvm.create_vm()  # KVM_CREATE_VM: a VM fd
    vm.set_tss_addr(layout.TSS_ADDR)  # KVM_SET_TSS_ADDR: Intel needs 3 pages outside RAM
    memory = GuestMemory.anonymous(1 * layout.MiB)  # an anonymous mmap in this process...
    vm.map_memory(memory)  # ...is the guest's RAM at gpa 0: KVM_SET_USER_MEMORY_REGION
    memory.write(layout.FLAT_LOAD, GUEST.read_bytes())  # the guest at gpa 0x10000
    vcpu = vm.create_vcpu(0)  # KVM_CREATE_VCPU, and mmap of its kvm_run page

    # Real mode: a segment's base is its selector * 16. KVM_GET_SREGS returns the
    # reset state (CS:IP = f000:fff0, the BIOS entry); point every segment at the guest.
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
        seg.selector, seg.base = layout.FLAT_LOAD >> 4, layout.FLAT_LOAD
    vcpu.set_sregs(sregs)  # KVM_SET_SREGS
    regs = vcpu.get_regs()
    regs.rip, regs.rsp, regs.rflags = 0, 0xFFF0, 0x2  # RFLAGS bit 1 always reads 1
    vcpu.set_regs(regs)  # KVM_SET_REGS

    output = bytearray()
    for n in range(1, 1000):
        exit = vcpu.run()  # KVM_RUN: the guest runs until it needs us, and says why
        match exit:
            case IoOut(port, size, data):  # the bytes the guest's `out` wrote
                if port == COM1:
                    output += data
                print(f"exit {n}: IO out port={port:#x} size={size} value={data[0]:#04x}")
            case IoIn(port, size, data):  # `data` is where the guest's `in` reads from
                value = LSR_THRE if port == COM1_LSR else 0xFF  # nothing else is plugged in
                data[0] = value  # the guest's `in` gets this when KVM_RUN resumes
                print(f"exit {n}: IO in  port={port:#x} size={size} -> {value:#04x}")
            case Hlt():
                print(f"exit {n}: HLT at rip={vcpu.get_regs().rip:#x}")
                break
            case _:
                print(f"exit {n}: {exit}: not handled here")
                return 1
    print(f"the guest wrote {bytes(output)!r} to COM1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
