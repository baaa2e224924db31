/* Long mode, started by kvmpy: talk to kvmpy's MMIO test device at 0xe0000000.
 * Reads its identity, writes three values of different widths to its scratch
 * area and reads them back. Prints "mmio ok" or which step failed. */
#include "uart.inc"
        .set TESTDEV, 0xe0000000
        .code64
        .text
        .globl _start
_start:
        mov $TESTDEV, %ebx
        movabs $0x54535459504d564b, %rax /* "KVMPYTST" little-endian */
        cmp (%rbx), %rax
        jne bad_ident
        movabs $0x1122334455667788, %rax
        mov %rax, 0x10(%rbx)
        movl $0xcafef00d, 0x20(%rbx)
        movb $0x5a, 0x30(%rbx)
        cmp 0x10(%rbx), %rax
        jne bad_echo
        cmpl $0xcafef00d, 0x20(%rbx)
        jne bad_echo
        cmpb $0x5a, 0x30(%rbx)
        jne bad_echo
        mov $msg_ok, %rsi
        jmp print
bad_ident:
        mov $msg_ident, %rsi
        jmp print
bad_echo:
        mov $msg_echo, %rsi
print:  lodsb
        test %al, %al
        jz 2f
        PUTC_AL
        jmp print
2:      cli
3:      hlt
        jmp 3b
        .data
msg_ok:    .asciz "mmio ok\n"
msg_ident: .asciz "mmio bad identity\n"
msg_echo:  .asciz "mmio bad echo\n"
