"""A guest RIP that is an address of the host's kernel is named, from /proc/kallsyms."""

from __future__ import annotations

from pathlib import Path

from kvmpy.hostsyms import host_kernel_symbol

# the shape of /proc/kallsyms, with the lab's kvm_amd as it was when a guest was found
# at 0xffffffffc044520c: __svm_vcpu_run at base + 0x14170, its VMRUN 3 bytes before
KALLSYMS = """\
ffffffff81000000 T _text
ffffffff81001000 T do_one_initcall
ffffffffc0431000 t svm_hardware_enable\t[kvm_amd]
ffffffffc0445170 t __svm_vcpu_run\t[kvm_amd]
ffffffffc0445380 t __svm_sev_es_vcpu_run\t[kvm_amd]
ffffffffc0446000 d .LC19\t[kvm_amd]
"""


def kallsyms(tmp_path: Path, text: str) -> str:
    path = tmp_path / "kallsyms"
    path.write_text(text)
    return str(path)


def test_an_address_in_a_module_is_named_with_its_module(tmp_path: Path) -> None:
    assert host_kernel_symbol(0xFFFFFFFFC044520C, kallsyms(tmp_path, KALLSYMS)) == \
        "[kvm_amd] __svm_vcpu_run+0x9c"
    assert host_kernel_symbol(0xFFFFFFFF81001010, kallsyms(tmp_path, KALLSYMS)) == \
        "do_one_initcall+0x10"


def test_no_claim_for_guest_addresses_data_or_hidden_kallsyms(tmp_path: Path) -> None:
    path = kallsyms(tmp_path, KALLSYMS)
    assert host_kernel_symbol(0x10000, path) is None  # not in the kernel half
    assert host_kernel_symbol(0xFFFFFFFF80000000, path) is None  # below every symbol
    assert host_kernel_symbol(0xFFFFFFFFC0445390, path) == "[kvm_amd] __svm_sev_es_vcpu_run+0x10"
    assert host_kernel_symbol(0xFFFFFFFFC0446010, path) is None  # module data, not code
    assert host_kernel_symbol(0xFFFFFFFFF0000000, path) is None  # far past the last one
    hidden = "".join("0000000000000000" + line[16:] for line in KALLSYMS.splitlines(True))
    assert host_kernel_symbol(0xFFFFFFFFC044520C, kallsyms(tmp_path, hidden)) is None
    assert host_kernel_symbol(0xFFFFFFFFC044520C, str(tmp_path / "missing")) is None
