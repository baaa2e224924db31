/* Started by kvmpy directly in 32-bit protected mode (flat segments, no paging). */
#include "uart.inc"
        .code32
        .text
        .globl _start
_start:
        mov $msg, %esi
1:      lodsb
        test %al, %al
        jz 2f
        PUTC_AL
        jmp 1b
2:      cli
3:      hlt
        jmp 3b
        .data
msg:    .asciz "Hello from protected mode\n"
