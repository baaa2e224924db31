"""KVM exit reasons and the fixed offsets of struct kvm_run the exit loop reads.

The offsets come from the C compiler (csrc/kvm_shim.h, at build time), so the
exit loop can unpack the fields it needs from the shared kvm_run page with one
`struct.unpack_from` instead of several attribute lookups.
"""

from __future__ import annotations

import enum

from kvmpy._kvm import lib


class ExitReason(enum.IntEnum):
    """KVM_EXIT_* from <linux/kvm.h> (the ones x86 can return)."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    X86_RDMSR = 29
    X86_WRMSR = 30
    X86_BUS_LOCK = 33
    NOTIFY = 37


class SystemEvent(enum.IntEnum):
    """KVM_SYSTEM_EVENT_* (kvm_run.system_event.type)."""

    SHUTDOWN = 1
    RESET = 2
    CRASH = 3


class InternalError(enum.IntEnum):
    """KVM_INTERNAL_ERROR_* (kvm_run.internal.suberror)."""

    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


IO_IN = 0
IO_OUT = 1

# Offsets into struct kvm_run. The exit-specific union starts at the same
# offset for every member.
RUN_EXIT_REASON = lib.KVMPY_RUN_EXIT_REASON
RUN_IF_FLAG = lib.KVMPY_RUN_IF_FLAG
RUN_IMMEDIATE_EXIT = lib.KVMPY_RUN_IMMEDIATE_EXIT
RUN_UNION = lib.KVMPY_RUN_UNION
