/* Fails on purpose: in long mode with kvmpy's empty IDT, `ud2` raises #UD,
 * which cannot be delivered (#GP), which cannot be delivered (#DF), which
 * cannot be delivered: a triple fault, KVM_EXIT_SHUTDOWN. */
        .code64
        .text
        .globl _start
_start:
        mov $0x1234, %rax
        ud2
