/* Chapter 1: real mode and the first I/O exit.
 *
 * kvmpy copies this image to guest-physical 0x10000 and starts the vCPU in
 * real mode with CS = DS = ES = SS = 0x1000 and IP = 0 (kvmpy/cpu/modes.py,
 * setup_real): a real-mode address is segment * 16 + offset, so offset 0 in
 * segment 0x1000 is the first byte of this file.
 *
 * The guest prints a line on the 16550 UART (COM1). Every `in` and `out`
 * leaves the guest: KVM_RUN returns KVM_EXIT_IO and kvmpy's exit loop hands
 * the access to the device that owns the port. `hlt` ends the run: with no
 * interrupt controller nothing could ever wake the vCPU again. */
        .set COM1, 0x3f8                /* transmit holding register (write) */
        .set COM1_LSR, 0x3fd            /* line status register (read) */
        .set LSR_THRE, 0x20             /* "transmitter holding register empty" */

        .code16
        .text
        .globl _start
_start:
        cli                             /* no interrupts: there is no IDT (IVT) for them */
        mov $(msg - _start), %si        /* DS:SI = 0x1000:offset = 0x10000 + offset */
next:   lodsb                           /* al = byte at DS:SI, SI += 1 */
        test %al, %al
        jz done
        mov %al, %bl
        mov $COM1_LSR, %dx
wait:   in %dx, %al                     /* exit: KVM_EXIT_IO, direction in, port 0x3fd */
        test $LSR_THRE, %al             /* room for a byte? */
        jz wait
        mov %bl, %al
        mov $COM1, %dx
        out %al, %dx                    /* exit: KVM_EXIT_IO, direction out, port 0x3f8 */
        jmp next
done:   hlt                             /* exit: KVM_EXIT_HLT, the end of the run */
        jmp done

msg:    .asciz "hello\n"
