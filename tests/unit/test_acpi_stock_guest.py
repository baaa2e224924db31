"""A distribution kernel's guest, without booting it: the ACPI choice, the module tree,
the initramfs that loads the modules, and reading a kernel log for ACPI complaints."""

from __future__ import annotations

import gzip
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy import initramfs
from kvmpy.acpi import choice
from kvmpy.acpi.choice import AcpiMode, choose_acpi, find_kernel_config, kernel_release
from kvmpy.acpi.linuxlog import acpi_complaints
from kvmpy.initramfs import INIT_MARKER, InitramfsError, find_modules_dir, read_newc
from tests.unit.test_initramfs import write_tree

MINIMAL_CONFIG = "CONFIG_ACPI=y\nCONFIG_X86_MPPARSE=y\nCONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y\n"
CLOUD_CONFIG = ("CONFIG_ACPI=y\n# CONFIG_X86_MPPARSE is not set\nCONFIG_VIRTIO_MMIO=m\n")


def fake_bzimage(path: Path, version: str) -> Path:
    """The parts of a bzImage `kernel_release` reads: "HdrS" and kernel_version."""
    image = bytearray(0x800)
    image[choice.HEADER_MAGIC_OFFSET:choice.HEADER_MAGIC_OFFSET + 4] = choice.HEADER_MAGIC
    pointer = 0x400
    struct.pack_into("<H", image, choice.KERNEL_VERSION_OFFSET, pointer)
    text = version.encode() + b"\0"
    at = pointer + choice.KERNEL_VERSION_BIAS
    image[at:at + len(text)] = text
    path.write_bytes(bytes(image))
    return path


# --- which description ----------------------------------------------------------------------
def test_kernel_release_from_the_setup_header(tmp_path: Path) -> None:
    kernel = fake_bzimage(tmp_path / "vmlinuz", "6.1.0-28-cloud-amd64 (debian-kernel@lists) #1")
    assert kernel_release(kernel) == "6.1.0-28-cloud-amd64"
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + bytes(0x400))
    assert kernel_release(tmp_path / "vmlinux") is None
    assert kernel_release(tmp_path / "missing") is None


@given(st.binary(max_size=0x900))
def test_kernel_release_never_raises(data: bytes) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        release = kernel_release(Path(f.name))
    assert release is None or isinstance(release, str)


def test_config_found_in_kvmpy_and_debian_layouts(tmp_path: Path) -> None:
    kvmpy_dir = tmp_path / "kernel" / "6.1-abc"
    kvmpy_dir.mkdir(parents=True)
    (kvmpy_dir / "config").write_text(MINIMAL_CONFIG)
    assert find_kernel_config(kvmpy_dir / "bzImage") == kvmpy_dir / "config"
    boot = tmp_path / "boot"
    boot.mkdir()
    kernel = fake_bzimage(boot / "vmlinuz-renamed", "6.1.0-9-cloud-amd64 #1")
    (boot / "config-6.1.0-9-cloud-amd64").write_text(CLOUD_CONFIG)
    assert find_kernel_config(kernel) == boot / "config-6.1.0-9-cloud-amd64"
    assert find_kernel_config(fake_bzimage(tmp_path / "lonely", "6.1 #1")) is None


@pytest.mark.parametrize(("config", "modules", "expected"), [
    (CLOUD_CONFIG, False, True),  # no MP-table parser: only the MADT shows the CPUs
    ("CONFIG_ACPI=y\nCONFIG_X86_MPPARSE=y\n", False, True),  # no cmdline virtio devices
    (MINIMAL_CONFIG, False, True),  # kvmpy's kernel: ACPI, so that it can power off
    (MINIMAL_CONFIG, True, True),  # --modules: a modular kernel
    ("# CONFIG_ACPI is not set\n", False, False),  # tables it could not read
    (None, False, False),  # nothing known: the MP table
])
def test_auto(tmp_path: Path, config: str | None, modules: bool, expected: bool) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"")
    if config is not None:
        (tmp_path / "config").write_text(config)
    picked = choose_acpi("auto", kernel, tmp_path if modules else None)
    assert picked.acpi is expected
    assert picked.reason.startswith("ACPI tables" if expected else "MP table")


def test_on_and_off_are_obeyed(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    (tmp_path / "config").write_text(CLOUD_CONFIG)
    assert choose_acpi(AcpiMode.OFF, kernel, tmp_path).acpi is False
    assert choose_acpi("on", kernel).acpi is True
    with pytest.raises(ValueError):
        choose_acpi("maybe", kernel)


# --- the module tree ------------------------------------------------------------------------
def test_modules_dir_is_the_tree_or_picked_by_release(tmp_path: Path) -> None:
    lib = tmp_path / "lib" / "modules"
    for release in ("6.1.0-9-cloud-amd64", "6.1.0-10-cloud-amd64"):
        write_tree(lib / release, {"virtio": ""})
    tree = lib / "6.1.0-9-cloud-amd64"
    assert find_modules_dir(tree, "6.1.0-9-cloud-amd64") == tree
    assert find_modules_dir(tree) == tree
    assert find_modules_dir(lib, "6.1.0-9-cloud-amd64") == tree
    with pytest.raises(InitramfsError, match="which kernel's modules"):
        find_modules_dir(lib)  # two trees, release unknown
    with pytest.raises(InitramfsError, match="is for 6.1.0-10-cloud-amd64"):
        find_modules_dir(lib / "6.1.0-10-cloud-amd64", "6.1.0-9-cloud-amd64")
    with pytest.raises(InitramfsError, match="no such directory"):
        find_modules_dir(tmp_path / "nowhere")


# --- the initramfs that loads them ----------------------------------------------------------
needs_busybox = pytest.mark.skipif(not initramfs.BUSYBOX.exists(),
                                   reason="busybox-static not installed (make deps)")


def test_modules_init_loads_before_the_marker() -> None:
    init = initramfs.modules_init()
    assert init.index("insmod") < init.index("exec </dev/console") < init.index(INIT_MARKER)
    assert init.replace(initramfs.LOAD_MODULES_SH + initramfs.REOPEN_CONSOLE_SH, "") == \
        initramfs.DEFAULT_INIT
    with pytest.raises(InitramfsError):
        initramfs.modules_init("#!/bin/sh\n")


@needs_busybox
def test_modules_init_parses_in_busybox_sh(tmp_path: Path) -> None:
    (tmp_path / "init").write_text(initramfs.modules_init())
    done = subprocess.run([str(initramfs.BUSYBOX), "sh", "-n", str(tmp_path / "init")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@needs_busybox
def test_modules_initramfs_is_built_once_with_the_modules_in_order(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "6.1.0-9-cloud-amd64",
                      {"virtio_mmio": "virtio,virtio_ring", "virtio": "", "virtio_ring": "",
                       "virtio_blk": "virtio,virtio_ring", "unrelated": ""})
    out = tmp_path / "cache"
    path = initramfs.modules_guest_initramfs_path(tree, out, ["virtio_mmio", "virtio_blk"])
    assert path.parent == out and path.name.startswith("modules-6.1.0-9-cloud-amd64-")
    first = path.stat().st_mtime_ns
    assert initramfs.modules_guest_initramfs_path(tree, out, ["virtio_mmio", "virtio_blk"]) \
        == path
    assert path.stat().st_mtime_ns == first  # found, not rebuilt
    entries = {e.name: e for e in read_newc(gzip.decompress(path.read_bytes()))}
    assert entries[initramfs.MODULE_ORDER].data == \
        b"virtio.ko\nvirtio_ring.ko\nvirtio_mmio.ko\nvirtio_blk.ko\n"
    assert "lib/modules/unrelated.ko" not in entries
    assert entries["init"].data.decode() == initramfs.modules_init()


def test_debian_cloud_kernel_when_fetched() -> None:
    from kvmpy import assets

    try:
        stock = assets.stock_kernel_path()
    except assets.AssetError:
        pytest.skip("Debian's cloud kernel is not fetched (`make stock-kernel`)")
    assert kernel_release(stock.vmlinuz) == stock.release
    assert choose_acpi("auto", stock.vmlinuz).acpi  # its config lacks X86_MPPARSE
    assert find_modules_dir(stock.modules.parent, stock.release) == stock.modules
    names = [initramfs.module_name(p)
             for p in initramfs.resolve_modules(stock.modules, initramfs.VIRTIO_MODULES)]
    assert set(initramfs.VIRTIO_MODULES) | {"virtio", "virtio_ring"} <= set(names)
    assert names.index("virtio_ring") < names.index("virtio_mmio")


# --- the kernel's verdict -------------------------------------------------------------------
def test_acpi_complaints_finds_what_acpica_and_x86_report() -> None:
    log = """\
[    0.4] ACPI: Interpreter enabled
[    0.5] ACPI Error: AE_BAD_PARAMETER, During Region initialization (20220331/tbxfload-52)
[    0.5] ACPI: Unable to load the System Description Tables
[    0.6] ACPI BIOS Error (bug): Could not resolve symbol [\\_SB.FOO], AE_NOT_FOUND
[    0.7] ACPI Warning: \\_SB.COM1: something (20220331/nsarguments-61)
[    0.8] [Firmware Bug]: ACPI: bad MADT entry
[    0.9] PCI: Fatal: No config space access function found
"""
    assert acpi_complaints(log) == [
        "[    0.5] ACPI Error: AE_BAD_PARAMETER, During Region initialization "
        "(20220331/tbxfload-52)",
        "[    0.6] ACPI BIOS Error (bug): Could not resolve symbol [\\_SB.FOO], AE_NOT_FOUND",
        "[    0.7] ACPI Warning: \\_SB.COM1: something (20220331/nsarguments-61)",
        "[    0.8] [Firmware Bug]: ACPI: bad MADT entry",
    ]
    assert acpi_complaints("ACPI: PM: (supports S0 S5)\nACPI: Using IOAPIC\n") == []
