"""Software breakpoints: trap bytes go in while the vCPUs run and come out when they stop."""

import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from kvmpy.gdb.swbreak import IN_AL_DX, INT3, KERNEL_MAP, SoftBreakpoints, int3_intercepted
from kvmpy.memory import GuestMemory
from kvmpy.trace.vmem import AddressSpace

FLAT = AddressSpace("none")


def memory_with(code: bytes, at: int = 0x1000) -> GuestMemory:
    memory = GuestMemory.from_buffer(bytearray(1 << 20))
    memory.write(at, code)
    return memory


def test_patch_then_unpatch_restores_the_guest_bytes() -> None:
    memory = memory_with(b"\x55\x48\x89\xe5")
    sw = SoftBreakpoints(memory)
    sw.insert(0x1001)
    sw.patch(FLAT)
    assert memory.read(0x1000, 4) == bytes([0x55, INT3, 0x89, 0xE5])
    sw.unpatch()
    assert memory.read(0x1000, 4) == b"\x55\x48\x89\xe5"


def test_an_address_at_a_resumed_vcpus_rip_is_left_out() -> None:
    memory = memory_with(b"\x90\x90")
    sw = SoftBreakpoints(memory, IN_AL_DX)
    sw.insert(0x1000)
    sw.insert(0x1001)
    sw.patch(FLAT, skip=frozenset({0x1000}))
    assert memory.read(0x1000, 2) == bytes([0x90, IN_AL_DX])
    sw.patch(FLAT)  # after the step off it
    assert memory.read(0x1000, 2) == bytes([IN_AL_DX, IN_AL_DX])


def test_a_byte_the_guest_rewrote_is_kept() -> None:
    memory = memory_with(b"\x90")
    sw = SoftBreakpoints(memory)
    sw.insert(0x1000)
    sw.patch(FLAT)
    memory.write(0x1000, b"\xc3")  # the guest patched its own code meanwhile
    sw.unpatch()
    assert memory.read(0x1000, 1) == b"\xc3"


def test_remove_and_clear_take_the_patch_out() -> None:
    memory = memory_with(b"\x90\x91")
    sw = SoftBreakpoints(memory)
    sw.insert(0x1000)
    sw.insert(0x1001)
    sw.patch(FLAT)
    assert sw.remove(0x1000) and not sw.remove(0x1000)
    assert memory.read(0x1000, 2) == bytes([0x90, INT3])
    sw.clear()
    assert memory.read(0x1000, 2) == b"\x90\x91" and not sw.active


def test_unmapped_addresses_wait_and_kernel_image_addresses_use_its_mapping() -> None:
    memory = memory_with(b"\x90", at=0x2000)
    sw = SoftBreakpoints(memory)
    sw.insert(0xFFFF_8880_0000_0000)  # not the kernel image: not patched until mapped
    sw.insert(KERNEL_MAP + 0x2000)
    sw.patch(AddressSpace("4-level", cr3=0x8000))  # an empty PML4: nothing maps
    assert list(sw.patched) == [KERNEL_MAP + 0x2000]
    assert memory.read(0x2000, 1) == bytes([INT3])


@given(st.binary(max_size=64), st.booleans())
def test_cpuinfo_detection_never_raises(junk: bytes, tcg: bool) -> None:
    """Any bytes in /proc/cpuinfo: TCG is found exactly when its model name is there."""
    path = Path("/tmp") / f"kvmpy-test-cpuinfo-{os.getpid()}"
    model = b"\nmodel name\t: QEMU TCG CPU version 2.5+\n" if tcg else b""
    text = junk.replace(b"Q", b"") + model
    path.write_bytes(text)
    try:
        assert int3_intercepted(str(path)) is not tcg
    finally:
        path.unlink()


def test_tcg_is_detected(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text("model name\t: QEMU TCG CPU version 2.5+\n")
    (tmp_path / "amd").write_text("model name\t: AMD EPYC 7B13\n")
    assert not int3_intercepted(str(tmp_path / "cpuinfo"))
    assert int3_intercepted(str(tmp_path / "amd"))
    assert int3_intercepted(str(tmp_path / "missing"))
