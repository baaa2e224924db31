"""A bzImage's kernel unpacked on the host: payload, formats, the cache, and booting from it."""

import bz2
import errno
import gzip
import lzma
import os
import struct
from pathlib import Path

import pytest

from kvmpy import layout
from kvmpy.boot import bootparam as bp
from kvmpy.boot import unpack
from kvmpy.boot.bzimage import parse_setup_header
from kvmpy.boot.e820 import build_e820
from kvmpy.boot.kernel import load_kernel_bytes
from kvmpy.boot.params import build_boot_params
from kvmpy.boot.synthetic import Segment, make_bzimage, make_elf
from kvmpy.memory import GuestMemory

MiB = layout.MiB
VMLINUX = make_elf([Segment(0x100_0000, b"\x0f\x01\xd9" * 0x400)], entry=0x100_0000)


def packed(data: bytes, fmt: str = "xz") -> bytes:
    """`data` compressed as the kernel build does it, the size appended (size_append)."""
    compress = {"gzip": gzip.compress, "xz": lzma.compress, "bzip2": bz2.compress,
                "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE)}[fmt]
    return compress(data) + struct.pack("<I", len(data))


def bzimage(fmt: str = "xz", payload: bytes | None = None) -> bytes:
    return make_bzimage(b"\xf4" * 0x400, payload=packed(VMLINUX, fmt) if payload is None
                        else payload)


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KVMPY_CACHE", str(tmp_path))
    return tmp_path


def memory() -> GuestMemory:
    return GuestMemory.anonymous(64 * MiB, hole=(layout.MMIO_HOLE, layout.MMIO_HOLE_END))


@pytest.mark.parametrize("fmt", ["gzip", "xz", "lzma", "bzip2"])
def test_the_payload_decompresses_to_the_vmlinux(fmt: str) -> None:
    image = bzimage(fmt)
    assert unpack.decompress(unpack.payload(image, parse_setup_header(image))) == VMLINUX


@pytest.mark.parametrize("data", [
    b"\x04\x22\x4d\x18" + b"\0" * 64,  # lz4: the kernel's own decompressor, not ours
    b"\x28\xb5\x2f\xfd" + b"\0" * 64,  # zstd
    packed(VMLINUX)[:-40] + struct.pack("<I", len(VMLINUX)),  # a truncated stream
    packed(VMLINUX)[:-4] + struct.pack("<I", len(VMLINUX) + 1),  # not the size appended
    packed(b"not an ELF" * 100),
    b"\x1f\x8b" + b"\xff" * 64,  # gzip magic, garbage after it
])
def test_what_kvmpy_does_not_unpack_is_none(data: bytes) -> None:
    assert unpack.decompress(data) is None


def test_a_header_without_a_payload_field_has_no_payload() -> None:
    old = make_bzimage(version=0x0207)
    assert unpack.payload(old, parse_setup_header(old)) is None
    assert unpack.payload(make_bzimage(), parse_setup_header(make_bzimage())) is None


def test_a_payload_reaching_past_the_file_is_none() -> None:
    image = bytearray(bzimage())
    image[0x24C:0x250] = struct.pack("<I", len(image))  # payload_length: the whole file
    assert unpack.payload(bytes(image), parse_setup_header(image)) is None


def test_first_boot_decompresses_and_unpacks_for_the_next(cache: Path) -> None:
    image = bzimage()
    assert unpack.cached(image) is None  # nothing kept yet: the decompressor boots
    first = load_kernel_bytes(memory(), image)
    assert first.protocol == "bzimage" and not first.unpacked
    kept = unpack.unpack_to_cache(image, parse_setup_header(image))
    assert kept is not None and kept.parent == cache / "unpacked"
    assert kept.read_bytes() == VMLINUX
    assert unpack.cached(image) == kept
    mem = memory()
    second = load_kernel_bytes(mem, image, unpacked=kept)
    assert second.unpacked and second.protocol == "elf64"
    assert (second.entry_gpa, second.load_gpa) == (0x100_0000, 0x100_0000)
    assert mem.read(0x100_0000, 3) == b"\x0f\x01\xd9"  # the vmlinux, not the decompressor
    # boot_params carries the bzImage's own setup header, as its decompressor would pass it
    assert second.setup_header == parse_setup_header(image)
    page = build_boot_params(e820=build_e820(mem), setup_header=second.setup_header)
    for field in ("version", "xloadflags", "pref_address", "init_size", "payload_length"):
        assert bp.get(page, field) == bp.get(image, field), field
    # not given it, it runs the decompressor again
    assert load_kernel_bytes(memory(), image).protocol == "bzimage"


def test_a_changed_image_never_boots_a_stale_kernel() -> None:
    image = bzimage()
    assert unpack.unpack_to_cache(image, parse_setup_header(image)) is not None
    changed = bzimage("gzip")  # same vmlinux, another file: its own entry
    assert unpack.cached(changed) is None


def test_a_cache_it_cannot_write_leaves_the_kernel_to_its_decompressor(cache: Path) -> None:
    (cache / "unpacked").write_text("a file where the directory should be")  # as unwritable
    image = bzimage()
    assert unpack.unpack_to_cache(image, parse_setup_header(image)) is None
    assert unpack.cached(image) is None


def test_an_unpacking_thread_that_fails_says_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-bzImage"
    unpack.unpack_in_background(missing).join(10)  # logged, not raised
    broken = tmp_path / "bzImage"
    broken.write_bytes(bzimage(payload=b"\x1f\x8b" + b"\xff" * 64))
    unpack.unpack_in_background(broken).join(10)
    assert not (tmp_path / "unpacked").exists() or not any((tmp_path / "unpacked").iterdir())


def test_the_background_unpack_keeps_the_kernel(tmp_path: Path) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(bzimage())
    assert unpack.kept(path) is None
    unpack.unpack_in_background(path).join(10)
    kept = unpack.kept(path)
    assert kept is not None and kept.read_bytes() == VMLINUX
    assert unpack.kept(tmp_path / "missing") is None
    elf = tmp_path / "vmlinux"
    elf.write_bytes(VMLINUX)
    assert unpack.kept(elf) is None  # not a bzImage


def test_without_o_tmpfile_a_renamed_file_and_nothing_left_over(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_tmpfile(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "overlayfs before 6.6")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(unpack.os, "open", no_tmpfile)
    image = bzimage()
    kept = unpack.unpack_to_cache(image, parse_setup_header(image))
    assert kept is not None and kept.read_bytes() == VMLINUX
    broken = bzimage(payload=b"\x1f\x8b" + b"\xff" * 64)
    assert unpack.unpack_to_cache(broken, parse_setup_header(broken)) is None
    assert sorted(p.name for p in (cache / "unpacked").iterdir()) == [kept.name]


def test_a_stream_larger_than_its_stated_size_is_refused_without_being_inflated() -> None:
    bomb = lzma.compress(b"\0" * (8 * MiB)) + struct.pack("<I", len(VMLINUX))
    assert unpack.decompress(bomb) is None
    assert unpack.decompress(b"\x1f\x8b\x08") is None  # shorter than the size it should end with
