/* Real mode hello: kvmpy loads this at 0x10000 with CS=DS=SS=0x1000, IP=0.
 * It prints a line on COM1 and halts with interrupts off (the run's end). */
#include "uart.inc"
        .code16
        .text
        .globl _start
_start:
        cli
        mov $(msg - _start), %si
next:   lodsb
        test %al, %al
        jz done
        PUTC_AL
        jmp next
done:   hlt
        jmp done
msg:    .asciz "Hello from real mode\n"
