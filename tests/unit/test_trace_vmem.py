"""Guest linear addresses through the guest's own page tables, in each paging mode."""

from types import SimpleNamespace as NS

from hypothesis import given
from hypothesis import strategies as st

from kvmpy.cpu.pagetables import build_identity_map, translate
from kvmpy.memory import GuestMemory
from kvmpy.trace import vmem
from kvmpy.trace.vmem import AddressSpace

P, RW, PS = 1, 2, 0x80
KERNEL = 0xFFFF_FFFF_8100_0000  # where Linux links its text


def sregs(cr0: int = 0, cr3: int = 0, cr4: int = 0, efer: int = 0) -> NS:
    return NS(cr0=cr0, cr3=cr3, cr4=cr4, efer=efer)


def high_kernel_mapping() -> tuple[GuestMemory, int]:
    """4-level tables mapping KERNEL (4 KiB pages) to gpa 0x200000, and the identity map."""
    mem = GuestMemory.from_buffer(bytearray(4 << 20))
    cr3 = build_identity_map(mem)
    pdpt, pd, pt = 0x100000, 0x101000, 0x102000
    mem.write_u64(cr3 + 8 * 511, pdpt | P | RW)
    mem.write_u64(pdpt + 8 * 510, pd | P | RW)
    mem.write_u64(pd + 8 * 8, pt | P | RW)
    for i in range(4):  # 16 KiB of kernel text
        mem.write_u64(pt + 8 * i, (0x200000 + i * 0x1000) | P | RW)
    return mem, cr3


def test_paging_off_is_identity_in_32_bits() -> None:
    mem = GuestMemory.from_buffer(bytearray(0x1000))
    space = AddressSpace.from_sregs(sregs())
    assert space.paging == "none"
    assert vmem.to_physical(mem, space, 0x1234) == 0x1234


def test_kernel_virtual_address_through_4_level_tables() -> None:
    mem, cr3 = high_kernel_mapping()
    space = AddressSpace.from_sregs(sregs(cr0=1 | 1 << 31, cr3=cr3, cr4=1 << 5, efer=1 << 10))
    assert space.paging == "4-level"
    assert vmem.to_physical(mem, space, KERNEL + 0x1234) == 0x201234
    assert vmem.to_physical(mem, space, KERNEL + 0x4000) is None  # past the mapping
    mem.write(0x200FFE, b"star")
    assert vmem.read(mem, space, KERNEL + 0xFFE, 4) == b"star"  # across a page boundary


def test_reads_stop_at_the_first_unmapped_byte() -> None:
    mem, cr3 = high_kernel_mapping()
    space = AddressSpace("4-level", cr3)
    assert len(vmem.read(mem, space, KERNEL + 0x3FF0, 64)) == 16
    assert vmem.read(mem, space, KERNEL + 0x4000, 8) == b""
    assert vmem.write(mem, space, KERNEL + 0x3FFC, b"12345678") == 4


def test_pae_paging_with_a_2mib_page_and_a_4kib_page() -> None:
    mem = GuestMemory.from_buffer(bytearray(2 << 20))
    pdpt, pd, pt = 0x1000, 0x2000, 0x3000
    mem.write_u64(pdpt + 8 * 3, pd | P)  # 0xc0000000..
    mem.write_u64(pd + 8 * 0, 0x000000 | P | RW | PS)  # 2 MiB page
    mem.write_u64(pd + 8 * 1, pt | P | RW)
    mem.write_u64(pt + 8 * 5, 0x7000 | P)
    space = AddressSpace.from_sregs(sregs(cr0=1 | 1 << 31, cr3=pdpt, cr4=1 << 5))
    assert space.paging == "pae"
    assert vmem.to_physical(mem, space, 0xC0012345) == 0x12345
    assert vmem.to_physical(mem, space, 0xC0205123) == 0x7123
    assert vmem.to_physical(mem, space, 0xC0206000) is None
    assert vmem.to_physical(mem, space, 0x00001000) is None


def test_32_bit_paging_with_a_4mib_page_needs_pse() -> None:
    mem = GuestMemory.from_buffer(bytearray(1 << 20))
    pd, pt = 0x1000, 0x2000
    mem.write_u32(pd + 4 * 0x300, 0x00400000 | P | PS)  # 0xc0000000 -> 4 MiB at 4 MiB
    mem.write_u32(pd + 4 * 1, pt | P)
    mem.write_u32(pt + 4 * 2, 0x9000 | P)
    with_pse = AddressSpace.from_sregs(sregs(cr0=1 | 1 << 31, cr3=pd, cr4=1 << 4))
    assert with_pse.paging == "32-bit" and with_pse.pse
    assert vmem.to_physical(mem, with_pse, 0xC0001234) == 0x401234
    assert vmem.to_physical(mem, with_pse, 0x00402ABC) == 0x9ABC
    without = AddressSpace("32-bit", pd, pse=False)
    # PS ignored: the PDE is taken as a page table at 4 MiB, outside this memory
    assert vmem.to_physical(mem, without, 0xC0001234) is None


def test_tables_pointing_outside_ram_mean_unmapped() -> None:
    mem = GuestMemory.from_buffer(bytearray(0x10000))
    mem.write_u64(0x1000, 0x7FFF_F000 | P)  # a PML4E far outside RAM
    assert vmem.to_physical(mem, AddressSpace("4-level", 0x1000), 0x1000) is None


@given(st.integers(0, 2**64 - 1))
def test_4_level_agrees_with_the_table_walker(gva: int) -> None:
    mem, cr3 = high_kernel_mapping()
    t = translate(mem.read_u64, cr3, gva)
    assert vmem.to_physical(mem, AddressSpace("4-level", cr3), gva) == (t.gpa if t else None)


@given(st.integers(0, 2**32 - 1), st.integers(0, 64))
def test_reads_never_raise(addr: int, length: int) -> None:
    mem = GuestMemory.from_buffer(bytearray(0x3000))
    for space in (AddressSpace("none"), AddressSpace("32-bit", 0x1000),
                  AddressSpace("pae", 0x1000), AddressSpace("5-level", 0x1000)):
        assert len(vmem.read(mem, space, addr, length)) <= length
