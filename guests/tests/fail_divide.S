/* Fails on purpose: divides by zero in long mode under kvmpy's empty IDT.
 * #DE cannot be delivered (IDT limit 0), nor can the #GP and #DF that follow:
 * a triple fault (KVM_EXIT_SHUTDOWN). kvmpy should name #DE, ECX = 0 and the
 * empty IDT. Run with --mode long. */
        .code64
        .text
        .globl _start
_start:
        mov $0x1234, %eax
        xor %ecx, %ecx
divide: div %ecx
        hlt
