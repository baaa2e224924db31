/* User mode (CPL3) compute loop, started by kvmpy in long mode at CPL3.
 * Sums 1..10,000,000 (natively fast even where CPL0 code is emulated) and
 * prints the sum in hex. Port I/O is privileged at CPL3 (and PVM cannot grant
 * IOPL 3), so it talks to kvmpy's MMIO test device instead: its console
 * register for output and its exit register to end the run. */
        .set TESTDEV, 0xe0000000
        .set CONSOLE, 0x08
        .set EXIT, 0x0c
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
2:      lodsb
        test %al, %al
        jz 3f
        movb %al, CONSOLE(%rdi)
        jmp 2b
3:      mov $16, %rcx                   /* 16 hex digits, most significant first */
4:      rol $4, %rbx
        mov %bl, %al
        and $0xf, %al
        add $'0', %al
        cmp $'9', %al
        jbe 5f
        add $('a' - '9' - 1), %al
5:      movb %al, CONSOLE(%rdi)
        dec %rcx
        jnz 4b
        movb $'\n', CONSOLE(%rdi)
        movl $0, EXIT(%rdi)             /* status 0 */
6:      jmp 6b
        .data
prefix: .asciz "sum=0x"
