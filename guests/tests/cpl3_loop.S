/* User mode (CPL3) compute loop, started by kvmpy in long mode at CPL3 with
 * IOPL 3. Sums 1..10,000,000 (natively fast even where CPL0 code is emulated),
 * prints the sum in hex on COM1, then ends the run through the debug-exit
 * port (hlt is privileged at CPL3). */
#include "uart.inc"
        .code64
        .text
        .globl _start
_start:
        xor %rax, %rax
        mov $10000000, %rcx
1:      add %rcx, %rax
        dec %rcx
        jnz 1b
        mov %rax, %rbx                  /* 50000005000000 = 0x2d79883d2000 */
        mov $prefix, %rsi
2:      lodsb
        test %al, %al
        jz 3f
        PUTC_AL
        jmp 2b
3:      mov $16, %rcx                   /* 16 hex digits, most significant first */
4:      rol $4, %rbx
        mov %bl, %al
        and $0xf, %al
        add $'0', %al
        cmp $'9', %al
        jbe 5f
        add $('a' - '9' - 1), %al
5:      push %rcx
        PUTC_AL
        pop %rcx
        dec %rcx
        jnz 4b
        mov $'\n', %al
        PUTC_AL
        xor %eax, %eax
        mov $DEBUG_EXIT, %dx
        out %al, %dx                    /* status 0 */
6:      jmp 6b
        .data
prefix: .asciz "sum=0x"
