/* User-mode (CPL3) guest for the live-migration tests, started in long mode at CPL3:
 * it keeps dirtying RAM and counting while it is moved to another process.
 * Each tick t = 1, 2, ...: checks that every qword of %rcx pages from %rsi (kvmpy may
 * set them; 0 means 1024 pages from 8 MiB) still holds t-1 (what the tick before wrote;
 * fresh RAM is 0), writes t into all of them, bumps a count in RAM, compares it with
 * %r12, and prints "tick XXXXXXXX\n" (hex) on the MMIO test device's console. Ends
 * with status 0 after tick %rbp (0 means 0x1000). A page that a migration lost or sent
 * stale, or a count that went wrong, prints "MISMATCH" and ends with status 3. */
#include "testdev.inc"
        .set DELAY, 2000000
        .set DEFAULT_LIMIT, 0x1000
        .set DEFAULT_AREA, 0x800000
        .set DEFAULT_PAGES, 1024
        .code64
        .text
        .globl _start
_start:
        test %rbp, %rbp
        jnz 1f
        mov $DEFAULT_LIMIT, %ebp
1:      test %rsi, %rsi
        jnz 2f
        mov $DEFAULT_AREA, %esi
2:      test %rcx, %rcx
        jnz 3f
        mov $DEFAULT_PAGES, %ecx
3:      mov %rsi, %r13              /* the area */
        mov %rcx, %r14              /* its pages */
        shl $9, %r14                /* ... as qwords */
        mov $TESTDEV, %r15d
        xor %r12, %r12              /* the last tick */
tick:   mov %r13, %rdi              /* every qword still holds the last tick */
        mov %r14, %rcx
        mov %r12, %rax
        repe scasq
        jne bad
        inc %r12
        mov %r13, %rdi              /* then this tick everywhere */
        mov %r14, %rcx
        mov %r12, %rax
        rep stosq
        incq count
        cmp count, %r12
        jne bad
        mov %r15, %rdi
        mov $prefix, %rsi
        PUTS_MMIO
        mov %r12, %rbx
        PUTHEX_MMIO 8
        movb $'\n', CONSOLE(%rdi)
        cmp %rbp, %r12
        je done
        mov $DELAY, %rcx
6:      dec %rcx
        jnz 6b
        jmp tick
done:   movl $0, EXIT(%rdi)
7:      jmp 7b
bad:    mov %r15, %rdi
        mov $mismatch, %rsi
        PUTS_MMIO
        movl $3, EXIT(%rdi)
        jmp 7b
        .data
        .balign 8
count:  .quad 0
prefix: .asciz "tick "
mismatch: .asciz "MISMATCH\n"
