/* Fails on purpose, differently by host: `int3` with kvmpy's empty IDT.
 * On PVM, CPL0 code runs in KVM's instruction emulator, which has no software
 * interrupts in long mode: KVM_EXIT_INTERNAL_ERROR (emulation). On hardware
 * virtualization #BP cannot be delivered: a triple fault. --mode long. */
        .code64
        .text
        .globl _start
_start:
        mov $0x1234, %eax
trap:   int3
        hlt
