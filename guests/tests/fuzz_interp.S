/* The op interpreter of `kvmpy fuzz` (kvmpy/fuzz): started in 64-bit long mode at CPL0
 * (port I/O needs it; and on PVM an exit from emulated CPL0 code costs a third of one
 * from native CPL3 code), it performs the op list kvmpy wrote at FUZZ_OPS, in order, so
 * that every access takes the real VM-exit path to the real device, then ends the run
 * by writing status 0 to the MMIO test device's exit register (and the next run, with
 * a new list, goes on from there: back to the start). kvmpy/fuzz/ops.py
 * writes the list; each op is 24 bytes, little-endian:
 *     u8 kind, u8 size, u8 code, u8 0, u32 count, u64 address, u64 value
 * kind 1/2: port write/read, 3/4: MMIO write/read, each done `count` times (a write's
 * value counting up by one); kind 5: the `count` bytes that follow the op (padded to
 * 8) go to guest RAM at `address`: the interpreter rings the copier's doorbell with the
 * op's own address and kvmpy copies them, and those of the RAM writes right after it
 * (an emulated `rep movsb` costs ~1.3 us a byte); the first RAM write of such a run
 * holds in `value` the address of the op after the run, where the list goes on.
 * Anything else ends the list.
 *
 * Why it is written this way: PVM emulates CPL0 code an instruction at a time (~1 us
 * each), so what an op costs beyond its exit is the instructions around the access.
 * `code` is kind << 4 | size, with 0x80 added when count is 1, which the encoder
 * works out: one table jump picks the code for that kind, size and count (a
 * two-instruction dispatch, copied to the end of each), and each is the access, its
 * operands and (for a count) its loop, nothing else. A code without an entry (END,
 * a corrupted list) ends the list. */
#include "testdev.inc"
        .set FUZZ_OPS, 0x200000
        .set FUZZ_COPIER, 0xe0001000
        .set ONCE, 0x80
        .code64
        .text

.macro DISPATCH
        movzbl 2(%rbx), %eax
        jmp *table(, %rax, 8)
.endm

/* One access kind: `name` repeats it count times (rcx), a write's value (rax)
 * counting up; `name`1 does it once. The address goes to rdx (a port) or rdi. */
.macro ACCESS name, port, write, insn:vararg
\name:  mov 4(%rbx), %ecx
        OPERANDS \port, \write
1:      \insn
.if \write
        inc %rax
.endif
        loop 1b
        DISPATCH
\name\()1:
        OPERANDS \port, \write
        \insn
        DISPATCH
.endm

.macro OPERANDS port, write
.if \port
        mov 8(%rbx), %edx
.else
        mov 8(%rbx), %rdi
.endif
.if \write
        mov 16(%rbx), %rax
.endif
        add $24, %rbx
.endm

        .globl _start
_start:
        mov $FUZZ_OPS, %rbx
        DISPATCH

end:    mov $TESTDEV, %edi
        movl $0, EXIT(%rdi)             /* the run ends on this exit... */
        jmp _start                      /* ...and the next one starts here */

        ACCESS pw1, 1, 1, outb %al, %dx
        ACCESS pw2, 1, 1, outw %ax, %dx
        ACCESS pw4, 1, 1, outl %eax, %dx
        ACCESS pr1, 1, 0, inb %dx, %al
        ACCESS pr2, 1, 0, inw %dx, %ax
        ACCESS pr4, 1, 0, inl %dx, %eax
        ACCESS mw1, 0, 1, movb %al, (%rdi)
        ACCESS mw2, 0, 1, movw %ax, (%rdi)
        ACCESS mw4, 0, 1, movl %eax, (%rdi)
        ACCESS mw8, 0, 1, mov %rax, (%rdi)
        ACCESS mr1, 0, 0, movb (%rdi), %al
        ACCESS mr2, 0, 0, movw (%rdi), %ax
        ACCESS mr4, 0, 0, movl (%rdi), %eax
        ACCESS mr8, 0, 0, mov (%rdi), %rax

ram:    mov $FUZZ_COPIER, %edx          /* one doorbell for a run of RAM writes */
        mov %rbx, (%rdx)                /* the op's address */
        mov 16(%rbx), %rbx              /* on after the run: the encoder says where */
        DISPATCH

/* code -> its code: every byte value has an entry, so no code jumps out of the table */
.macro ENTRY code, name
        .if (c & ~ONCE) == \code
        .if c & ONCE
        .quad \name\()1
        .else
        .quad \name
        .endif
        .set found, 1
        .endif
.endm
        .balign 8
table:
        .set c, 0
        .rept 256
        .set found, 0
        ENTRY 0x11, pw1
        ENTRY 0x12, pw2
        ENTRY 0x14, pw4
        ENTRY 0x21, pr1
        ENTRY 0x22, pr2
        ENTRY 0x24, pr4
        ENTRY 0x31, mw1
        ENTRY 0x32, mw2
        ENTRY 0x34, mw4
        ENTRY 0x38, mw8
        ENTRY 0x41, mr1
        ENTRY 0x42, mr2
        ENTRY 0x44, mr4
        ENTRY 0x48, mr8
        .if found == 0
        .if c == 0x50 || c == 0xD0
        .quad ram
        .else
        .quad end
        .endif
        .endif
        .set c, c + 1
        .endr
