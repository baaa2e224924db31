"""Fatal exits explained: the state in words and the most likely cause, on kvmpy's own states."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_trace_fakes import CODE, STACK, FakeVcpu, machine

from kvmpy.diagnostics import (
    check_entry_state,
    describe_vcpu,
    diagnose,
    snapshot,
)
from kvmpy.errors import KvmIoctlError
from kvmpy.kvm.exits import ExitReason, Suberror

pytest.importorskip("capstone")
SHUTDOWN, FAIL_ENTRY = ExitReason.SHUTDOWN, ExitReason.FAIL_ENTRY
INTERNAL, EXCEPTION = ExitReason.INTERNAL_ERROR, ExitReason.EXCEPTION
IDT = 0x20000


def died(mode: str, code: bytes, rip_offset: int, reason: int = SHUTDOWN, fmt: str = "",
         *payload: object, **regs: int):  # type: ignore[no-untyped-def]
    vcpu, memory, loop = machine(mode, code)
    base = CODE if mode != "real" else 0
    vcpu.set_rip(base + rip_offset, **regs)
    vcpu.set_exit(reason, fmt, *payload)
    return vcpu, memory, loop


def install_idt(vcpu: FakeVcpu, memory, present: bool, handler: int = CODE) -> None:  # type: ignore[no-untyped-def]
    for vector in range(32):
        gate = struct.pack("<HHBBHIxxxx", handler & 0xFFFF, 0x10, 0, 0x8E if present else 0x0E,
                           handler >> 16 & 0xFFFF, handler >> 32)
        memory.write(IDT + 16 * vector, gate)
    sregs = vcpu.get_sregs()
    sregs.idt.base, sregs.idt.limit = IDT, 32 * 16 - 1
    vcpu.set_sregs(sregs)


def test_ud2_under_kvmpys_empty_idt() -> None:
    vcpu, memory, _ = died("long", bytes.fromhex("48 c7 c0 34 12 00 00 0f 0b"), 7, rax=0x1234)
    d = diagnose(snapshot(vcpu), memory)
    assert d.cause.text == ("#UD (invalid opcode) from `ud2` at 0x10007; "
                            "IDT limit is 0: the first exception triple-faults")
    assert (d.cause.rule, d.cause.vector) == ("delivery", 6)  # as data, not only words
    text = d.render()
    for words in ("most likely cause: #UD", "64-bit long mode, 4-level paging, CPL 0",
                  "RAX 0x0000000000001234", "code at 0x10007: 0f 0b",
                  "CR0 0x80010033 [PE MP ET NE WP PG]", "EFER 0xd01 [SCE LME LMA NXE]",
                  "CS  0x0010 base 0x0 limit 0xffffffff: code, execute/read, DPL 0, 64-bit",
                  "TR  0x0030 base 0x700 limit 0x67: busy 64-bit TSS",
                  "IDT 0x600 limit 0x0 (empty: any exception triple-faults)",
                  "0x00010000  48 c7 c0 34 12 00 00", "=> 0x00010007  0f 0b",
                  f"stack at {STACK:#x}:"):
        assert words in text, words


def test_divide_by_zero_names_the_register() -> None:
    vcpu, memory, _ = died("long", bytes.fromhex("31 c9 f7 f1"), 2)
    cause = diagnose(snapshot(vcpu), memory).cause
    assert cause.text.startswith("#DE (divide error): `div ecx` at 0x10002 divides by ECX = 0")
    assert cause.vector == 0


def test_a_divisor_in_memory_is_not_read_as_a_register() -> None:
    vcpu, memory, _ = died("long", bytes.fromhex("f7 33"), 0, rbx=0x2000)  # div [rbx]
    cause = diagnose(snapshot(vcpu), memory).cause
    assert "divides by" not in cause.text


def test_long_mode_without_pae_from_the_guest() -> None:
    vcpu, memory, _ = died("protected", bytes.fromhex("0f 22 c0"), 0, rax=0x80000033)
    sregs = vcpu.get_sregs()
    sregs.efer = 1 << 8  # the guest has set EFER.LME already
    vcpu.set_sregs(sregs)
    cause = diagnose(snapshot(vcpu), memory).cause
    assert cause.text.startswith("long mode requested but CR4.PAE is clear: `mov cr0, eax`")
    assert "IDT limit is 0" in cause.text and cause.vector == 13


def test_a_gate_that_is_not_present() -> None:
    vcpu, memory, _ = died("long", bytes.fromhex("0f 0b"), 0)
    install_idt(vcpu, memory, present=False)
    assert diagnose(snapshot(vcpu), memory).cause.text == (
        "#UD (invalid opcode) from `ud2` at 0x10000; IDT entry 6 (#UD) is not present")


def test_a_good_gate_but_no_stack() -> None:
    vcpu, memory, _ = died("long", bytes.fromhex("0f 0b"), 0, rsp=0x2_0000_0000)
    install_idt(vcpu, memory, present=True)
    cause = diagnose(snapshot(vcpu), memory).cause.text
    assert cause.endswith("the stack pointer 0x200000000 is not mapped: the CPU cannot push "
                          "the exception frame")
    assert "not mapped or outside guest RAM" in diagnose(snapshot(vcpu), memory).render()


def test_page_fault_on_data_names_cr2() -> None:
    vcpu, memory, _ = died("long", bytes.fromhex("48 8b 03"), 0, rbx=0x2_0000_0000)
    sregs = vcpu.get_sregs()
    sregs.cr2 = 0x2_0000_0000
    vcpu.set_sregs(sregs)
    assert diagnose(snapshot(vcpu), memory).cause.text.startswith(
        "#PF (page fault): `mov rax, qword ptr [rbx]` at 0x10000 touched 0x200000000, "
        "which is not mapped")


def test_emulation_failure_outside_ram() -> None:
    vcpu, memory, _ = died("long", b"", 0x40000000 - CODE, INTERNAL, "<II",
                           Suberror.EMULATION, 0)
    d = diagnose(snapshot(vcpu), memory)
    assert d.cause.text.startswith("RIP points outside guest RAM (0x40000000 is guest-physical "
                              "0x40000000)")
    assert "code at RIP: gpa 0x40000000, not in guest RAM" in d.render()


def test_emulation_failure_on_an_instruction_pvm_cannot_emulate() -> None:
    vcpu, memory, _ = died("long", b"\xcc", 0, INTERNAL, "<IIQ", Suberror.EMULATION, 1, 5)
    d = diagnose(snapshot(vcpu), memory)
    assert d.cause.text.startswith("KVM's instruction emulator cannot execute `int3` at 0x10000")
    assert "internal error: emulation; data [0x5]" in d.render()


def test_unhandled_guest_exception_exit() -> None:
    vcpu, memory, _ = died("long", bytes.fromhex("0f 0b"), 0, EXCEPTION, "<II", 6, 0)
    assert diagnose(snapshot(vcpu), memory).cause.text == (
        "unhandled guest exception #UD (invalid opcode): #UD (invalid opcode) from `ud2` at "
        "0x10000")


def test_failed_entry_names_the_broken_rule_and_the_vmx_reason() -> None:
    vcpu, memory, _ = died("long", b"\xf4", 0, FAIL_ENTRY, "<QI", 0x80000021, 3)
    sregs = vcpu.get_sregs()
    sregs.cs.db = 1
    vcpu.set_sregs(sregs)
    d = diagnose(snapshot(vcpu), memory)
    assert d.cause.text == "CS.L and CS.D are both set: not a valid 64-bit code segment"
    assert ("entry failure: hardware reason 0x80000021 (VMX entry failure: invalid guest "
            "state), host cpu 3") in d.render()


def test_pvm_reports_an_invalid_entry_state_as_a_triple_fault() -> None:
    vcpu, memory, _ = died("long", b"\xf4", 0)
    sregs = vcpu.get_sregs()
    sregs.gdt.limit = 0
    vcpu.set_sregs(sregs)
    assert diagnose(snapshot(vcpu), memory).cause.text == (
        "CS selector 0x10 is beyond the GDT limit 0x0 (the vCPU state is invalid for its mode)")


def test_kvmpys_own_states_pass_the_entry_checks() -> None:
    for mode in ("real", "protected", "long"):
        vcpu, memory, _ = machine(mode)
        assert check_entry_state(vcpu.get_sregs(), vcpu.get_regs(), memory) == [], mode


@pytest.mark.parametrize("change,message", [
    (lambda s: setattr(s, "cr4", s.cr4 & ~(1 << 5)), "long mode requested but CR4.PAE is clear"),
    (lambda s: setattr(s, "cr0", s.cr0 & ~1), "CR0.PG is set but CR0.PE is clear"),
    (lambda s: setattr(s, "efer", s.efer & ~(1 << 10)),
     "EFER.LMA does not match EFER.LME and CR0.PG"),
    (lambda s: setattr(s.ss, "dpl", 3), "SS.DPL (3) differs from the CPL in CS (0)"),
    (lambda s: setattr(s.tr, "unusable", 1), "TR is not usable"),
    (lambda s: setattr(s.tr, "type", 9), "TR type 0x9 is not a busy 64-bit TSS"),
    (lambda s: setattr(s.cs, "type", 3), "CS type 0x3 is not a code segment"),
    (lambda s: setattr(s, "cr3", 0x7FFF_F000), "CR3 0x7ffff000 points outside guest RAM"),
])
def test_entry_checks(change, message: str) -> None:  # type: ignore[no-untyped-def]
    vcpu, memory, _ = machine("long")
    sregs = vcpu.get_sregs()
    change(sregs)
    assert any(p.startswith(message) for p in check_entry_state(sregs, None, memory)), message


def test_non_canonical_rip() -> None:
    vcpu, memory, _ = died("long", b"", 0, SHUTDOWN)
    vcpu.set_rip(0x8000_0000_0000_0000)
    assert diagnose(snapshot(vcpu), memory).cause.text.startswith(
        "RIP 0x8000000000000000 is not canonical")


def test_state_that_cannot_be_read_is_said_so() -> None:
    class Broken(FakeVcpu):
        def get_regs(self):  # type: ignore[no-untyped-def]
            raise KvmIoctlError("KVM_GET_REGS", 5)

    assert "vCPU state unavailable" in describe_vcpu(Broken(), None)  # type: ignore[arg-type]


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(code=st.binary(max_size=16), rip=st.integers(0, 2**64 - 1), rsp=st.integers(0, 2**64 - 1),
       cr2=st.integers(0, 2**64 - 1), idt_base=st.integers(0, 2**32 - 1),
       idt_limit=st.integers(0, 0xFFFF), gdt_limit=st.integers(0, 0xFFFF),
       reason=st.sampled_from([SHUTDOWN, FAIL_ENTRY, INTERNAL, EXCEPTION, ExitReason.DEBUG]),
       mode=st.sampled_from(["real", "protected", "long"]), garbage=st.binary(min_size=64,
                                                                            max_size=64))
def test_any_guest_state_gets_a_diagnosis(code: bytes, rip: int, rsp: int, cr2: int,
                                          idt_base: int, idt_limit: int, gdt_limit: int,
                                          reason: int, mode: str, garbage: bytes) -> None:
    vcpu, memory, _ = machine(mode, code or b"\x90")
    memory.write(IDT, garbage)
    vcpu.set_rip(rip, rsp=rsp)
    sregs = vcpu.get_sregs()
    sregs.cr2, sregs.idt.base, sregs.idt.limit, sregs.gdt.limit = cr2, idt_base, idt_limit, \
        gdt_limit
    vcpu.set_sregs(sregs)
    vcpu.set_exit(reason)
    vcpu.page[32:96] = garbage  # whatever the exit payload holds
    d = diagnose(snapshot(vcpu), memory)
    assert d.cause.text and "most likely cause" in d.render()


def test_a_vcpu_reset_by_kvm_on_its_triple_fault_is_said_to_be_so() -> None:
    # kvm_amd INITs a vCPU on a SHUTDOWN intercept: the lab's one rare triple fault
    # (2026-11-26) came back as vCPU 1 at f000:fff0, which is no place it ran
    vcpu, memory, _ = died("real", b"\xf4", 0)
    sregs = vcpu.get_sregs()
    sregs.cs.selector, sregs.cs.base = 0xF000, 0xFFFF0000
    vcpu.set_sregs(sregs)
    vcpu.set_rip(0xFFF0)
    assert diagnose(snapshot(vcpu), memory).cause.text.startswith(
        "the registers are the vCPU's INIT state (real mode, CS:IP f000:fff0), not where it died")


def test_a_rip_of_the_hosts_kernel_is_named(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """What a vCPU handed its host's state looks like (the lab, kvm_amd after VMRUN)."""
    from test_hostsyms import KALLSYMS

    from kvmpy import hostsyms

    path = tmp_path / "kallsyms"
    path.write_text(KALLSYMS)
    monkeypatch.setattr(hostsyms, "KALLSYMS", str(path))
    vcpu, memory, _ = died("long", bytes.fromhex("90"), 0xFFFFFFFFC044520C - CODE)
    d = diagnose(snapshot(vcpu), memory)
    assert d.cause.text.startswith("RIP 0xffffffffc044520c is not mapped by the page tables; it is "
                              "this host kernel's [kvm_amd] __svm_vcpu_run+0x9c: the vCPU "
                              "carries its host's state")
    assert "RIP is this host kernel's [kvm_amd] __svm_vcpu_run+0x9c" in describe_vcpu(vcpu, memory)

