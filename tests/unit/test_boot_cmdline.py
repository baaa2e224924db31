"""Kernel command line: ASCII, no NUL, within the kernel's limit, written NUL-terminated."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy import layout
from kvmpy.boot.cmdline import COMMAND_LINE_SIZE, encode_cmdline, write_cmdline
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory


def memory() -> GuestMemory:
    return GuestMemory.from_buffer(bytearray(0x40000))


def test_written_nul_terminated_at_layout_cmdline():
    mem = memory()
    mem.fill(layout.CMDLINE, 64, 0xFF)
    c = write_cmdline(mem, "console=ttyS0 panic=-1")
    assert c.gpa == layout.CMDLINE and c.text == "console=ttyS0 panic=-1" and c.size == 23
    assert mem.read(layout.CMDLINE, 24) == b"console=ttyS0 panic=-1\0\xff"


def test_empty_command_line_is_one_nul():
    assert encode_cmdline("") == b"\0"


def test_limits():
    assert encode_cmdline("a" * 255, max_len=255) == b"a" * 255 + b"\0"
    with pytest.raises(ConfigError) as info:
        encode_cmdline("a" * 256, max_len=255)
    assert str(info.value) == "kernel command line is 256 bytes, the kernel accepts at most 255"
    assert len(encode_cmdline("x" * (COMMAND_LINE_SIZE - 1))) == COMMAND_LINE_SIZE
    with pytest.raises(ConfigError):
        encode_cmdline("x" * COMMAND_LINE_SIZE)
    # A header that claims more than kvmpy's window still cannot overflow it.
    with pytest.raises(ConfigError, match="at most 65535"):
        encode_cmdline("x" * layout.CMDLINE_MAX, max_len=1 << 20)


def test_bad_characters():
    with pytest.raises(ConfigError) as info:
        encode_cmdline("root=/dev/vda\0init=/bin/sh")
    assert str(info.value) == "kernel command line contains a NUL at offset 13"
    with pytest.raises(ConfigError) as info:
        encode_cmdline("quiet café")
    assert str(info.value) == "kernel command line is not ASCII: 'é' at offset 9"


@given(st.text(max_size=300), st.integers(0, 400))
def test_any_text_is_written_verbatim_or_refused(text, max_len):
    mem = memory()
    try:
        c = write_cmdline(mem, text, max_len)
    except ConfigError as e:
        assert "\n" not in str(e)
        assert "\0" in text or not text.isascii() or len(text) > max_len
        return
    assert text.isascii() and "\0" not in text and len(text) <= max_len
    assert mem.read(c.gpa, c.size) == text.encode() + b"\0"
