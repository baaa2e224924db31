/* Fails on purpose: jumps to 1 GiB, which kvmpy's page tables map but which
 * is not guest RAM (the guest has less). KVM cannot fetch the instruction
 * (an emulation failure, KVM_EXIT_INTERNAL_ERROR). kvmpy should say "RIP
 * points outside guest RAM". --mode long, with --mem below 1 GiB. */
        .code64
        .text
        .globl _start
_start:
        mov $0x40000000, %rax
        jmp *%rax
