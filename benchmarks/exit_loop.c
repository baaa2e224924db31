/* C reference for the exit round-trip benchmark: the same guest
 * (guests/tests/pio_loop.S, N port writes then hlt) run by a minimal C VMM
 * that does the least a VMM must per exit: read the exit, read the byte the
 * guest wrote, store it where a device would, re-enter.
 * Usage: exit_loop GUEST.bin N  -> prints {"exits": n, "ns_per_exit": x} */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define LOAD 0x10000
#define MEM (1 << 20)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    if (argc != 3) { fprintf(stderr, "usage: %s guest.bin N\n", argv[0]); return 2; }
    long n = atol(argv[2]);
    int kvm = open("/dev/kvm", O_RDWR);
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    uint8_t *mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    FILE *f = fopen(argv[1], "rb");
    if (kvm < 0 || vm < 0 || mem == MAP_FAILED || !f) { perror("setup"); return 1; }
    fread(mem + LOAD, 1, MEM - LOAD, f);
    fclose(f);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM, .userspace_addr = (uint64_t)mem };
    ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region);
    ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000);
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    struct kvm_sregs sregs;
    ioctl(vcpu, KVM_GET_SREGS, &sregs);
    struct kvm_segment *segs[] = { &sregs.cs, &sregs.ds, &sregs.es, &sregs.ss };
    for (int i = 0; i < 4; i++) { segs[i]->base = LOAD; segs[i]->selector = LOAD >> 4; }
    ioctl(vcpu, KVM_SET_SREGS, &sregs);
    struct kvm_regs regs = { .rip = 0, .rflags = 2, .rcx = n, .rsp = 0xfff0 };
    ioctl(vcpu, KVM_SET_REGS, &regs);

    volatile uint8_t sink = 0;
    long exits = 0;
    double t0 = now();
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) { perror("KVM_RUN"); return 1; }
        if (run->exit_reason == KVM_EXIT_IO) {
            if (run->io.direction == KVM_EXIT_IO_OUT)
                sink = *((uint8_t *)run + run->io.data_offset);
            exits++;
            continue;
        }
        if (run->exit_reason == KVM_EXIT_HLT) break;
        fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
        return 1;
    }
    double t = now() - t0;
    (void)sink;
    printf("{\"exits\": %ld, \"ns_per_exit\": %.1f}\n", exits, t * 1e9 / exits);
    return 0;
}
