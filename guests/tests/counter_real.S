/* Real-mode counter for the snapshot tests: loaded at 0x10000, CS=DS=SS=0x1000.
 * Prints "count XXXX\n" (hex) for 0, 1, 2... on COM1 with a short busy delay
 * between lines, and ends (status 0 on the debug-exit port) once it has printed
 * the count in %bp (kvmpy sets it; 0 means 0x100). The count is kept in %di and
 * in RAM, compared before each line: if a restore lost one, "MISMATCH" and
 * status 3. Everything here runs at CPL0, which a PVM /dev/kvm emulates one
 * instruction at a time, so the delay is short. */
#include "uart.inc"
        .set DELAY, 2000
        .set DEFAULT_LIMIT, 0x100
        .code16
        .text
        .globl _start
_start:
        cli
        test %bp, %bp
        jnz 1f
        mov $DEFAULT_LIMIT, %bp
1:      xor %di, %di
next:   cmp (count - _start), %di
        jne bad
        mov $(prefix - _start), %si
        call puts
        mov %di, %bx
        mov $4, %cx
2:      rol $4, %bx
        mov %bl, %al
        and $0xf, %al
        add $'0', %al
        cmp $'9', %al
        jbe 3f
        add $('a' - '9' - 1), %al
3:      PUTC_AL
        loop 2b
        mov $'\n', %al
        PUTC_AL
        cmp %bp, %di
        je done
        inc %di
        incw (count - _start)
        mov $DELAY, %cx
4:      loop 4b
        jmp next
done:   mov $DEBUG_EXIT, %dx
        mov $0, %al
        out %al, %dx
5:      hlt
        jmp 5b
bad:    mov $(mismatch - _start), %si
        call puts
        mov $DEBUG_EXIT, %dx
        mov $3, %al
        out %al, %dx
        jmp 5b
/* print the NUL-terminated string at %si */
puts:   lodsb
        test %al, %al
        jz 6f
        PUTC_AL
        jmp puts
6:      ret
        .data
count:  .word 0
prefix: .asciz "count "
mismatch: .asciz "MISMATCH\n"
