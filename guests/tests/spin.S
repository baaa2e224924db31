/* A guest gone quiet: interrupts off, spinning forever on one `pause` loop.
 * Tests ask the running VMM where its vCPU is (Machine.describe_vcpus) and
 * expect this loop, with the marker value in AX. */
        .code16
        .text
        .globl _start
_start:
        cli
        mov $0x5157, %ax                /* "WQ": what the report must show in RAX */
spin:   pause
        jmp spin
