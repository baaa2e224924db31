"""kvmpy.lab.symbols and the monitor's report: a stalled lab CPU's RIP, named."""

from __future__ import annotations

from pathlib import Path

from kvmpy.lab.monitor import describe
from kvmpy.lab.symbols import lab_symbolizer, module_bases, save_kallsyms

# The lab kernel's code symbols as its first run read them (abridged), and its modules then.
KALLSYMS = """\
ffffffff81a59180 T default_idle
ffffffff81a592e0 T native_safe_halt
ffffffff81a59300 t amd_e400_idle
ffffffffc0445170 t __svm_vcpu_run\t[kvm_amd]
ffffffffc0446000 t svm_vcpu_run\t[kvm_amd]
"""
MODULES_THEN = ("kvm_amd 184320 0 - Live 0xffffffffc0431000\n"
                "kvm 1146880 1 kvm_amd, Live 0xffffffffc0800000\n")
# a later run: kvm_amd loaded 0x10000 higher, ccp's address hidden
MODULES_NOW = ("kvm_amd 184320 0 - Live 0xffffffffc0441000\n"
               "ccp 118784 1 kvm_amd, Live 0x0000000000000000\n")


def symbols(tmp_path: Path) -> Path:
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text(KALLSYMS)
    (tmp_path / "kallsyms.modules").write_text(MODULES_THEN)
    (tmp_path / "now").write_text(MODULES_NOW)
    return kallsyms


def test_module_bases_skip_hidden_addresses() -> None:
    assert module_bases(MODULES_NOW) == {"kvm_amd": (0xFFFFFFFFC0441000, 184320)}


def test_kernel_and_module_addresses_are_named(tmp_path: Path) -> None:
    name = lab_symbolizer(symbols(tmp_path), tmp_path / "now")
    assert name(0xFFFFFFFF81A592EB) == "native_safe_halt+0xb"
    # __svm_vcpu_run+0x9c as loaded in this run: moved back to where kallsyms was read
    assert name(0xFFFFFFFFC045520C) == "[kvm_amd] __svm_vcpu_run+0x9c"
    assert name(0x401000) is None  # user space


def test_without_kept_symbols_a_module_address_is_module_plus_offset(tmp_path: Path) -> None:
    (tmp_path / "now").write_text(MODULES_NOW)
    name = lab_symbolizer(tmp_path / "kallsyms", tmp_path / "now")
    assert name(0xFFFFFFFFC045520C) == "[kvm_amd]+0x1420c"
    assert name(0xFFFFFFFF81A592EB) is None


def test_the_first_run_s_symbols_are_kept_once(tmp_path: Path) -> None:
    job, image = tmp_path / "job", tmp_path / "image"
    job.mkdir()
    image.mkdir()
    (job / "kallsyms").write_text(KALLSYMS)
    (job / "modules").write_text(MODULES_THEN)
    save_kallsyms(job, image / "kallsyms")
    assert (image / "kallsyms").read_text() == KALLSYMS
    assert (image / "kallsyms.modules").read_text() == MODULES_THEN
    (job / "kallsyms").write_text("ffffffff81000000 T other\n")
    save_kallsyms(job, image / "kallsyms")
    assert (image / "kallsyms").read_text() == KALLSYMS


_REGISTERS = """
CPU#0
RIP=ffffffff81a592eb RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
"""
_LAPIC0 = "dumping local APIC state for CPU 0 \n\nISR\t (none)\nIRR\t 236 \n"


def test_monitor_report_names_each_rip(tmp_path: Path) -> None:
    name = lab_symbolizer(symbols(tmp_path), tmp_path / "now")
    assert describe(_REGISTERS, [_LAPIC0], name) == (
        "cpu0 rip=ffffffff81a592eb (native_safe_halt+0xb) cpl=0 halted if=1 irr=236")
