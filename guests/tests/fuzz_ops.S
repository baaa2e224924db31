/* The op interpreter of `kvmpy fuzz` (kvmpy/fuzz): started in 64-bit long mode at CPL0
 * (port I/O needs it; and on PVM an exit from emulated CPL0 code costs a third of one
 * from native CPL3 code), it performs the op list kvmpy wrote at FUZZ_OPS, in order, so
 * that every access takes the real VM-exit path to the real device, then ends the run
 * by writing status 0 to the MMIO test device's exit register (and the next run, with
 * a new list, goes on from there: back to the start). kvmpy/fuzz/ops.py
 * writes the list; each op is 24 bytes, little-endian:
 *     u8 kind, u8 size, u16 0, u32 count, u64 address, u64 value
 * kind 1/2: port write/read, 3/4: MMIO write/read, each done `count` times (a write's
 * value counting up by one); kind 5: the `count` bytes that follow the op (padded to
 * 8) go to guest RAM at `address`: the interpreter rings the copier's doorbell with the
 * op's own address and kvmpy copies them, and those of the RAM writes right after it
 * (an emulated `rep movsb` costs ~1.3 us a byte); anything else ends the list. */
#include "testdev.inc"
        .set FUZZ_OPS, 0x200000
        .set FUZZ_COPIER, 0xe0001000
        .code64
        .text
        .globl _start
_start:
        mov $FUZZ_OPS, %rbx
next:   movzbl (%rbx), %eax
        movzbl 1(%rbx), %ecx            /* size */
        mov 4(%rbx), %r8d               /* count */
        mov 8(%rbx), %rdi               /* address */
        mov 16(%rbx), %r9               /* value */
        add $24, %rbx
        cmp $1, %eax
        je pio_write
        cmp $2, %eax
        je pio_read
        cmp $3, %eax
        je mmio_write
        cmp $4, %eax
        je mmio_read
        cmp $5, %eax
        je ram_write
        mov $TESTDEV, %edi
        movl $0, EXIT(%rdi)             /* the run ends on this exit... */
        jmp _start                      /* ...and the next one starts here */

pio_write:
        mov %edi, %edx
        mov %r9, %rax
2:      cmp $1, %ecx
        jne 3f
        outb %al, %dx
        jmp 5f
3:      cmp $2, %ecx
        jne 4f
        outw %ax, %dx
        jmp 5f
4:      outl %eax, %dx
5:      inc %rax
        dec %r8d
        jnz 2b
        jmp next

pio_read:
        mov %edi, %edx
2:      cmp $1, %ecx
        jne 3f
        inb %dx, %al
        jmp 5f
3:      cmp $2, %ecx
        jne 4f
        inw %dx, %ax
        jmp 5f
4:      inl %dx, %eax
5:      dec %r8d
        jnz 2b
        jmp next

mmio_write:
2:      cmp $1, %ecx
        jne 3f
        movb %r9b, (%rdi)
        jmp 6f
3:      cmp $2, %ecx
        jne 4f
        movw %r9w, (%rdi)
        jmp 6f
4:      cmp $4, %ecx
        jne 5f
        movl %r9d, (%rdi)
        jmp 6f
5:      mov %r9, (%rdi)
6:      inc %r9
        dec %r8d
        jnz 2b
        jmp next

mmio_read:
2:      cmp $1, %ecx
        jne 3f
        movb (%rdi), %al
        jmp 6f
3:      cmp $2, %ecx
        jne 4f
        movw (%rdi), %ax
        jmp 6f
4:      cmp $4, %ecx
        jne 5f
        movl (%rdi), %eax
        jmp 6f
5:      mov (%rdi), %rax
6:      dec %r8d
        jnz 2b
        jmp next

ram_write:                              /* one doorbell for a run of RAM writes */
        lea -24(%rbx), %rax             /* the op */
        mov $FUZZ_COPIER, %edx
        mov %rax, (%rdx)
skip:   add $7, %r8                     /* past its bytes */
        and $~7, %r8
        add %r8, %rbx
        cmpb $5, (%rbx)                 /* another RAM write: the copier did it too */
        jne next
        mov 4(%rbx), %r8d
        add $24, %rbx
        jmp skip
