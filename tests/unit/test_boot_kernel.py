"""load_kernel: sniffs bzImage vs ELF, picks the protocol, and names whatever else it was given."""

import glob
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy import layout
from kvmpy.boot.cmdline import write_cmdline
from kvmpy.boot.e820 import build_e820
from kvmpy.boot.initrd import place_initrd
from kvmpy.boot.kernel import load_kernel, load_kernel_bytes
from kvmpy.boot.mptable import write_mptable
from kvmpy.boot.params import write_boot_params
from kvmpy.boot.pvh import write_start_info
from kvmpy.boot.synthetic import Segment, make_bzimage, make_elf, pvh_note
from kvmpy.errors import LoaderError
from kvmpy.memory import GuestMemory

MiB = layout.MiB
HOLE = (layout.MMIO_HOLE, layout.MMIO_HOLE_END)
SHARED = GuestMemory.anonymous(64 * MiB, hole=HOLE)
ELF_PVH = make_elf([Segment(0x100_0000, b"\x90" * 0x1000)], entry=0x100_0000,
                   notes=pvh_note(0x100_0800))
ELF_64 = make_elf([Segment(0x100_0000, b"\x90" * 0x1000)], entry=0x100_0000)


def memory(size: int = 64 * MiB) -> GuestMemory:
    return GuestMemory.anonymous(size, hole=HOLE)


def test_bzimage():
    k = load_kernel_bytes(memory(), make_bzimage(cmdline_size=0x7FF, initrd_addr_max=0x37FF_FFFF))
    assert k.protocol == "bzimage"
    assert k.entry_gpa == k.load_gpa + 0x200 == 0x100_0200
    assert k.setup_header is not None and k.setup_header.version == 0x020F
    assert k.cmdline_max == 0x7FF and k.initrd_addr_max == 0x37FF_FFFF
    assert k.entry64_gpa is None


def test_elf_with_pvh_note_boots_by_pvh_unless_told_otherwise():
    k = load_kernel_bytes(memory(), ELF_PVH)
    assert (k.protocol, k.entry_gpa, k.entry64_gpa) == ("pvh", 0x100_0800, 0x100_0000)
    assert k.setup_header is None and k.cmdline_max == 2047 and k.initrd_addr_max is None
    k = load_kernel_bytes(memory(), ELF_PVH, prefer_pvh=False)
    assert (k.protocol, k.entry_gpa) == ("elf64", 0x100_0000)


def test_elf_without_note_is_entered_at_its_64_bit_entry():
    k = load_kernel_bytes(memory(), ELF_64)
    assert (k.protocol, k.entry_gpa, k.load_gpa, k.end_gpa) == (
        "elf64", 0x100_0000, 0x100_0000, 0x100_1000
    )


@pytest.mark.parametrize(
    ("data", "seen"),
    [
        (b"", "an empty file"),
        (b"\x1f\x8b\x08\x00" + bytes(100), "gzip data (a compressed vmlinux? decompress it first)"),
        (b"070701" + bytes(200), "a cpio archive (an initramfs, not a kernel)"),
        (b"MZ" + bytes(0x300), "a PE/EFI binary without a Linux setup header"),
        (b"hello, world\nthis is text", "text starting 'hello, world\\nthi'"),
        (bytes(range(200, 256)), "unknown data starting c8 c9 ca cb cc cd ce cf"),
        (bytes(0x438) + b"\x53\xef" + bytes(10), "an ext2/3/4 file system image"),
    ],
)
def test_not_a_kernel(data, seen):
    with pytest.raises(LoaderError) as info:
        load_kernel_bytes(SHARED, data)
    assert str(info.value) == (
        f"not a kernel: {seen}; expected an ELF vmlinux or a bzImage ('HdrS' at 0x202)"
    )


def test_file_errors_name_the_path(tmp_path):
    with pytest.raises(LoaderError) as info:
        load_kernel(SHARED, tmp_path / "nope")
    assert str(info.value) == f"cannot read kernel {tmp_path / 'nope'}: No such file or directory"
    with pytest.raises(LoaderError) as info:
        load_kernel(SHARED, tmp_path)
    assert str(info.value) == f"cannot read kernel {tmp_path}: Is a directory"
    bad = tmp_path / "bzImage"
    bad.write_bytes(make_bzimage()[:0x100] + b"x" * 0x200)  # HdrS cut away: not a kernel
    with pytest.raises(LoaderError, match=f"^kernel {bad}: not a kernel: "):
        load_kernel(SHARED, bad)
    old = tmp_path / "old"
    old.write_bytes(make_bzimage(version=0x0204))
    with pytest.raises(LoaderError) as info:
        load_kernel(SHARED, old)
    assert str(info.value) == (
        f"kernel {old}: boot protocol 2.04 is too old: kvmpy needs 2.06 or newer"
    )


def test_loads_from_a_file(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(ELF_PVH)
    m = memory()
    assert load_kernel(m, path).protocol == "pvh"
    assert m.read(0x100_0000, 16) == b"\x90" * 16


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=0x800), st.sampled_from([b"", b"\x7fELF", b"MZ"]))
def test_arbitrary_bytes_raise_only_loader_error(data, prefix):
    try:
        load_kernel_bytes(SHARED, prefix + data)
    except LoaderError as e:
        assert "\n" not in str(e)


def test_boot_structures_fit_their_places_together():
    """The whole KVM-free boot, as the machine does it, on a bzImage and on a PVH vmlinux."""
    assert layout.PVH_START_INFO + 0x1000 <= layout.ZERO_PAGE + 0x1000 <= layout.PML4
    assert layout.ZERO_PAGE + 0x1000 <= layout.BOOT_STACK_TOP <= layout.PML4
    assert layout.PAGE_TABLES_END <= layout.FLAT_LOAD <= layout.CMDLINE
    assert layout.CMDLINE + layout.CMDLINE_MAX <= layout.EBDA
    for image in (make_bzimage(init_size=0x80_0000), ELF_PVH):
        m = memory(128 * MiB)
        k = load_kernel_bytes(m, image)
        cmdline = write_cmdline(m, "console=ttyS0 quiet", k.cmdline_max)
        initrd_gpa = place_initrd(m, 3 * MiB, kernel_end=k.end_gpa, addr_max=k.initrd_addr_max)
        assert initrd_gpa >= k.end_gpa
        e820 = build_e820(m)
        write_mptable(m, 2)
        if k.protocol == "pvh":
            gpa = write_start_info(m, e820=e820, cmdline=cmdline)
            assert m.read_u32(gpa) == 0x336EC578
        else:
            gpa = write_boot_params(m, e820=e820, cmdline=cmdline, setup_header=k.setup_header,
                                    kernel_load_gpa=k.load_gpa)
            assert m.read_u32(gpa + 0x228) == layout.CMDLINE
        assert m.read(layout.CMDLINE, 20) == b"console=ttyS0 quiet\0"
        assert m.read(layout.EBDA, 4) == b"_MP_"


REAL = (
    sorted(glob.glob("/boot/vmlinuz-*"))
    + sorted(glob.glob(os.path.expanduser("~/.cache/kvmpy/kernel/*/bzImage")))
    + sorted(glob.glob(os.path.expanduser("~/.cache/kvmpy/kernel/*/vmlinux")))
    + [p for var in ("KVMPY_TEST_BZIMAGE", "KVMPY_TEST_VMLINUX")
       for p in os.environ.get(var, "").split(":") if p]
)


@pytest.mark.skipif(not REAL, reason="no real kernel in /boot or ~/.cache/kvmpy/kernel")
@pytest.mark.parametrize("path", REAL)
def test_real_kernel(path):
    m = memory(512 * MiB)
    k = load_kernel(m, path)
    assert k.load_gpa <= k.entry_gpa < k.end_gpa
    assert k.protocol in ("bzimage", "pvh", "elf64")
    if k.protocol == "bzimage":
        assert k.entry_gpa == k.load_gpa + 0x200
    place_initrd(m, 8 * MiB, kernel_end=k.end_gpa, addr_max=k.initrd_addr_max)
