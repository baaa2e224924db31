/* Chapter 2: from real mode to 32-bit protected mode, by the guest itself.
 *
 * kvmpy starts this guest in real mode at 0x1000:0000 (as chapter 1). The
 * guest then does what every PC boot loader does to leave real mode:
 *   1. load GDTR with a table of segment descriptors (lgdt);
 *   2. set CR0.PE;
 *   3. far-jump, which loads CS from the new table and starts decoding
 *      32-bit code;
 *   4. reload the data segment registers from the table.
 * It prints a line before and after. It links at 0x10000 (guests/tests/flat.ld),
 * so once segments are flat (base 0) its symbols are its addresses; in real
 * mode it must subtract the segment base, 0x10000.
 *
 * Intel SDM Vol. 3A §9.9.1 (switching to protected mode), §3.4.5 (descriptors). */
#include "print.inc"
        .set BASE, 0x10000              /* layout.FLAT_LOAD: CS * 16 in real mode */
        .set CODE32, 0x08               /* selectors: byte offsets into the GDT below */
        .set DATA32, 0x10

        .code16
        .text
        .globl _start
_start:
        cli
        mov $(msg_real - BASE), %si
        call puts16

        lgdtl (gdt_ptr - BASE)          /* 1. GDTR = {limit, linear base of gdt} */
        mov %cr0, %eax
        or $1, %eax                     /* 2. CR0.PE: protection on, paging still off */
        mov %eax, %cr0
        ljmpl $CODE32, $start32         /* 3. CS = CODE32: base 0, 32-bit (D=1) */

        .code32
start32:
        mov $DATA32, %ax                /* 4. DS, ES, SS from the GDT too */
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x9f000, %esp              /* layout.FLAT_LIMIT: the stack grows down from here */
        mov $msg_protected, %esi        /* a flat segment: the symbol is the address */
        call puts32
        hlt                             /* the end, as in chapter 1 */
        jmp .

        .code16
        DEFINE_PUTS puts16
        .code32
        DEFINE_PUTS puts32

        .data
        .align 8
/* Each descriptor: limit 0xfffff in 4 KiB units (G=1, so 4 GiB), base 0.
 * Access byte 0x9a = present, DPL 0, code, execute/read; 0x92 = data, read/write.
 * Flags 0xc = G (4 KiB granularity) + D/B (32-bit). kvmpy/cpu/gdt.py builds the
 * same bytes from a Segment (Segment.descriptor). */
gdt:    .quad 0                         /* selector 0 is the null descriptor */
        .quad 0x00cf9a000000ffff        /* 0x08: 32-bit code */
        .quad 0x00cf92000000ffff        /* 0x10: data */
gdt_end:
gdt_ptr:
        .word gdt_end - gdt - 1         /* limit: size - 1 */
        .long gdt                       /* base: a linear address */
msg_real:      .asciz "real mode: CS=0x1000, addresses are CS*16 + offset\n"
msg_protected: .asciz "protected mode: CS=0x08, a flat 32-bit segment from the GDT\n"
