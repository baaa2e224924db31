/* Fails on purpose, with help: a guest that would just halt, but the test
 * that runs it gives the vCPU an invalid state (CS.L and CS.D both set)
 * through KVM_SET_SREGS. With VMX that is KVM_EXIT_FAIL_ENTRY; PVM reports a
 * triple fault before the first instruction. --mode long. */
        .code64
        .text
        .globl _start
_start:
        hlt
