/* Fails on purpose, with help: a guest that would just say 0x1234 and halt,
 * but the test that runs it gives the vCPU an invalid state through
 * KVM_SET_SREGS: SS.DPL 3 with CS.DPL 0 (SDM Vol. 3C §27.3.1.2: the CPL is
 * ambiguous). With VMX that is KVM_EXIT_FAIL_ENTRY; PVM reports a triple
 * fault before the first instruction. --mode long. */
        .code64
        .text
        .globl _start
_start:
        mov $0x1234, %rax
        push %rax
        hlt
