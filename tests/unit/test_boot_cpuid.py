"""CPUID per vCPU: APIC ids, topology, hypervisor bit and KVM leaves; the boot MSR list."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy.boot.cpuid import (
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    MSR_IA32_MISC_ENABLE,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_TSC,
    MSR_KERNEL_GS_BASE,
    MSR_LSTAR,
    MSR_STAR,
    CpuidEntry,
    boot_msrs,
    normalize_cpuid,
    vendor,
)


def regs(name: bytes) -> tuple[int, int, int]:
    """Vendor string as leaf-0 EBX, EDX, ECX."""
    return tuple(int.from_bytes(name[i : i + 4], "little") for i in (0, 4, 8))  # type: ignore


def leaf0(name: bytes, max_leaf: int = 0x1F) -> CpuidEntry:
    ebx, edx, ecx = regs(name)
    return CpuidEntry(0, 0, 0, max_leaf, ebx, ecx, edx)


SIG = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
# Shaped like KVM_GET_SUPPORTED_CPUID on an Intel host (host APIC id 7 leaks into leaf 1).
INTEL = [
    leaf0(b"GenuineIntel"),
    CpuidEntry(1, 0, 0, 0x000906EA, 0x07100800, 0x7EFAFBBF, 0xBFEBFBFF & ~(1 << 28)),
    CpuidEntry(4, 0, SIG, 0x1C004121, 0x01C0003F, 0x3F, 0),  # L1d
    CpuidEntry(4, 1, SIG, 0x1C004122, 0x01C0003F, 0x3F, 0),  # L1i
    CpuidEntry(4, 2, SIG, 0x1C004143, 0x00C0003F, 0x3FF, 0),  # L2
    CpuidEntry(4, 3, SIG, 0x1C03C163, 0x03C0003F, 0x2FFF, 6),  # L3
    CpuidEntry(4, 4, SIG, 0, 0, 0, 0),
    CpuidEntry(7, 0, SIG, 0, 0x029C67AF, 0, 0),
    CpuidEntry(0xB, 0, SIG, 1, 2, 0x100, 7),
    CpuidEntry(0x1F, 0, SIG, 1, 2, 0x100, 7),
    CpuidEntry(0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
    CpuidEntry(0x40000001, 0, 0, 0x01007AFB, 0, 0, 0),
    CpuidEntry(0x80000008, 0, 0, 0x3027, 0, 0, 0),
]
AMD = [
    leaf0(b"AuthenticAMD", 0x10),
    CpuidEntry(1, 0, 0, 0x00A00F11, 0x03100800, 0x7ED8320B, 0x178BFBFF),
    CpuidEntry(0x80000008, 0, 0, 0x3030, 0, 0x0000700F, 0),
    CpuidEntry(0x8000001E, 0, 0, 0x3, 0x0103, 0x0300, 0),
]


def find(entries, function, index=0):
    found = [e for e in entries if e.function == function and e.index == index]
    assert len(found) == 1, (hex(function), index, found)
    return found[0]


@pytest.mark.parametrize(("vcpu", "n"), [(0, 1), (0, 2), (1, 2), (3, 4), (4, 5), (7, 8)])
def test_intel_topology(vcpu, n):
    out = normalize_cpuid(INTEL, vcpu, n)
    l1 = find(out, 1)
    assert l1.ebx >> 24 == vcpu
    assert (l1.ebx >> 16) & 0xFF == 1 << (n - 1).bit_length()
    assert (l1.ebx >> 8) & 0xFF == 8
    assert l1.ebx & 0xFF == INTEL[1].ebx & 0xFF
    assert l1.ecx >> 31 == 1  # hypervisor
    assert (l1.edx >> 28) & 1 == (n > 1)  # HTT
    assert l1.eax == INTEL[1].eax
    for index in range(4):
        eax = find(out, 4, index).eax
        assert eax >> 26 == n - 1
        level = (eax >> 5) & 7
        assert (eax >> 14) & 0xFFF == (n - 1 if level == 3 else 0)
        assert eax & 0x3FFF == INTEL[2 + index].eax & 0x3FFF
    assert find(out, 4, 4) == INTEL[6]
    for leaf in (0xB, 0x1F):
        smt, core, end = (find(out, leaf, i) for i in range(3))
        assert (smt.eax, smt.ebx, smt.ecx) == (0, 1, 0x100)
        assert (core.eax & 0x1F, core.ebx, core.ecx) == ((n - 1).bit_length(), n, 0x201)
        assert (end.eax, end.ebx, end.ecx & 0xFF00) == (0, 0, 0)
        assert smt.edx == core.edx == end.edx == vcpu  # x2APIC id
        assert all(e.flags & SIG for e in (smt, core, end))
        # every vCPU's id fits below the core level's shift: one package
        assert vcpu >> (core.eax & 0x1F) == 0
    assert find(out, 7) == INTEL[7]
    assert find(out, 0x40000001) == INTEL[11]  # KVM's paravirt features as given
    assert find(out, 0x80000008) == INTEL[12]  # AMD-only fields untouched on Intel


def test_kvm_signature_leaf():
    sig = find(normalize_cpuid(INTEL, 0, 1), 0x40000000)
    name = b"".join(r.to_bytes(4, "little") for r in (sig.ebx, sig.ecx, sig.edx))
    assert name == b"KVMKVMKVM\0\0\0" and sig.eax == 0x40000001


def test_missing_kvm_leaves_are_added():
    out = normalize_cpuid(INTEL[:2], 0, 1)
    assert find(out, 0x40000000).eax == 0x40000001
    assert find(out, 0x40000001) == CpuidEntry(0x40000001, 0, 0, 0, 0, 0, 0)


def test_tsc_deadline_only_when_asked():
    assert not find(normalize_cpuid(INTEL, 0, 1), 1).ecx & (1 << 24)
    assert find(normalize_cpuid(INTEL, 0, 1, tsc_deadline=True), 1).ecx & (1 << 24)


def test_amd_core_count_and_extended_apic_id():
    assert vendor(AMD) == b"AuthenticAMD"
    out = normalize_cpuid(AMD, 2, 3)
    ecx = find(out, 0x80000008).ecx
    assert ecx & 0xFF == 2 and (ecx >> 12) & 0xF == 2
    assert find(out, 0x80000008).eax == 0x3030
    e = find(out, 0x8000001E)
    assert (e.eax, e.ebx & 0xFF, (e.ebx >> 8) & 0xFF, e.ecx) == (2, 2, 0, 0)
    assert find(out, 1).ebx >> 24 == 2


def test_tuples_are_accepted():
    out = normalize_cpuid([(1, 0, 0, 1, 2, 3, 4)], 0, 1)
    assert find(out, 1).ecx == 3 | 1 << 31


def test_vcpu_out_of_range():
    with pytest.raises(ValueError):
        normalize_cpuid(INTEL, 2, 2)


@given(st.integers(1, 254), st.data())
def test_every_vcpu_gets_its_own_apic_id(n, data):
    vcpu = data.draw(st.integers(0, n - 1))
    out = normalize_cpuid(INTEL, vcpu, n)
    assert find(out, 1).ebx >> 24 == vcpu
    assert find(out, 0xB, 1).ebx == n
    assert all(e.edx == vcpu for e in out if e.function in (0xB, 0x1F))
    assert all(0 <= r < 1 << 32 for e in out for r in (e.eax, e.ebx, e.ecx, e.edx))


def test_boot_msrs():
    msrs = dict(boot_msrs())
    assert len(msrs) == len(boot_msrs())  # no MSR twice
    for index in (MSR_IA32_SYSENTER_CS, 0x175, 0x176, MSR_STAR, MSR_LSTAR, 0xC0000083,
                  0xC0000084, MSR_KERNEL_GS_BASE, MSR_IA32_TSC):
        assert msrs[index] == 0
    assert msrs[MSR_IA32_MISC_ENABLE] & 1  # fast strings
    assert msrs[0x2FF] == 0x806  # MTRRs on, default type write-back


def test_la57_is_hidden_so_the_guest_keeps_4_level_paging():
    from kvmpy.boot.cpuid import LEAF7_ECX_LA57, normalize_cpuid

    leaf7 = (7, 0, 1, 0, 0, LEAF7_ECX_LA57 | 1, 0)
    out = normalize_cpuid([leaf7], 0, 1)
    (entry,) = [e for e in out if e.function == 7]
    assert entry.ecx == 1
