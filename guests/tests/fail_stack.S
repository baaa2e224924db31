/* Fails on purpose: a good IDT but no stack. Every gate points at `handler`
 * (a 64-bit interrupt gate, kvmpy's code selector 0x10), then RSP is moved to
 * an address kvmpy's page tables do not map (8 GiB) and `ud2` raises #UD. The
 * CPU cannot push the exception frame: #PF, #DF, triple fault. --mode long. */
        .set CODE_SEL, 0x10
        .code64
        .text
        .globl _start
_start:
        lea idt(%rip), %rdi
        lea handler(%rip), %rax
        mov $256, %ecx
1:      mov %ax, (%rdi)                 /* offset 15:0 */
        movw $CODE_SEL, 2(%rdi)
        movw $0x8e00, 4(%rdi)           /* present, DPL 0, type 0xe: interrupt gate */
        mov %rax, %rdx
        shr $16, %rdx
        mov %dx, 6(%rdi)                /* offset 31:16 */
        shr $16, %rdx
        mov %edx, 8(%rdi)               /* offset 63:32 */
        movl $0, 12(%rdi)
        add $16, %rdi
        dec %ecx
        jnz 1b
        lidt idtr
        mov $0x200000000, %rsp
fault:  ud2
handler:
        hlt
        jmp handler
        .data
        .align 16
idtr:   .word 256 * 16 - 1
        .quad idt
        .align 16
idt:    .fill 256 * 16, 1, 0
