/* User-mode (CPL3) guest for the fast-reset tests, started in long mode at CPL3.
 * Writes the 64-bit word in %r8 to the start of %rcx pages, the first at %rsi and
 * each %rdx bytes after the one before (kvmpy sets them), bumps a word of its own
 * data, fills the MMIO test device's scratch area, then sets every general register
 * and %xmm0-%xmm1 to junk and ends with status 0: everything a reset puts back. */
#include "testdev.inc"
        .set SCRATCH, 0x10
        .code64
        .text
        .globl _start
_start:
        mov $TESTDEV, %edi
1:      mov %r8, (%rsi)
        add %rdx, %rsi
        dec %rcx
        jnz 1b
        incq runs
        mov runs, %rax
        mov %eax, SCRATCH(%rdi)
        mov %r8, %rax
        mov %eax, SCRATCH+4(%rdi)
        shr $32, %rax
        mov %eax, SCRATCH+8(%rdi)
        mov $0x5c5c5c5c5c5c5c5c, %rax
        movq %rax, %xmm0
        pshufd $0, %xmm0, %xmm1
        mov %rax, %rbx
        mov %rax, %rbp
        mov %rax, %rsp
        mov %rax, %r9
        mov %rax, %r10
        mov %rax, %r11
        mov %rax, %r12
        mov %rax, %r13
        mov %rax, %r14
        mov %rax, %r15
        movl $0, EXIT(%rdi)
7:      jmp 7b
        .data
        .balign 8
runs:   .quad 0
