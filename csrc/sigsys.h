/*
 * seccomp's C side (kvmpy/isolation/seccomp.py): a compiled filter handed to the
 * kernel, each thread's name, and the SIGSYS handler behind `--seccomp kill`.
 *
 * A call the filter denies traps (SECCOMP_RET_TRAP): the kernel skips it and sends
 * the calling thread SIGSYS with the call's number in si_syscall. No Python can run
 * there (the thread may hold the GIL, or be halfway through a C call), so this
 * handler is C and uses only write(2) and tgkill(2), which every thread's list allows:
 * it prints one line naming the call, from the table of names written into the shim
 * when it was built (kvmpy_syscall_names, csrc/build_shim.py), and
 * sends its thread SIGSYS again, now at its default action (SA_RESETHAND), which ends
 * the whole process as SECCOMP_RET_KILL_PROCESS would (status 128 + SIGSYS = 159 if
 * it cannot: PID 1 of a namespace ignores its own default-action signals).
 */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static __thread const char *kvmpy_sigsys_role = "main";

/* System call `nr`'s name on this architecture; NULL if the table has none. */
static const char *kvmpy_syscall_name(int nr)
{
    return nr >= 0 && nr < KVMPY_SYSCALLS ? kvmpy_syscall_names[nr] : NULL;
}

static void kvmpy_sigsys_put(const char *s)
{
    ssize_t r = write(2, s, strlen(s));
    (void)r;
}

static void kvmpy_sigsys_handler(int sig, siginfo_t *info, void *ctx)
{
    char number[24];
    int n = info->si_syscall, i = sizeof number - 1;
    unsigned int u = n < 0 ? 0 : (unsigned int)n;
    (void)ctx;
    number[i] = 0;
    do {
        number[--i] = (char)('0' + u % 10);
        u /= 10;
    } while (u && i > 0);
    kvmpy_sigsys_put("kvmpy: seccomp: the ");
    kvmpy_sigsys_put(kvmpy_sigsys_role);
    kvmpy_sigsys_put(" thread called ");
    kvmpy_sigsys_put(kvmpy_syscall_name(n) ? kvmpy_syscall_name(n)
                                           : "an unknown system call");
    kvmpy_sigsys_put(" (");
    kvmpy_sigsys_put(number + i);
    kvmpy_sigsys_put("), which its allow-list denies: killed by SIGSYS\n");
    /* unblocked, at its default action now: this ends the process, unless it is
     * PID 1 of a namespace (--jail), which the kernel keeps from killing itself */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    syscall(SYS_tgkill, getpid(), syscall(SYS_gettid), sig);
    syscall(SYS_exit_group, 128 + sig);
}

/* Install the handler. */
static int kvmpy_sigsys_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = kvmpy_sigsys_handler;
    sa.sa_flags = SA_SIGINFO | SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGSYS, &sa, NULL);
}

/* The calling thread's role, named in the report (a string that lives forever), and
 * its name where the kernel shows it: "kvmpy-ROLE" (/proc/TID/comm, top -H, the
 * audit lines of --seccomp log; 15 characters at most). */
static void kvmpy_name_thread(const char *role)
{
    char comm[16];
    kvmpy_sigsys_role = role;
    snprintf(comm, sizeof comm, "kvmpy-%s", role);
    prctl(PR_SET_NAME, comm, 0, 0, 0);
}

/* Hand the kernel a compiled filter of `count` instructions for this thread, or with
 * `all_threads` for every thread of the process (TSYNC), as libseccomp's seccomp_load
 * would: no_new_privs first (required without CAP_SYS_ADMIN). 0; -errno; or the id of
 * a thread that could not take it (TSYNC: one with a filter of its own). */
static long kvmpy_seccomp_load(const void *filter, unsigned short count, int all_threads)
{
    struct sock_fprog prog = {count, (struct sock_filter *)filter};
    long r;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -errno;
    r = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                all_threads ? SECCOMP_FILTER_FLAG_TSYNC : 0, &prog);
    return r < 0 ? -errno : r;
}
