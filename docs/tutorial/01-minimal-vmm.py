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

import struct
import sys

from kvmpy import layout
from kvmpy.kvm import ExitReason, Kvm
from kvmpy.kvm.exits import IO_OUT, RUN_UNION
from kvmpy.lab.debian import cache_dir
from kvmpy.memory import GuestMemory

GUEST = cache_dir() / "tutorial" / "01-real-mode.bin"
COM1 = 0x3F8  # 16550 transmit holding register
COM1_LSR = 0x3FD  # line status register
LSR_THRE = 0x20  # transmitter holding register empty
# struct kvm_run's `io` member (<linux/kvm.h>): the bytes moved are in the
# kvm_run page itself, at `data_offset`
KVM_RUN_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset


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

    page, output = vcpu.run_page, bytearray()
    for n in range(1, 1000):
        reason = vcpu.run()  # KVM_RUN: the guest runs until it needs us
        if reason == ExitReason.IO:
            direction, size, port, _count, offset = KVM_RUN_IO.unpack_from(page, RUN_UNION)
            if direction == IO_OUT:
                value = page[offset]
                if port == COM1:
                    output.append(value)
                print(f"exit {n}: IO out port={port:#x} size={size} value={value:#04x}")
            else:
                value = LSR_THRE if port == COM1_LSR else 0xFF  # nothing else is plugged in
                page[offset] = value  # the guest's `in` gets this when KVM_RUN resumes
                print(f"exit {n}: IO in  port={port:#x} size={size} -> {value:#04x}")
        elif reason == ExitReason.HLT:
            print(f"exit {n}: HLT at rip={vcpu.get_regs().rip:#x}")
            break
        else:
            print(f"exit {n}: {ExitReason(reason).name}: not handled here")
            return 1
    print(f"the guest wrote {bytes(output)!r} to COM1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
