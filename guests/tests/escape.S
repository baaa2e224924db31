/* Long mode, started by kvmpy: asks kvmpy's test device to try what a subverted device
 * model would (its ESCAPE register; kvmpy/isolation/escape.py, enabled only by the
 * KVMPY_TEST_ESCAPE variable), prints the device's report and exits with status 0.
 * A confined kvmpy never gets to the report: it dies at the first call denied. */
#include "testdev.inc"
        .set ESCAPE, 0xf00
        .set REPORT, 0xf10
        .code64
        .text
        .globl _start
_start:
        mov $TESTDEV, %edi
        movl $1, ESCAPE(%rdi)
        mov $REPORT, %ebx
1:      movb (%rdi,%rbx), %al
        test %al, %al
        jz 2f
        movb %al, CONSOLE(%rdi)
        inc %ebx
        jmp 1b
2:      movl $0, EXIT(%rdi)
3:      hlt
        jmp 3b
