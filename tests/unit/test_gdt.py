"""GDT descriptors encode what KVM's segment cache is told."""

from hypothesis import given
from hypothesis import strategies as st

from kvmpy.cpu.gdt import TYPE_CODE_RX, Segment, build_gdt, parse_descriptor


def test_known_encodings():
    # the classic flat descriptors (as in Linux's and Firecracker's boot GDTs)
    assert Segment(0x10, type=TYPE_CODE_RX, db=0, l=1).descriptor().hex() == "ffff0000009baf00"
    assert Segment(0x10, type=TYPE_CODE_RX).descriptor().hex() == "ffff0000009bcf00"
    assert Segment(0x18).descriptor().hex() == "ffff00000093cf00"


@given(st.integers(0, 2**32 - 1), st.integers(0, 0xFFFFF), st.integers(0, 3), st.booleans())
def test_descriptor_round_trip(base, limit, dpl, code):
    seg = Segment(0x8, base=base, limit=limit, dpl=dpl, type=TYPE_CODE_RX if code else 3)
    back = parse_descriptor(seg.descriptor())
    assert (back.base, back.limit, back.dpl, back.type) == (base, limit, dpl, seg.type)


def test_gdt_places_descriptors_at_their_selectors():
    table = build_gdt([Segment(0x18), Segment(0x10, type=TYPE_CODE_RX)])
    assert len(table) == 0x20
    assert table[:8] == bytes(8) and table[8:16] == bytes(8)
    assert parse_descriptor(table[0x10:0x18]).type == TYPE_CODE_RX
