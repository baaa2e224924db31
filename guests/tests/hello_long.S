/* Started by kvmpy directly in 64-bit long mode with kvmpy's page tables.
 * It checks what kvmpy promised (CR0.PG, CR4.PAE, EFER.LMA) before saying hello. */
#include "uart.inc"
        .code64
        .text
        .globl _start
_start:
        mov %cr0, %rax
        bt $31, %rax                    /* CR0.PG */
        jnc bad
        mov %cr4, %rax
        bt $5, %rax                     /* CR4.PAE */
        jnc bad
        mov $0xc0000080, %ecx
        rdmsr
        bt $10, %eax                    /* EFER.LMA */
        jnc bad
        mov $msg, %rsi
        jmp print
bad:    mov $msg_bad, %rsi
print:  lodsb
        test %al, %al
        jz 2f
        PUTC_AL
        jmp print
2:      cli
3:      hlt
        jmp 3b
        .data
msg:    .asciz "Hello from long mode\n"
msg_bad: .asciz "long mode state is wrong\n"
