/* Chapter 5: an MMIO device of your own.
 *
 * kvmpy starts this guest in 64-bit long mode with its identity map of the
 * first 4 GiB (kvmpy/cpu/pagetables.py), so the device's guest-physical
 * address is also its virtual address. The device is the CRC-32 engine of
 * docs/tutorial/05-mmio-device.py, which the host puts on the MMIO bus at
 * 0xe0001000. No RAM is there: every load or store to that page leaves the
 * guest as KVM_EXIT_MMIO, and kvmpy calls the device's read() or write().
 *
 * The guest checks the device's identity, resets it, feeds it a sentence one
 * byte per store, reads the CRC back and prints it. */
#include "print.inc"
        .set CRC_DEVICE, 0xe0001000     /* docs/tutorial/05-mmio-device.py DEVICE_GPA */
        .set CRC_IDENT, 0x00            /* register offsets, as the device defines them */
        .set CRC_DATA, 0x04
        .set CRC_VALUE, 0x08
        .set CRC_RESET, 0x0c
        .set IDENT, 0x32335243          /* "CR32", little-endian */

        .code64
        .text
        .globl _start
_start:
        mov $CRC_DEVICE, %ebx           /* a 32-bit move zero-extends into rbx */
        cmpl $IDENT, CRC_IDENT(%rbx)    /* exit: MMIO read, 4 bytes */
        jne no_device
        movl $0, CRC_RESET(%rbx)        /* exit: MMIO write, 4 bytes */
        mov $text, %rsi
1:      lodsb
        test %al, %al
        jz 2f
        mov %al, CRC_DATA(%rbx)         /* exit: MMIO write, 1 byte (one per character) */
        jmp 1b
2:      mov $msg_crc, %rsi
        call puts
        mov CRC_VALUE(%rbx), %eax       /* exit: MMIO read, 4 bytes */
        mov $8, %ecx
        call puthex
        mov $'\n', %al
        PUTC_AL
        hlt
no_device:
        mov $msg_none, %rsi
        call puts
        hlt

        DEFINE_PUTS
        DEFINE_PUTHEX

        .data
text:     .asciz "The quick brown fox jumps over the lazy dog"
msg_crc:  .asciz "crc32(\"The quick brown fox jumps over the lazy dog\") = 0x"
msg_none: .asciz "no CRC-32 device at 0xe0001000\n"
