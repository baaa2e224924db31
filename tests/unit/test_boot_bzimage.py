"""bzImage loader: real-shaped images load where the protocol says; bad ones name their fault."""

import glob
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy import layout
from kvmpy.boot import bootparam as bp
from kvmpy.boot.bzimage import load_bzimage, parse_setup_header
from kvmpy.boot.synthetic import make_bzimage
from kvmpy.errors import LoaderError
from kvmpy.memory import GuestMemory

MiB = layout.MiB
HOLE = (layout.MMIO_HOLE, layout.MMIO_HOLE_END)
# One lazily-backed guest for the property tests (MAP_NORESERVE: untouched pages cost nothing).
SHARED = GuestMemory.anonymous(64 * MiB, hole=HOLE)


def memory(size: int = 64 * MiB) -> GuestMemory:
    return GuestMemory.anonymous(size, hole=HOLE)


def patched(image: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(image)
    struct.pack_into("<" + fmt, out, offset, value)
    return bytes(out)


def message(image: bytes, mem: GuestMemory | None = None) -> str:
    with pytest.raises(LoaderError) as info:
        load_bzimage(mem or memory(), image)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_real_shaped_image_loads_at_pref_address_with_entry_at_0x200():
    kernel = bytes(range(256)) * 0x30 + b"tail"
    image = make_bzimage(kernel, init_size=0x40_0000)
    mem = memory()
    loaded = load_bzimage(mem, image)
    assert loaded.load_gpa == 0x100_0000
    assert loaded.entry_gpa == 0x100_0200
    assert loaded.version == 0x020F
    assert loaded.load_size == (len(kernel) + 15) // 16 * 16
    assert mem.read(loaded.load_gpa, len(kernel)) == kernel
    assert loaded.run_gpa == 0x100_0000
    assert loaded.end_gpa == 0x100_0000 + 0x40_0000
    # Nothing of the setup sectors lands in RAM below the kernel.
    assert mem.read(layout.HIMEM, 0x100) == bytes(0x100)


def test_header_fields_are_read_at_documented_offsets():
    image = make_bzimage(setup_sects=7, cmdline_size=0x7FF, initrd_addr_max=0x37FF_FFFF,
                         kernel_alignment=0x100_0000, pref_address=0x200_0000)
    h = parse_setup_header(image)
    assert h.setup_sects == 7 and h.setup_size == 8 * 512
    assert h.version == 0x020F and h.version_str == "2.15"
    assert h.loadflags == bp.LOADED_HIGH
    assert h.xloadflags & bp.XLF_KERNEL_64
    assert h.cmdline_size == 0x7FF
    assert h.initrd_addr_max == 0x37FF_FFFF
    assert h.kernel_alignment == 0x100_0000
    assert h.pref_address == 0x200_0000
    assert h.relocatable_kernel == 1
    # raw is 0x1f1 up to 0x202 + the jump's byte: what the zero page starts from
    assert h.raw == image[0x1F1:0x26C]
    assert h.end == 0x26C
    assert h.field("boot_flag") == 0xAA55
    assert h.field("header") == struct.unpack("<I", b"HdrS")[0]


def test_setup_sects_zero_means_four():
    image = make_bzimage(b"K" * 64, setup_sects=0)
    assert parse_setup_header(image).setup_size == 5 * 512
    mem = memory()
    loaded = load_bzimage(mem, image)
    assert mem.read(loaded.load_gpa, 64) == b"K" * 64


@pytest.mark.parametrize("pref", [0, 0x1234, 0x8_0000, 0x80_0010])
def test_unusable_pref_address_falls_back_to_1mib_and_aligns_the_run_address(pref):
    image = make_bzimage(pref_address=pref, kernel_alignment=0x20_0000, init_size=0x10_0000)
    loaded = load_bzimage(memory(), image)
    assert loaded.load_gpa == layout.HIMEM
    assert loaded.entry_gpa == layout.HIMEM + 0x200
    # startup_64 aligns its own address up to kernel_alignment, never below LOAD_PHYSICAL_ADDR
    assert loaded.run_gpa == max(0x20_0000, pref)
    assert loaded.end_gpa == max(layout.HIMEM + loaded.load_size, loaded.run_gpa + 0x10_0000)


def test_trailing_signature_after_syssize_is_not_loaded():
    image = make_bzimage(b"A" * 32) + b"SIGNATURE"
    mem = memory()
    loaded = load_bzimage(mem, image)
    assert loaded.load_size == 32
    assert mem.read(loaded.load_gpa + 32, 9) == bytes(9)


GOOD = make_bzimage(b"\x90" * 0x200)
SETUP = 5 * 512


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (GOOD[:0x100], "truncated bzImage: 256 bytes, too short for a setup header"),
        (GOOD[:0x230], "truncated bzImage: 560 bytes, the setup header ends at 0x26c"),
        (GOOD[:SETUP], f"truncated bzImage: {SETUP} bytes, no kernel after {SETUP} bytes of setup"),
        (GOOD[:-1], f"truncated bzImage: {len(GOOD) - 1} bytes, the header says {len(GOOD)}"),
        (patched(GOOD, 0x1FE, "H", 0),
         "wrong magic: boot_flag at 0x1fe is 0x0000, expected 0xaa55"),
        (GOOD[:0x202] + b"HdrX" + GOOD[0x206:],
         "wrong magic: b'HdrX' at 0x202, expected b'HdrS' (not a bzImage)"),
        (patched(GOOD, 0x206, "H", 0x0205),
         "boot protocol 2.05 is too old: kvmpy needs 2.06 or newer"),
        (patched(GOOD, 0x206, "H", 0x0300),
         "boot protocol 3.00 is too new: kvmpy knows protocol 2.x"),
        (patched(GOOD, 0x206, "H", 0x020B),
         "not 64-bit capable: boot protocol 2.11 has no xloadflags to declare a 64-bit entry "
         "(2.12 or newer needed)"),
        (patched(GOOD, 0x236, "H", bp.XLF_CAN_BE_LOADED_ABOVE_4G),
         "not 64-bit capable: xloadflags lacks XLF_KERNEL_64 (a 32-bit kernel?)"),
        (patched(GOOD, 0x211, "B", 0),
         "not a bzImage: loadflags LOADED_HIGH is clear (a zImage loaded low is not supported)"),
        (patched(GOOD, 0x201, "B", 0x20),
         "malformed setup header: its jump at 0x200 ends it at 0x222, protocol 2.15 needs "
         "at least 0x23c"),
        (patched(GOOD, 0x230, "I", 0x30_0000), "bad kernel_alignment 0x300000: not a power of two"),
    ],
)
def test_malformed_images_name_what_is_wrong(image, expected):
    assert message(image) == expected


def test_kernel_larger_than_memory():
    image = make_bzimage(b"\x90" * 0x200, init_size=0x200_0000)  # needs RAM up to 48 MiB
    text = message(image, memory(32 * MiB))
    assert text == (
        "kernel larger than memory: it needs guest RAM up to 0x3000000 "
        "(load 0x200 bytes, init_size 0x2000000); RAM at 0x1000000 ends at 0x2000000"
    )
    text = message(image, GuestMemory.from_buffer(bytearray(0x10_0000)))
    assert text.endswith("there is no RAM at 0x1000000")


def test_a_failed_load_writes_nothing():
    mem = memory(32 * MiB)
    with pytest.raises(LoaderError):
        load_bzimage(mem, make_bzimage(b"\xcc" * 0x200, init_size=0x200_0000))
    assert mem.read(0x100_0000, 0x200) == bytes(0x200)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=0x1400))
def test_arbitrary_bytes_raise_only_loader_error(data):
    try:
        loaded = load_bzimage(SHARED, data)
    except LoaderError as e:
        assert "\n" not in str(e)
        return
    assert loaded.entry_gpa == loaded.load_gpa + 0x200
    assert SHARED.contains(loaded.load_gpa, loaded.end_gpa - loaded.load_gpa)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0x1F1, 0x26B), st.integers(0, 255)), max_size=8),
       st.one_of(st.none(), st.integers(0, len(GOOD))))
def test_mutated_headers_raise_only_loader_error(mutations, cut):
    image = bytearray(GOOD)
    for offset, value in mutations:
        image[offset] = value
    if cut is not None:
        del image[cut:]
    try:
        loaded = load_bzimage(SHARED, bytes(image))
    except LoaderError:
        return
    header = loaded.header
    assert header.version >= 0x020C and header.xloadflags & bp.XLF_KERNEL_64
    assert loaded.load_gpa in (layout.HIMEM, header.pref_address)
    assert SHARED.contains(loaded.load_gpa, loaded.end_gpa - loaded.load_gpa)


# Debian's own kernel if installed, kvmpy's built one if cached, or any named in the
# environment (colon-separated), e.g. one unpacked with `apt-get download` + `dpkg-deb -x`.
REAL = (
    sorted(glob.glob("/boot/vmlinuz-*"))
    + sorted(glob.glob(os.path.expanduser("~/.cache/kvmpy/kernel/*/bzImage")))
    + [p for p in os.environ.get("KVMPY_TEST_BZIMAGE", "").split(":") if p]
)


@pytest.mark.skipif(not REAL, reason="no real bzImage in /boot or ~/.cache/kvmpy/kernel")
@pytest.mark.parametrize("path", REAL)
def test_real_bzimage(path):
    image = Path(path).read_bytes()
    mem = memory(512 * MiB)
    loaded = load_bzimage(mem, image)
    h = loaded.header
    assert h.version >= 0x020C and h.xloadflags & bp.XLF_KERNEL_64
    assert loaded.entry_gpa == loaded.load_gpa + 0x200
    assert loaded.load_gpa == h.pref_address
    assert mem.read(loaded.load_gpa, 64) == image[h.setup_size : h.setup_size + 64]
    assert loaded.end_gpa >= loaded.run_gpa + h.init_size
