"""Initrd placement: as high as allowed, aligned, above the kernel, below the hole."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy import layout
from kvmpy.boot.initrd import load_initrd, low_ram_end, place_initrd
from kvmpy.errors import LoaderError
from kvmpy.memory import GuestMemory

MiB = layout.MiB
ALIGN = layout.INITRD_ALIGN
HOLE = (layout.MMIO_HOLE, layout.MMIO_HOLE_END)
MEM = GuestMemory.anonymous(256 * MiB, hole=HOLE)


def test_highest_aligned_address_in_low_ram():
    gpa = place_initrd(MEM, 5 * MiB, kernel_end=0x400_0000)
    assert gpa == 256 * MiB - 6 * MiB  # top at 256 MiB, 5 MiB rounded down to 2 MiB alignment
    assert gpa % ALIGN == 0 and gpa + 5 * MiB <= 256 * MiB


def test_initrd_addr_max_is_the_last_byte_it_may_occupy():
    gpa = place_initrd(MEM, 2 * MiB, kernel_end=0x200_0000, addr_max=64 * MiB - 1)
    assert gpa == 62 * MiB


def test_low_ram_stops_at_the_hole():
    big = GuestMemory.anonymous(4 * layout.GiB, hole=HOLE)
    try:
        assert low_ram_end(big) == layout.MMIO_HOLE
        gpa = place_initrd(big, MiB, kernel_end=0x400_0000)
        assert gpa + MiB <= layout.MMIO_HOLE
    finally:
        big.close()


def test_too_big_for_the_space_above_the_kernel():
    with pytest.raises(LoaderError) as info:
        place_initrd(MEM, 200 * MiB, kernel_end=0x400_0000)
    assert str(info.value) == (
        "initrd of 0xc800000 bytes does not fit between the kernel's end 0x4000000 "
        "and 0x10000000: give the guest more memory"
    )


def test_no_ram_at_1mib():
    with pytest.raises(LoaderError, match="does not reach 0x100000"):
        place_initrd(GuestMemory.from_buffer(bytearray(0x1000)), 16, kernel_end=0)


def test_load_from_file(tmp_path):
    path = tmp_path / "initrd.cpio"
    path.write_bytes(b"070701" + b"x" * 1000)
    mem = GuestMemory.anonymous(64 * MiB)
    initrd = load_initrd(mem, path, kernel_end=0x200_0000)
    assert initrd.size == 1006 and initrd.gpa == 62 * MiB and initrd.end == 62 * MiB + 1006
    assert mem.read(initrd.gpa, 1006) == path.read_bytes()


def test_file_errors(tmp_path):
    mem = GuestMemory.anonymous(64 * MiB)
    with pytest.raises(LoaderError) as info:
        load_initrd(mem, tmp_path / "missing", kernel_end=0)
    missing = tmp_path / "missing"
    assert str(info.value) == f"cannot read initrd {missing}: No such file or directory"
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(LoaderError) as info:
        load_initrd(mem, tmp_path / "empty", kernel_end=0)
    assert str(info.value) == f"initrd {tmp_path / 'empty'} is empty"


@given(st.integers(-1, 300 * MiB), st.integers(0, 300 * MiB),
       st.one_of(st.none(), st.integers(0, 2**32)))
def test_any_request_is_placed_correctly_or_refused(size, kernel_end, addr_max):
    try:
        gpa = place_initrd(MEM, size, kernel_end=kernel_end, addr_max=addr_max)
    except LoaderError as e:
        assert "\n" not in str(e)
        return
    assert size > 0
    assert gpa % ALIGN == 0
    assert gpa >= kernel_end
    assert MEM.contains(gpa, size)
    assert addr_max is None or gpa + size - 1 <= addr_max
    # as high as it could go: one more alignment step would break a limit
    top = min(256 * MiB, addr_max + 1 if addr_max is not None else 256 * MiB)
    assert gpa + ALIGN + size > top
