"""kvmpy.boot.kconfig: the whole-file parser and the few-options scan agree."""

from kvmpy.boot.kconfig import kconfig_options, parse_kconfig

CONFIG = """\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_ACPI_SPCR_TABLE=y
CONFIG_ACPI=y
# CONFIG_X86_MPPARSE is not set
CONFIG_CMDLINE="console=ttyS0 quiet"
CONFIG_NR_CPUS=64
CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=m
# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES_EXTRA is not set
"""
NAMES = ("CONFIG_ACPI", "CONFIG_X86_MPPARSE", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
         "CONFIG_CMDLINE", "CONFIG_NOT_THERE")


def test_the_scan_gives_what_the_parser_gives_for_the_names_asked() -> None:
    whole = parse_kconfig(CONFIG)
    picked = kconfig_options(CONFIG, NAMES)
    assert picked == {n: whole[n] for n in NAMES if n in whole}
    # a longer name with the same prefix is not the option asked for
    assert picked == {"CONFIG_ACPI": "y", "CONFIG_X86_MPPARSE": "n",
                      "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES": "m",
                      "CONFIG_CMDLINE": '"console=ttyS0 quiet"'}


def test_trailing_blanks_and_crlf_do_not_change_values() -> None:
    text = "CONFIG_ACPI=y  \r\n# CONFIG_X86_MPPARSE is not set\r\n"
    assert kconfig_options(text, NAMES) == parse_kconfig(text) == {
        "CONFIG_ACPI": "y", "CONFIG_X86_MPPARSE": "n"}
