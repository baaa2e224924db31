/* User-mode (CPL3) counter for the snapshot tests, started in long mode at CPL3.
 * Prints "count XXXXXXXX\n" (hex) for 0, 1, 2... on the MMIO test device's
 * console, about a millisecond apart natively, and ends with status 0 once it
 * has printed the count in %rbp (kvmpy sets it; 0 means 0x800).
 * The count is kept three times, in %r12, in RAM and in %xmm0, and the three are
 * compared before each line: a restore that lost one of them (registers, guest
 * RAM, the XSAVE area) prints "MISMATCH" and ends the run with status 3. */
#include "testdev.inc"
        .set DELAY, 2000000
        .set DEFAULT_LIMIT, 0x800
        .code64
        .text
        .globl _start
_start:
        test %rbp, %rbp
        jnz 1f
        mov $DEFAULT_LIMIT, %ebp
1:      xor %r12, %r12
        movq %r12, %xmm0
        mov $1, %eax
        movq %rax, %xmm1
        mov $TESTDEV, %edi
next:   cmp count, %r12
        jne bad
        movq %xmm0, %rax
        cmp %rax, %r12
        jne bad
        mov $prefix, %rsi
        PUTS_MMIO
        mov %r12, %rbx
        PUTHEX_MMIO 8
        movb $'\n', CONSOLE(%rdi)
        cmp %rbp, %r12
        je done
        inc %r12
        incq count
        paddq %xmm1, %xmm0
        mov $DELAY, %rcx
6:      dec %rcx
        jnz 6b
        jmp next
done:   movl $0, EXIT(%rdi)
7:      jmp 7b
bad:    mov $mismatch, %rsi
        PUTS_MMIO
        movl $3, EXIT(%rdi)
        jmp 7b
        .data
        .balign 8
count:  .quad 0
prefix: .asciz "count "
mismatch: .asciz "MISMATCH\n"
