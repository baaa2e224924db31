/* User mode (CPL3) compute loop, started by kvmpy in long mode at CPL3.
 * Sums 1..10,000,000 (natively fast even where CPL0 code is emulated) and
 * prints the sum in hex. Port I/O is privileged at CPL3 (and PVM cannot grant
 * IOPL 3), so it talks to kvmpy's MMIO test device instead: its console
 * register for output and its exit register to end the run. */
#include "testdev.inc"
        .code64
        .text
        .globl _start
_start:
        xor %rax, %rax
        mov $10000000, %rcx
1:      add %rcx, %rax
        dec %rcx
        jnz 1b
        mov %rax, %rbx                  /* 50000005000000 = 0x2d7988896b40 */
        mov $TESTDEV, %edi
        mov $prefix, %rsi
        PUTS_MMIO
        PUTHEX_MMIO 16
        movb $'\n', CONSOLE(%rdi)
        movl $0, EXIT(%rdi)             /* status 0 */
6:      jmp 6b
        .data
prefix: .asciz "sum=0x"
