"""CPUID per vCPU, and the MSR values Linux expects at entry: pure functions.

What it is: `normalize_cpuid` takes the entries KVM_GET_SUPPORTED_CPUID
returned and gives the list one vCPU should get with KVM_SET_CPUID2. It
describes one package of `n_cpus` cores with one thread each, vCPU i having
APIC id i:

- leaf 0x1: EBX[31:24] initial APIC id, EBX[23:16] addressable logical ids
  (n_cpus rounded up to a power of two), EBX[15:8] CLFLUSH size 8 (64 bytes),
  EDX[28] HTT when n_cpus > 1, ECX[31] hypervisor; ECX[24] TSC-deadline set
  when the caller says KVM has it (KVM_CAP_TSC_DEADLINE_TIMER: KVM does not
  report it in the supported list), else left as KVM gave it;
- leaf 0x4 (Intel deterministic cache parameters): EAX[31:26] cores - 1,
  EAX[25:14] sharing: each core its own L1/L2, all cores share L3 and beyond;
- leaves 0xB and 0x1F (extended topology), when KVM offers them: subleaf 0 the
  thread level (1 per core), subleaf 1 the core level (n_cpus, shift enough
  bits for them), subleaf 2 invalid; EDX the x2APIC id in every subleaf;
- AMD/Hygon: leaf 0x80000008 ECX NC = n_cpus - 1 and ApicIdSize, and leaf
  0x8000001E extended APIC id and compute-unit id, when present;
- leaf 0x7.0: ECX[16] LA57 cleared, so the kernel keeps 4-level paging (the only
  kind kvmpy's tracer and gdb stub walk);
- 0x40000000: the KVM signature "KVMKVMKVM\\0\\0\\0", EAX = 0x40000001, and
  0x40000001 (KVM paravirt features) exactly as KVM gave it.

Everything else passes through unchanged. `boot_msrs` lists (index, value)
for the MSRs a vCPU starts with.

What it is not: it calls no ioctl; the machine passes in what KVM returned
and hands the result back to KVM.

Sources: Intel SDM Vol. 2A CPUID (leaves 01H, 04H, 0BH, 1FH); AMD APM Vol. 3
Appendix E (Fn8000_0008, Fn8000_001E); Linux Documentation/virt/kvm/x86/cpuid.rst.
Learned from Firecracker's cpu_config/x86_64/cpuid/normalize.rs and arch/x86_64/msr.rs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # (sic) the kernel's spelling

KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"

LEAF1_ECX_TSC_DEADLINE = 1 << 24
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28
LEAF7_ECX_LA57 = 1 << 16
CLFLUSH_LINE_SIZE = 8  # in 8-byte units: 64 bytes

TOPOLOGY_LEAVES = (0xB, 0x1F)
LEVEL_TYPE_INVALID = 0
LEVEL_TYPE_SMT = 1
LEVEL_TYPE_CORE = 2

AMD_VENDORS = (b"AuthenticAMD", b"HygonGenuine")


class CpuidEntry(NamedTuple):
    """One kvm_cpuid_entry2, without its padding."""

    function: int
    # the struct's name for the subleaf; it hides tuple.index, which nothing here uses
    index: int  # type: ignore[assignment]
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def _entry(e: CpuidEntry | Sequence[int]) -> CpuidEntry:
    return e if isinstance(e, CpuidEntry) else CpuidEntry(*e)


def _bits(value: int, lo: int, hi: int, field: int) -> int:
    """`value` with bits [hi:lo] replaced by `field` (which must fit)."""
    width = hi - lo + 1
    mask = ((1 << width) - 1) << lo
    return (value & ~mask) | ((field << lo) & mask)


def _pow2_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


def vendor(entries: Iterable[CpuidEntry]) -> bytes:
    """The 12-byte vendor string of leaf 0 (EBX, EDX, ECX), or b"" without leaf 0."""
    for e in entries:
        if e.function == 0:
            return b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx))
    return b""


def _topology_subleaves(function: int, apic_id: int, n_cpus: int) -> list[CpuidEntry]:
    core_shift = (n_cpus - 1).bit_length()
    sig = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [
        CpuidEntry(function, 0, sig, 0, 1, 0 | LEVEL_TYPE_SMT << 8, apic_id),
        CpuidEntry(function, 1, sig, core_shift, n_cpus, 1 | LEVEL_TYPE_CORE << 8, apic_id),
        CpuidEntry(function, 2, sig, 0, 0, 2 | LEVEL_TYPE_INVALID << 8, apic_id),
    ]


def normalize_cpuid(
    supported: Iterable[CpuidEntry | Sequence[int]],
    vcpu_id: int,
    n_cpus: int,
    *,
    tsc_deadline: bool = False,
) -> list[CpuidEntry]:
    """The CPUID entries for vCPU `vcpu_id` of `n_cpus` (see the module docstring)."""
    if not 0 <= vcpu_id < n_cpus:
        raise ValueError(f"vCPU {vcpu_id} out of range for {n_cpus} vCPUs")
    entries = [_entry(e) for e in supported]
    apic_id = vcpu_id
    amd = vendor(entries) in AMD_VENDORS
    out: list[CpuidEntry] = []
    topology_done: set[int] = set()
    has_signature = False
    has_features = False
    for e in entries:
        f = e.function
        if f == 1:
            ebx = _bits(e.ebx, 24, 31, apic_id)
            ebx = _bits(ebx, 16, 23, min(_pow2_at_least(n_cpus), 0xFF))
            ebx = _bits(ebx, 8, 15, CLFLUSH_LINE_SIZE)
            ecx = e.ecx | LEAF1_ECX_HYPERVISOR
            if tsc_deadline:
                ecx |= LEAF1_ECX_TSC_DEADLINE
            edx = e.edx | LEAF1_EDX_HTT if n_cpus > 1 else e.edx & ~LEAF1_EDX_HTT
            out.append(e._replace(ebx=ebx, ecx=ecx, edx=edx))
        elif f == 7 and e.index == 0:
            # 5-level paging hidden: kvmpy's page walkers (tracing, gdb) know 4 levels
            out.append(e._replace(ecx=e.ecx & ~LEAF7_ECX_LA57))
        elif f == 4:
            if e.eax & 0x1F == 0:  # cache type 0: no more caches
                out.append(e)
                continue
            level = (e.eax >> 5) & 0x7
            sharing = n_cpus - 1 if level >= 3 else 0
            eax = _bits(e.eax, 26, 31, min(n_cpus, 64) - 1)
            eax = _bits(eax, 14, 25, min(sharing, 0xFFF))
            out.append(e._replace(eax=eax))
        elif f in TOPOLOGY_LEAVES:
            # KVM may list only some subleaves (since 6.2 not 0xB.1): write all three.
            if f not in topology_done:
                out.extend(_topology_subleaves(f, apic_id, n_cpus))
                topology_done.add(f)
        elif f == 0x80000008 and amd:
            ecx = _bits(e.ecx, 0, 7, n_cpus - 1)
            ecx = _bits(ecx, 12, 15, (n_cpus - 1).bit_length())
            out.append(e._replace(ecx=ecx))
        elif f == 0x8000001E and amd:
            # EAX extended APIC id; EBX[7:0] compute unit (= core) id, [15:8] threads - 1;
            # ECX node id 0, one node per processor.
            out.append(e._replace(eax=apic_id, ebx=vcpu_id & 0xFF, ecx=0, edx=0))
        elif f == KVM_CPUID_SIGNATURE:
            has_signature = True
            out.append(_kvm_signature(e.flags))
        else:
            has_features |= f == KVM_CPUID_FEATURES
            out.append(e)
    if not has_signature:
        out.append(_kvm_signature(0))
    if not has_features:
        out.append(CpuidEntry(KVM_CPUID_FEATURES, 0, 0, 0, 0, 0, 0))
    return out


def _kvm_signature(flags: int) -> CpuidEntry:
    """Leaf 0x40000000: the hypervisor's name, and the highest hypervisor leaf."""
    ebx, ecx, edx = (int.from_bytes(KVM_SIGNATURE[i : i + 4], "little") for i in (0, 4, 8))
    return CpuidEntry(KVM_CPUID_SIGNATURE, 0, flags, KVM_CPUID_FEATURES, ebx, ecx, edx)


# --- MSRs (Intel SDM Vol. 4, Table 2-2 architectural MSRs) -----------------------
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102

MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6


def boot_msrs() -> list[tuple[int, int]]:
    """(index, value) for each MSR a vCPU starts with, as Firecracker's create_boot_msr_entries.

    The syscall MSRs are zero until the kernel sets them; the TSC starts at 0;
    fast strings are on, as firmware leaves them; MTRRs are on with write-back
    as the default type, so a kernel that reads them finds ordinary cacheable RAM.
    """
    return [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
