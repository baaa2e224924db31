"""kvmpy.isolation.seccomp's lists and rules (the filters themselves are tested on real
runs: tests/kvm/test_isolation.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kvmpy.errors import ConfigError
from kvmpy.isolation import seccomp


def test_every_listed_call_exists_on_this_architecture() -> None:
    for role, names in seccomp.ROLES.items():
        unknown = sorted(n for n in names if seccomp.syscall_number(n) < 0)
        assert unknown == [], role


def test_numbers_and_names_round_trip() -> None:
    assert seccomp.syscall_number("execve") == 59
    assert seccomp.syscall_name(59) == "execve"
    assert seccomp.syscall_name(100_000) is None
    assert seccomp.syscall_name(-1) is None


def test_the_reports_table_names_every_call_by_its_number() -> None:
    """The SIGSYS report's table, built into the shim: each name is libseccomp's for
    that number, and every call a list allows (or denies, for the report) has one."""
    named = {nr: seccomp.syscall_name(nr) for nr in range(512)}
    assert all(seccomp.syscall_number(name) == nr for nr, name in named.items() if name)
    wanted = set().union(*seccomp.ROLES.values()) | {"execve", "ptrace", "socket", "fork"}
    assert wanted <= set(named.values())


def test_the_programs_are_compiled_once_and_kept(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`programs` compiles into the cache, and a later start reads them back (the same
    bytes) instead of compiling; an entry that is not a set of programs is compiled
    again."""
    monkeypatch.setenv("KVMPY_CACHE", str(tmp_path))
    monkeypatch.setattr(seccomp, "_programs", {})
    compiled = seccomp.programs("kill")
    assert compiled["vcpu"] == b"".join(
        struct.pack("<HBBI", *i) for i in seccomp.bpf(seccomp.VCPU))
    [kept] = (tmp_path / "seccomp").iterdir()
    monkeypatch.setattr(seccomp, "_programs", {})
    monkeypatch.setattr(seccomp, "_export", lambda *a: pytest.fail("compiled again"))
    assert seccomp.programs("kill") == compiled
    kept.write_bytes(b"\x00" * 9)
    monkeypatch.undo()
    monkeypatch.setenv("KVMPY_CACHE", str(tmp_path))
    monkeypatch.setattr(seccomp, "_programs", {})
    assert seccomp.programs("kill") == compiled


def test_the_roles_narrow_the_union() -> None:
    """A thread narrows the process filter (MAIN), so its role must fit inside it."""
    assert seccomp.VCPU <= seccomp.IO <= seccomp.MAIN
    for escape in ("execve", "execveat", "ptrace", "process_vm_readv", "fork", "vfork"):
        assert escape not in seccomp.MAIN


def test_arguments_are_checked_where_a_call_could_escape() -> None:
    rules = dict(seccomp._rules({"clone", "socket", "read"}))
    clone, sock, read = (seccomp.syscall_number(n) for n in ("clone", "socket", "read"))
    assert rules[clone] == [(0, seccomp._CMP_MASKED_EQ, seccomp.CLONE_THREAD,
                             seccomp.CLONE_THREAD)]  # threads, not processes
    assert rules[sock] == [(0, seccomp._CMP_EQ, seccomp.AF_UNIX, 0)]
    assert rules[read] == []


def test_unknown_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--seccomp strict"):
        seccomp.Seccomp("strict")


AUDIT_ARCH_X86_64 = 0xC000003E
KVM_RUN, TCGETS = 0xAE80, 0x5401


def run_bpf(program: list[tuple[int, int, int, int]], nr: int, args: tuple[int, ...] = ()
            ) -> tuple[int, int]:
    """Run a seccomp program on (nr, x86-64, args) as the kernel would: its answer and
    the instructions it took. Only what libseccomp emits: loads of struct seccomp_data
    words, conditional jumps on constants, AND, and returns."""
    args = (*args, 0, 0, 0, 0, 0, 0)[:6]
    data = {0: nr, 4: AUDIT_ARCH_X86_64}
    for i, value in enumerate(args):
        data[16 + 8 * i], data[20 + 8 * i] = value & 0xFFFFFFFF, value >> 32
    pc = acc = steps = 0
    while True:
        code, jt, jf, k = program[pc]
        steps += 1
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            acc = data[k]
        elif code == 0x54:  # BPF_ALU | BPF_AND | BPF_K
            acc &= k
        elif code == 0x06:  # BPF_RET | BPF_K
            return k, steps
        elif code == 0x05:  # BPF_JMP | BPF_JA
            pc += k
        else:  # BPF_JMP | JEQ/JGT/JGE/JSET | BPF_K
            taken = {0x15: acc == k, 0x25: acc > k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        pc += 1


def test_the_compiled_filters_allow_kvm_run_at_once_and_stop_escapes() -> None:
    """What the kernel will run: KVM_RUN, the one call checked at every call (the
    others' answers are cached per number), is allowed within a dozen instructions by
    each of a vCPU thread's two filters; escapes trap."""
    ioctl, socket, execve, read = (seccomp.syscall_number(n)
                                   for n in ("ioctl", "socket", "execve", "read"))
    for names in (seccomp.VCPU, seccomp.IO, seccomp.MAIN):
        program = seccomp.bpf(names)
        answer, steps = run_bpf(program, ioctl, (5, KVM_RUN))
        assert answer == seccomp._ACT_ALLOW and steps <= 16, steps
        assert run_bpf(program, ioctl, (0, TCGETS))[0] == seccomp._ACT_ALLOW
        assert run_bpf(program, ioctl, (5, 0x8912))[0] == seccomp._ACT_TRAP  # SIOCGIFCONF
        assert run_bpf(program, read)[0] == seccomp._ACT_ALLOW
        unix = seccomp._ACT_ALLOW if "socket" in names else seccomp._ACT_TRAP
        assert run_bpf(program, socket, (seccomp.AF_UNIX,))[0] == unix
        assert run_bpf(program, socket, (seccomp.AF_INET,))[0] == seccomp._ACT_TRAP
        assert run_bpf(program, execve)[0] == seccomp._ACT_TRAP
    assert run_bpf(seccomp.bpf(seccomp.VCPU, "log"), execve)[0] == seccomp._ACT_LOG
