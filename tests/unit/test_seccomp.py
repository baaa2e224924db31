"""kvmpy.isolation.seccomp's lists and rules (the filters themselves are tested on real
runs: tests/kvm/test_isolation.py)."""

from __future__ import annotations

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
