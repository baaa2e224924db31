/* Chapter 3: long mode and page tables.
 *
 * kvmpy starts this guest in 32-bit protected mode, paging off (`--mode
 * protected`: kvmpy/cpu/modes.py setup_protected, with kvmpy's GDT). The guest
 * builds four-level page tables with two mappings:
 *   - identity: virtual 0-2 MiB -> physical 0-2 MiB, one 2 MiB page
 *     (PML4[0] -> PDPT -> PD, PS=1), so its code keeps running when paging
 *     comes on;
 *   - upper half: virtual 0xffff800000000000 -> physical 0x60000, one 4 KiB
 *     page through all four levels (PML4[256] -> PDPT -> PD -> PT);
 * turns on PAE, loads CR3, sets EFER.LME, turns on paging (long mode is now
 * active), and far-jumps into a 64-bit code segment of its own GDT. Then it
 * writes a line through the upper-half address and prints it from physical
 * 0x60000 through the identity map: two virtual addresses, one page.
 *
 * Intel SDM Vol. 3A §4.5 (4-level paging), §9.8.5 (initializing IA-32e mode). */
#include "print.inc"
        .set PML4, 0x70000              /* six 4 KiB tables, free RAM below layout.FLAT_LIMIT */
        .set PDPT_LOW, 0x71000
        .set PD_LOW, 0x72000
        .set PDPT_HIGH, 0x73000
        .set PD_HIGH, 0x74000
        .set PT_HIGH, 0x75000
        .set DATA_PAGE, 0x60000         /* the physical page behind the upper-half address */
        .set UPPER, 0xffff800000000000  /* PML4 index 256: bits 63:48 copy bit 47 (canonical) */
        .set P, 1                       /* entry bits: present */
        .set RW, 2                      /* writable */
        .set PS, 0x80                   /* page size: this PDE maps a 2 MiB page */
        .set CR0_PG, 1 << 31
        .set CR4_PAE, 1 << 5
        .set MSR_EFER, 0xc0000080
        .set EFER_LME, 1 << 8
        .set CODE64, 0x08               /* selectors in this guest's GDT */
        .set DATA, 0x10

        .code32
        .text
        .globl _start
_start:
        mov $msg_protected, %esi
        call puts32

        /* 1. page tables: zero six pages, then fill in the entries */
        mov $PML4, %edi
        xor %eax, %eax
        mov $(6 * 4096 / 4), %ecx
        rep stosl
        movl $(PDPT_LOW | RW | P), PML4 + 8 * 0
        movl $(PD_LOW | RW | P), PDPT_LOW + 8 * 0
        movl $(0 | PS | RW | P), PD_LOW + 8 * 0
        movl $(PDPT_HIGH | RW | P), PML4 + 8 * 256
        movl $(PD_HIGH | RW | P), PDPT_HIGH + 8 * 0
        movl $(PT_HIGH | RW | P), PD_HIGH + 8 * 0
        movl $(DATA_PAGE | RW | P), PT_HIGH + 8 * 0

        /* 2. PAE paging structures, CR3, EFER.LME, then CR0.PG */
        mov %cr4, %eax
        or $CR4_PAE, %eax
        mov %eax, %cr4
        mov $PML4, %eax
        mov %eax, %cr3
        mov $MSR_EFER, %ecx
        rdmsr
        or $EFER_LME, %eax
        wrmsr
        mov %cr0, %eax
        or $CR0_PG, %eax
        mov %eax, %cr0                  /* EFER.LMA = 1: long mode, still 32-bit code */

        /* 3. a 64-bit code segment: load our GDT and jump into it */
        lgdt gdt_ptr
        ljmp $CODE64, $start64

        .code64
start64:
        mov $DATA, %ax                  /* every selector must now index *our* GDT: */
        mov %ax, %ds                    /* kvmpy's left 0x18 in them, beyond its end */
        mov %ax, %es
        mov %ax, %fs
        mov %ax, %gs
        mov %ax, %ss
        mov $msg_long, %rsi
        call puts64

        /* 4. write a line at the upper-half address ... */
        movabs $UPPER, %rdi
        mov $msg_page, %rsi
1:      lodsb
        stosb
        test %al, %al
        jnz 1b
        /* ... and print it from the physical page, through the identity map */
        mov $DATA_PAGE, %esi
        call puts64
        hlt
        jmp .

        .code32
        DEFINE_PUTS puts32
        .code64
        DEFINE_PUTS puts64

        .data
        .align 8
gdt:    .quad 0
        .quad 0x00af9a000000ffff        /* 0x08: code, L=1 (64-bit), D=0 */
        .quad 0x00cf92000000ffff        /* 0x10: data */
gdt_end:
gdt_ptr:
        .word gdt_end - gdt - 1
        .long gdt
msg_protected: .asciz "protected mode, paging off\n"
msg_long:      .asciz "long mode, paging on: CR3=0x70000\n"
msg_page:      .asciz "written at 0xffff800000000000, read at 0x60000\n"
