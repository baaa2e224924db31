"""The one probe of /dev/kvm: what kind it is, and whether Linux can boot on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmpy.kvm.detect import KvmKind, kvm_kind, linux_kvm_status, probe


def machine(tmp_path: Path, modules: list[str], flags: str) -> tuple[Path, Path, Path]:
    dev = tmp_path / "kvm"
    dev.write_text("")
    sys_module = tmp_path / "module"
    for m in modules:
        (sys_module / m).mkdir(parents=True)
    sys_module.mkdir(exist_ok=True)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu {flags} lm\n\n")
    return dev, cpuinfo, sys_module


@pytest.mark.parametrize(("modules", "flags", "ok", "says"), [
    (["kvm", "kvm_pvm"], "", False, "PVM"),
    (["kvm", "kvm_amd"], "svm", True, "kvm_amd"),
    (["kvm", "kvm_intel"], "vmx", True, "kvm_intel"),
    (["kvm", "kvm_intel"], "", False, "no vmx"),
    (["kvm"], "vmx", False, "neither"),
])
def test_linux_kvm_status(tmp_path: Path, modules: list[str], flags: str, ok: bool,
                          says: str) -> None:
    dev, cpuinfo, sys_module = machine(tmp_path, modules, flags)
    got, why = linux_kvm_status(dev, cpuinfo, sys_module)
    assert got is ok and says in why


def test_linux_kvm_status_without_dev_kvm(tmp_path: Path) -> None:
    got, why = linux_kvm_status(tmp_path / "missing", tmp_path / "c", tmp_path / "m")
    assert not got and "does not exist" in why


def test_the_kind_and_the_linux_answer_agree(tmp_path: Path) -> None:
    for modules, flags, kind in ((["kvm_pvm"], "", KvmKind.PVM),
                                 (["kvm_amd"], "svm", KvmKind.HARDWARE),
                                 (["kvm_amd"], "", KvmKind.OTHER)):
        (tmp_path / kind.value).mkdir()
        dev, cpuinfo, sys_module = machine(tmp_path / kind.value, modules, flags)
        status = probe(dev, cpuinfo, sys_module)
        assert status.kind is kind
        assert status.can_boot_linux == linux_kvm_status(dev, cpuinfo, sys_module)[0]
    assert kvm_kind(str(tmp_path / "missing")) is KvmKind.MISSING
