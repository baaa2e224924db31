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
 * (an emulated `rep movsb` costs ~1.3 us a byte); anything else ends the list.
 *
 * Why it is written this way: PVM emulates CPL0 code an instruction at a time (~1 us
 * each), so what an op costs beyond its exit is the instructions around the access.
 * `code` is kind << 4 | size, which the encoder works out: one table jump picks the
 * loop for that kind and size (a two-instruction dispatch, copied to the end of every
 * loop), and each loop is the access and its count, nothing else. A code without a
 * loop (END, a corrupted list) ends the list. */
#include "testdev.inc"
        .set FUZZ_OPS, 0x200000
        .set FUZZ_COPIER, 0xe0001000
        .code64
        .text

.macro DISPATCH
        movzbl 2(%rbx), %eax
        jmp *table(, %rax, 8)
.endm

/* count in rcx, address in rdx (a port) or rdi, a write's value in rax; rbx on to
 * the next op */
.macro FIELDS port, write
        mov 4(%rbx), %ecx
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

pw1:    FIELDS 1, 1
1:      outb %al, %dx
        inc %rax
        loop 1b
        DISPATCH
pw2:    FIELDS 1, 1
1:      outw %ax, %dx
        inc %rax
        loop 1b
        DISPATCH
pw4:    FIELDS 1, 1
1:      outl %eax, %dx
        inc %rax
        loop 1b
        DISPATCH

pr1:    FIELDS 1, 0
1:      inb %dx, %al
        loop 1b
        DISPATCH
pr2:    FIELDS 1, 0
1:      inw %dx, %ax
        loop 1b
        DISPATCH
pr4:    FIELDS 1, 0
1:      inl %dx, %eax
        loop 1b
        DISPATCH

mw1:    FIELDS 0, 1
1:      movb %al, (%rdi)
        inc %rax
        loop 1b
        DISPATCH
mw2:    FIELDS 0, 1
1:      movw %ax, (%rdi)
        inc %rax
        loop 1b
        DISPATCH
mw4:    FIELDS 0, 1
1:      movl %eax, (%rdi)
        inc %rax
        loop 1b
        DISPATCH
mw8:    FIELDS 0, 1
1:      mov %rax, (%rdi)
        inc %rax
        loop 1b
        DISPATCH

mr1:    FIELDS 0, 0
1:      movb (%rdi), %al
        loop 1b
        DISPATCH
mr2:    FIELDS 0, 0
1:      movw (%rdi), %ax
        loop 1b
        DISPATCH
mr4:    FIELDS 0, 0
1:      movl (%rdi), %eax
        loop 1b
        DISPATCH
mr8:    FIELDS 0, 0
1:      mov (%rdi), %rax
        loop 1b
        DISPATCH

ram:    mov $FUZZ_COPIER, %edx          /* one doorbell for a run of RAM writes */
        mov %rbx, (%rdx)                /* the op's address */
1:      mov 4(%rbx), %ecx               /* past it and its bytes (padded to 8) */
        add $31, %rcx
        and $~7, %rcx
        add %rcx, %rbx
        cmpb $5, (%rbx)                 /* another RAM write: the copier did it too */
        je 1b
        DISPATCH

/* code -> loop: every byte value has an entry, so no code jumps out of the table */
        .balign 8
table:
        .set code, 0
        .rept 256
        .if code == 0x11
        .quad pw1
        .elseif code == 0x12
        .quad pw2
        .elseif code == 0x14
        .quad pw4
        .elseif code == 0x21
        .quad pr1
        .elseif code == 0x22
        .quad pr2
        .elseif code == 0x24
        .quad pr4
        .elseif code == 0x31
        .quad mw1
        .elseif code == 0x32
        .quad mw2
        .elseif code == 0x34
        .quad mw4
        .elseif code == 0x38
        .quad mw8
        .elseif code == 0x41
        .quad mr1
        .elseif code == 0x42
        .quad mr2
        .elseif code == 0x44
        .quad mr4
        .elseif code == 0x48
        .quad mr8
        .elseif code == 0x50
        .quad ram
        .else
        .quad end
        .endif
        .set code, code + 1
        .endr
