/* Fails on purpose: an unhandled guest exception. The guest installs its own
 * IDT of 256 gates, none of them present, then executes `ud2`. #UD finds a
 * not-present gate (#NP), which finds one too (#DF), and so does #DF: a triple
 * fault. kvmpy should say that IDT entry 6 (#UD) is not present. --mode long. */
        .code64
        .text
        .globl _start
_start:
        lidt idtr
fault:  ud2
        hlt
        .data
        .align 16
idtr:   .word 256 * 16 - 1
        .quad idt
        .align 16
idt:    .fill 256 * 16, 1, 0
