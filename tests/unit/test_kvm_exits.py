"""The kvm_run decoder: every exit kvmpy handles, written into a page by hand and read back typed.

The layouts here are written out from <linux/kvm.h> by hand on purpose: they check
the decoder's layouts, which come from cffi.
"""

import struct

from hypothesis import given
from hypothesis import strategies as st

from kvmpy.kvm.exits import (
    INTERRUPTED,
    RUN_EXIT_REASON,
    RUN_IF_FLAG,
    RUN_UNION,
    SHUTDOWN,
    Debug,
    ExitReason,
    FailEntry,
    GuestException,
    Hlt,
    InternalError,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    SystemEvent,
    Unknown,
    Unsupported,
    decode,
    reason_name,
    reason_of,
)


def page_with(reason: int, fmt: str = "", *values: object) -> memoryview:
    page = bytearray(4096)
    struct.pack_into("<I", page, RUN_EXIT_REASON, reason)
    if fmt:
        struct.pack_into(fmt, page, RUN_UNION, *values)
    return memoryview(page)


def test_the_union_starts_where_linux_kvm_h_puts_it() -> None:
    assert (RUN_EXIT_REASON, RUN_IF_FLAG, RUN_UNION) == (8, 13, 32)


def test_port_writes_carry_their_bytes() -> None:
    page = page_with(ExitReason.IO, "<BBHIQ", 1, 2, 0x3F8, 3, 0x100)
    page[0x100:0x106] = b"abcdef"
    assert decode(page) == IoOut(0x3F8, 2, b"abcdef")  # `rep outsw`, three words


def test_port_reads_are_answered_in_the_page() -> None:
    page = page_with(ExitReason.IO, "<BBHIQ", 0, 4, 0x71, 1, 0x200)
    exit = decode(page)
    assert isinstance(exit, IoIn) and (exit.port, exit.size, len(exit.data)) == (0x71, 4, 4)
    exit.data[:] = b"\x01\x02\x03\x04"
    assert bytes(page[0x200:0x204]) == b"\x01\x02\x03\x04"


def test_mmio_reads_and_writes() -> None:
    page = page_with(ExitReason.MMIO, "<Q8sIB", 0xE0000010, b"12345678", 4, 1)
    assert decode(page) == MmioWrite(0xE0000010, b"1234")
    page = page_with(ExitReason.MMIO, "<Q8sIB", 0xD0000000, bytes(8), 2, 0)
    exit = decode(page)
    assert isinstance(exit, MmioRead) and exit.gpa == 0xD0000000
    exit.data[:] = b"\xaa\xbb"
    assert bytes(page[RUN_UNION + 8 : RUN_UNION + 11]) == b"\xaa\xbb\x00"


def test_every_other_exit() -> None:
    page = page_with(ExitReason.HLT)
    page[RUN_IF_FLAG] = 1
    assert decode(page) == Hlt(True)
    assert decode(page_with(ExitReason.SHUTDOWN)) is SHUTDOWN
    assert decode(page_with(ExitReason.FAIL_ENTRY, "<QI", 0x80000021, 1)) == \
        FailEntry(0x80000021, 1)
    assert decode(page_with(ExitReason.INTERNAL_ERROR, "<II3Q", 1, 3, 7, 8, 9)) == \
        InternalError(1, (7, 8, 9))
    assert decode(page_with(ExitReason.SYSTEM_EVENT, "<II", 2, 0)) == SystemEvent(2)
    assert decode(page_with(ExitReason.DEBUG, "<IIQQQ", 1, 0, 0x1000, 0xFFFF4FF0, 0x400)) == \
        Debug(1, 0x1000, 0xFFFF4FF0, 0x400)
    assert decode(page_with(ExitReason.EXCEPTION, "<II", 13, 0x18)) == GuestException(13, 0x18)
    assert decode(page_with(ExitReason.UNKNOWN, "<Q", 0x30)) == Unknown(0x30)
    assert decode(page_with(ExitReason.NMI)) == Unsupported(ExitReason.NMI)


def test_reasons_and_their_names() -> None:
    assert reason_of(IoOut(0x80, 1, b"\0")) == ExitReason.IO == 2
    assert reason_of(INTERRUPTED) == ExitReason.INTR
    assert reason_of(Unsupported(99)) == 99
    assert reason_name(ExitReason.SHUTDOWN) == "SHUTDOWN" and reason_name(99) == "99"


@given(reason=st.integers(0, 2**32 - 1), payload=st.binary(min_size=256, max_size=256))
def test_any_page_decodes_to_some_exit(reason: int, payload: bytes) -> None:
    """A page KVM filled in with anything: a typed exit, never an exception."""
    page = page_with(reason)
    page[RUN_UNION : RUN_UNION + 256] = payload
    page[RUN_IF_FLAG] = payload[0]
    exit = decode(page)
    assert reason_of(exit) == reason or type(exit) in (IoIn, IoOut, MmioRead, MmioWrite)
