/*
 * kvmpy C shim: the declarations cffi needs, and nothing else.
 *
 * The struct layouts come from <linux/kvm.h>: cffi's API mode fills in
 * offsets and sizes at build time (the "..." entries), so no layout is
 * copied by hand. Python decides everything; these functions only move a
 * pointer and an integer across the syscall boundary.
 */
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <errno.h>

/* ioctl(fd, req, ptr): 0 or positive result, or -errno. */
static inline long kvmpy_ioctl(int fd, unsigned long req, void *arg)
{
    long r = ioctl(fd, req, arg);
    return r < 0 ? -errno : r;
}

/* ioctl(fd, req, integer): for ioctls that take a value, not a pointer. */
static inline long kvmpy_ioctl_val(int fd, unsigned long req, unsigned long arg)
{
    long r = ioctl(fd, req, arg);
    return r < 0 ? -errno : r;
}

/* KVM_RUN on its own entry so the exit path is one cheap call (the GIL is
 * released around it by cffi). */
static inline long kvmpy_run(int fd)
{
    long r = ioctl(fd, KVM_RUN, 0);
    return r < 0 ? -errno : r;
}
