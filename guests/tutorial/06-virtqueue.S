/* Chapter 6: a virtqueue by hand. A driver for virtio-rng in ~100 instructions.
 *
 * kvmpy starts this guest in 64-bit long mode on a machine with one virtio
 * device, an entropy source (MachineConfig(rng=True)), whose virtio-mmio
 * registers are at layout.VIRTIO_MMIO_BASE. The guest does what Linux's
 * virtio_mmio.c and virtio_ring.c do, in the order the spec gives:
 *   1. check the device: magic "virt", version 2, device ID 4 (entropy);
 *   2. reset it, then set ACKNOWLEDGE and DRIVER (§3.1.1);
 *   3. accept VIRTIO_F_VERSION_1 and nothing else, set FEATURES_OK and read
 *      it back;
 *   4. give queue 0 its size and the addresses of its three parts in guest
 *      RAM (descriptor table, available ring, used ring), mark it ready;
 *   5. set DRIVER_OK;
 *   6. put one 16-byte device-writable buffer in descriptor 0, offer it in
 *      the available ring and notify the queue;
 *   7. wait for the used ring to hand it back (or for the device to say it
 *      needs a reset: then it will never use the buffer), print the bytes.
 * There is no interrupt controller here, so the guest polls the used ring;
 * the notification (a store to QueueNotify) is an MMIO exit that kvmpy
 * serves before the guest runs again.
 *
 * virtio 1.2: §2.1 (status), §2.7 (split virtqueues), §4.2.2 (MMIO registers),
 * §4.2.3 (MMIO initialization), §5.4 (entropy device). */
#include "print.inc"
        .set VIRTIO, 0xd0000000         /* layout.VIRTIO_MMIO_BASE: the first device's window */
        /* §4.2.2 register offsets (kvmpy/virtio/mmio.py has the same names) */
        .set MAGIC_VALUE, 0x000
        .set VERSION, 0x004
        .set DEVICE_ID, 0x008
        .set DEVICE_FEATURES, 0x010
        .set DEVICE_FEATURES_SEL, 0x014
        .set DRIVER_FEATURES, 0x020
        .set DRIVER_FEATURES_SEL, 0x024
        .set QUEUE_SEL, 0x030
        .set QUEUE_NUM_MAX, 0x034
        .set QUEUE_NUM, 0x038
        .set QUEUE_READY, 0x044
        .set QUEUE_NOTIFY, 0x050
        .set INTERRUPT_STATUS, 0x060
        .set INTERRUPT_ACK, 0x064
        .set STATUS, 0x070
        .set QUEUE_DESC_LOW, 0x080
        .set QUEUE_DESC_HIGH, 0x084
        .set QUEUE_DRIVER_LOW, 0x090
        .set QUEUE_DRIVER_HIGH, 0x094
        .set QUEUE_DEVICE_LOW, 0x0a0
        .set QUEUE_DEVICE_HIGH, 0x0a4
        /* §2.1 device status bits */
        .set ACKNOWLEDGE, 1
        .set DRIVER, 2
        .set DRIVER_OK, 4
        .set FEATURES_OK, 8
        .set DEVICE_NEEDS_RESET, 0x40
        .set VIRTIO_MAGIC, 0x74726976   /* "virt" */
        .set VIRTIO_ID_ENTROPY, 4
        .set VIRTQ_DESC_F_WRITE, 2      /* §2.7.5: the device writes this buffer */
        /* the queue, in guest RAM below the stack (layout.FLAT_LIMIT) */
        .set QUEUE_SIZE, 8
        .set DESC, 0x80000              /* [8] {u64 addr; u32 len; u16 flags; u16 next} */
        .set AVAIL, 0x81000             /* u16 flags; u16 idx; u16 ring[8]; (u16 used_event) */
        .set USED, 0x82000              /* u16 flags; u16 idx; {u32 id; u32 len} ring[8]; ... */
        .set BUFFER, 0x83000
        .set BUFFER_LEN, 16

/* FAIL_UNLESS cc, msg: if condition `cc` does not hold, print msg and stop */
.macro FAIL_UNLESS cc, msg
        mov $\msg, %rsi
        j\cc 9f
        jmp fail
9:
.endm

        .code64
        .text
        .globl _start
_start:
        mov $VIRTIO, %ebx

        /* 1. which device is this? */
        cmpl $VIRTIO_MAGIC, MAGIC_VALUE(%rbx)
        FAIL_UNLESS e, msg_magic
        cmpl $2, VERSION(%rbx)
        FAIL_UNLESS e, msg_magic
        cmpl $VIRTIO_ID_ENTROPY, DEVICE_ID(%rbx)
        FAIL_UNLESS e, msg_magic

        /* 2. reset, then "I see you" and "I can drive you" */
        movl $0, STATUS(%rbx)
        movl $ACKNOWLEDGE, STATUS(%rbx)
        movl $(ACKNOWLEDGE | DRIVER), STATUS(%rbx)

        /* 3. features: VIRTIO_F_VERSION_1 is bit 32, bit 0 of the high half (select 1) */
        movl $1, DEVICE_FEATURES_SEL(%rbx)
        testl $1, DEVICE_FEATURES(%rbx)
        FAIL_UNLESS nz, msg_features
        movl $1, DRIVER_FEATURES_SEL(%rbx)
        movl $1, DRIVER_FEATURES(%rbx)
        movl $0, DRIVER_FEATURES_SEL(%rbx)
        movl $0, DRIVER_FEATURES(%rbx)          /* no device-specific features */
        movl $(ACKNOWLEDGE | DRIVER | FEATURES_OK), STATUS(%rbx)
        testl $FEATURES_OK, STATUS(%rbx)        /* the device may refuse our choice */
        FAIL_UNLESS nz, msg_features

        /* 4. queue 0, the request queue */
        movl $0, QUEUE_SEL(%rbx)
        cmpl $QUEUE_SIZE, QUEUE_NUM_MAX(%rbx)   /* 0 would mean "no such queue" */
        FAIL_UNLESS ae, msg_queue
        movl $QUEUE_SIZE, QUEUE_NUM(%rbx)
        movl $DESC, QUEUE_DESC_LOW(%rbx)
        movl $0, QUEUE_DESC_HIGH(%rbx)
        movl $AVAIL, QUEUE_DRIVER_LOW(%rbx)
        movl $0, QUEUE_DRIVER_HIGH(%rbx)
        movl $USED, QUEUE_DEVICE_LOW(%rbx)
        movl $0, QUEUE_DEVICE_HIGH(%rbx)
        movl $1, QUEUE_READY(%rbx)

        /* 5. the driver is ready: the device goes live */
        movl $(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK), STATUS(%rbx)
        mov $msg_ready, %rsi
        call puts

        /* 6. a request: descriptor 0 -> BUFFER, offered as avail.ring[0], then kick */
        movq $BUFFER, DESC + 0                  /* addr */
        movl $BUFFER_LEN, DESC + 8              /* len */
        movw $VIRTQ_DESC_F_WRITE, DESC + 12     /* flags: device-writable, no NEXT */
        movw $0, DESC + 14                      /* next: unused */
        movw $0, AVAIL + 4                      /* ring[avail.idx % 8] = head descriptor 0 */
        movw $1, AVAIL + 2                      /* idx = 1, after the ring entry (§2.7.13) */
        movl $0, QUEUE_NOTIFY(%rbx)             /* "queue 0 has something for you" */

        /* 7. the device returns the buffer through the used ring, or gives up on it */
1:      cmpw $1, USED + 2                       /* used.idx */
        je 2f
        testl $DEVICE_NEEDS_RESET, STATUS(%rbx) /* §2.1.2: it found our queue broken */
        FAIL_UNLESS z, msg_reset
        jmp 1b
2:
        mov INTERRUPT_STATUS(%rbx), %eax        /* bit 0: "used buffer" interrupt pending */
        mov %eax, INTERRUPT_ACK(%rbx)           /* (nothing delivers it: no irqchip) */
        mov $msg_used, %rsi
        call puts
        mov USED + 4 + 4, %eax                  /* used.ring[0].len: bytes written */
        mov $2, %ecx
        call puthex
        mov $msg_bytes, %rsi
        call puts
        mov $BUFFER, %edi
3:      movzbl (%rdi), %eax
        mov $2, %ecx
        call puthex
        inc %edi
        cmp $(BUFFER + BUFFER_LEN), %edi
        jne 3b
        mov $'\n', %al
        PUTC_AL
        hlt

fail:   call puts
        hlt

        DEFINE_PUTS
        DEFINE_PUTHEX

        .data
msg_magic:    .asciz "no virtio-mmio entropy device at 0xd0000000\n"
msg_features: .asciz "the device refused VIRTIO_F_VERSION_1\n"
msg_queue:    .asciz "queue 0 is too small\n"
msg_reset:    .asciz "the device set DEVICE_NEEDS_RESET\n"
msg_ready:    .asciz "virtio-rng: DRIVER_OK, queue 0 has 8 descriptors\n"
msg_used:     .asciz "used.idx = 1, used.ring[0].len = 0x"
msg_bytes:    .asciz "\nrandom: "
