/* The exit-latency benchmark guest: N port writes in a row, then halt.
 * N is in %ecx at entry (kvmpy sets it). Real mode, so every instruction
 * is cheap even where CPL0 code is emulated: the cost measured is the exit. */
        .code16
        .text
        .globl _start
_start:
        cli
        mov $0x80, %dx                  /* the POST-code port: harmless, unclaimed */
1:      out %al, %dx
        dec %ecx
        jnz 1b
        hlt
