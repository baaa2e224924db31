/* Fails on purpose: the classic long-mode mistake. Started by kvmpy in 32-bit
 * protected mode (with kvmpy's empty IDT), the guest points CR3 at page
 * tables, sets EFER.LME and then CR0.PG, having forgotten CR4.PAE. That `mov`
 * raises #GP, which the empty IDT cannot deliver: a triple fault. kvmpy should
 * say "long mode requested but CR4.PAE is clear". --mode protected. */
        .code32
        .text
        .globl _start
_start:
        mov $0x70000, %eax
        mov %eax, %cr3
        mov $0xc0000080, %ecx           /* IA32_EFER */
        rdmsr
        or $(1 << 8), %eax              /* EFER.LME */
        wrmsr
        mov %cr0, %eax
        or $0x80000000, %eax            /* CR0.PG, but CR4.PAE is still 0 */
enable: mov %eax, %cr0
        hlt
