/* Chapter 4: interrupts through the in-kernel LAPIC and IO-APIC.
 *
 * kvmpy starts this guest in 64-bit long mode (its GDT, page tables and an
 * empty IDT) on a VM with the in-kernel irqchip (FlatConfig(irqchip=True)).
 * The guest:
 *   1. builds an IDT with two interrupt gates, vectors 0x30 and 0x31;
 *   2. masks the legacy 8259 PIC, which KVM's irqchip also has;
 *   3. enables its local APIC and arms the APIC timer, one-shot, on vector
 *      0x30, then halts: the timer interrupt wakes it;
 *   4. routes IO-APIC pin 5 to vector 0x31 and halts again: the host raises
 *      GSI 5 (KVM_IRQ_LINE) and the interrupt wakes it;
 *   5. writes 0 to the debug-exit port, which ends the run with status 0.
 * With an irqchip `hlt` no longer leaves KVM_RUN, so step 5 is how it ends.
 *
 * Intel SDM Vol. 3A §6.14.1 (64-bit IDT gates), §11.4.7 (software enable), §11.5.4 (APIC
 * timer); 82093AA IO-APIC datasheet §3.2.4 (redirection table). */
#include "print.inc"
        .set LAPIC, 0xfee00000          /* layout.LAPIC */
        .set LAPIC_EOI, 0x0b0
        .set LAPIC_SVR, 0x0f0
        .set LAPIC_LVT_TIMER, 0x320
        .set LAPIC_TIMER_ICR, 0x380     /* initial count: writing it starts the timer */
        .set LAPIC_TIMER_DCR, 0x3e0     /* divide configuration */
        .set IOAPIC, 0xfec00000         /* layout.IOAPIC */
        .set IOREGSEL, 0x00             /* write a register index here ... */
        .set IOWIN, 0x10                /* ... then read or write it here */
        .set IOREDTBL, 0x10             /* pin n: index 0x10+2n (low), 0x11+2n (high) */
        .set PIC1_DATA, 0x21            /* 8259 interrupt mask registers */
        .set PIC2_DATA, 0xa1
        .set KERNEL_CS, 0x10            /* kvmpy's 64-bit code selector (cpu/modes.py BOOT_CS) */
        .set TIMER_VECTOR, 0x30
        .set DEVICE_VECTOR, 0x31
        .set DEVICE_GSI, 5              /* layout.VIRTIO_IRQS[0]: virtio-mmio slot 0's line */

        .code64
        .text
        .globl _start
_start:
        /* 1. the IDT: vector n's 16-byte gate lives at idt + 16 * n */
        mov $TIMER_VECTOR, %edi
        mov $timer_isr, %eax
        call set_gate
        mov $DEVICE_VECTOR, %edi
        mov $device_isr, %eax
        call set_gate
        lidt idt_ptr

        /* 2. mask the 8259 PIC: KVM's irqchip has one too, wired to the LAPIC's LINT0,
         *    and after reset it would turn GSI 5 into vector 5 (no gate: triple fault) */
        mov $0xff, %al
        out %al, $PIC1_DATA
        out %al, $PIC2_DATA

        /* 3. the local APIC: software-enable it, then a one-shot timer */
        mov $LAPIC, %ebx
        movl $0x1ff, LAPIC_SVR(%rbx)            /* bit 8: APIC enabled; spurious vector 0xff */
        movl $0xb, LAPIC_TIMER_DCR(%rbx)        /* divide by 1 */
        movl $TIMER_VECTOR, LAPIC_LVT_TIMER(%rbx) /* one-shot mode, not masked */
        movl $1000000, LAPIC_TIMER_ICR(%rbx)    /* count down from a million: go */
        mov $msg_timer, %rsi
        call puts
        sti                                     /* `sti; hlt`: no interrupt can slip between */
1:      hlt
        cmpl $0, ticks
        je 1b

        /* 4. the IO-APIC: pin DEVICE_GSI -> DEVICE_VECTOR on the APIC with ID 0 */
        cli
        mov $IOAPIC, %ebx
        movl $(IOREDTBL + 2 * DEVICE_GSI + 1), IOREGSEL(%rbx)
        movl $0, IOWIN(%rbx)                    /* bits 63:56, destination: APIC ID 0 */
        movl $(IOREDTBL + 2 * DEVICE_GSI), IOREGSEL(%rbx)
        movl $DEVICE_VECTOR, IOWIN(%rbx)        /* fixed, physical, active high, edge, unmasked */
        mov $msg_device, %rsi
        call puts
        sti
2:      hlt
        cmpl $0, device_irqs
        je 2b

        /* 5. done: the debug-exit port ends the run with the status written */
        mov $msg_done, %rsi
        call puts
        xor %eax, %eax
        out %al, $DEBUG_EXIT
3:      jmp 3b

/* Interrupt handlers: save what they use, count, say so, EOI, iretq. */
timer_isr:
        push %rax
        push %rdx
        push %rsi
        incl ticks
        mov $msg_tick, %rsi
        call puts
        jmp eoi
device_isr:
        push %rax
        push %rdx
        push %rsi
        incl device_irqs
        mov $msg_irq, %rsi
        call puts
eoi:    mov $LAPIC, %eax
        movl $0, LAPIC_EOI(%rax)                /* end of interrupt: the LAPIC may deliver more */
        pop %rsi
        pop %rdx
        pop %rax
        iretq

/* set_gate: IDT entry %edi -> handler %eax (a 64-bit interrupt gate, DPL 0) */
set_gate:
        shl $4, %edi
        add $idt, %edi
        mov %ax, (%rdi)                         /* offset 15:0 */
        movw $KERNEL_CS, 2(%rdi)                /* code segment selector */
        movw $0x8e00, 4(%rdi)                   /* P=1, DPL=0, type 0xe; IST 0 */
        shr $16, %eax
        mov %ax, 6(%rdi)                        /* offset 31:16 */
        movl $0, 8(%rdi)                        /* offset 63:32 */
        movl $0, 12(%rdi)                       /* reserved */
        ret

        DEFINE_PUTS

        .data
msg_timer:  .asciz "APIC timer armed; halting\n"
msg_tick:   .asciz "interrupt: vector 0x30 (APIC timer)\n"
msg_device: .asciz "IO-APIC pin 5 routed; halting\n"
msg_irq:    .asciz "interrupt: vector 0x31 (IO-APIC pin 5)\n"
msg_done:   .asciz "done\n"
        .align 4
ticks:       .long 0
device_irqs: .long 0
        .align 8
idt_ptr:
        .word 256 * 16 - 1
        .quad idt
        .align 16
idt:    .fill 256 * 16, 1, 0
