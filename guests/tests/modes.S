/* The climb a boot loader makes: real mode -> 32-bit protected -> 64-bit long.
 * kvmpy starts it in real mode at 0x10000 (CS=0x1000). The guest builds its own
 * GDT and identity-mapped page tables (2 MiB pages, first 1 GiB), and reports
 * each mode it reaches on COM1. Linked at 0x10000 so absolute addresses work
 * once segmentation is flat. */
#include "uart.inc"
        .set BASE, 0x10000
        .set PML4, 0x70000
        .set PDPT, 0x71000
        .set PD,   0x72000

        .code16
        .text
        .globl _start
_start:
        cli
        mov $(m_real - BASE), %si
1:      lodsb
        test %al, %al
        jz 2f
        PUTC_AL
        jmp 1b
2:      lgdtl (gdt_ptr - BASE)
        mov %cr0, %eax
        or $1, %eax                     /* CR0.PE */
        mov %eax, %cr0
        ljmpl $0x08, $pm32              /* reload CS from the new GDT */

        .code32
pm32:   mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x9f000, %esp
        mov $m_prot, %esi
1:      lodsb
        test %al, %al
        jz 2f
        PUTC_AL
        jmp 1b
2:      /* page tables: PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] = i * 2 MiB | PS|RW|P */
        mov $PML4, %edi
        xor %eax, %eax
        mov $(3 * 4096 / 4), %ecx
        rep stosl
        movl $(PDPT | 3), PML4
        movl $(PD | 3), PDPT
        mov $PD, %edi
        mov $0x83, %eax
        mov $512, %ecx
3:      mov %eax, (%edi)
        add $0x200000, %eax
        add $8, %edi
        dec %ecx
        jnz 3b
        mov $PML4, %eax
        mov %eax, %cr3
        mov %cr4, %eax
        or $(1 << 5), %eax              /* CR4.PAE */
        mov %eax, %cr4
        mov $0xc0000080, %ecx           /* IA32_EFER */
        rdmsr
        or $(1 << 8), %eax              /* EFER.LME */
        wrmsr
        mov %cr0, %eax
        or $(1 << 31), %eax             /* CR0.PG: long mode becomes active */
        mov %eax, %cr0
        ljmp $0x18, $lm64

        .code64
lm64:   mov $m_long, %rsi
1:      lodsb
        test %al, %al
        jz 2f
        PUTC_AL
        jmp 1b
2:      hlt
        jmp 2b

        .data
        .align 8
gdt:    .quad 0
        .quad 0x00cf9a000000ffff        /* 0x08: 32-bit code, flat */
        .quad 0x00cf92000000ffff        /* 0x10: data, flat */
        .quad 0x00af9a000000ffff        /* 0x18: 64-bit code */
gdt_end:
gdt_ptr:
        .word gdt_end - gdt - 1
        .long gdt
m_real: .asciz "real mode\n"
m_prot: .asciz "protected mode\n"
m_long: .asciz "long mode\n"
