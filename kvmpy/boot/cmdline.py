"""The kernel command line: validated, then written NUL-terminated at `layout.CMDLINE`.

What it is: the check that a command line is printable ASCII without NUL and
fits the kernel's limit, and the write into guest RAM. The limit is the
bzImage header's `cmdline_size` (boot.rst: "maximum size of the command line
without the terminating zero"); kernels without a header (vmlinux, PVH) copy
COMMAND_LINE_SIZE = 2048 bytes including the NUL (arch/x86/include/asm/setup.h).

What it is not: it does not parse or merge options; the caller composes the string.
"""

from __future__ import annotations

from typing import NamedTuple

from kvmpy import layout
from kvmpy.errors import ConfigError
from kvmpy.memory import GuestMemory

COMMAND_LINE_SIZE = 2048  # x86 boot_command_line[], NUL included
DEFAULT_MAX_LEN = COMMAND_LINE_SIZE - 1


class Cmdline(NamedTuple):
    """A command line as written into guest RAM."""

    gpa: int
    text: str

    @property
    def size(self) -> int:
        """Bytes in guest RAM, the terminating NUL included."""
        return len(self.text) + 1


def encode_cmdline(text: str, max_len: int = DEFAULT_MAX_LEN) -> bytes:
    """`text` as NUL-terminated ASCII; ConfigError if it has NUL, non-ASCII or is too long."""
    if "\0" in text:
        raise ConfigError(f"kernel command line contains a NUL at offset {text.index(chr(0))}")
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError as e:
        raise ConfigError(
            f"kernel command line is not ASCII: {text[e.start]!r} at offset {e.start}"
        ) from None
    limit = min(max_len, layout.CMDLINE_MAX - 1)
    if len(data) > limit:
        raise ConfigError(
            f"kernel command line is {len(data)} bytes, the kernel accepts at most {limit}"
        )
    return data + b"\0"


def write_cmdline(
    memory: GuestMemory, text: str, max_len: int = DEFAULT_MAX_LEN, gpa: int = layout.CMDLINE
) -> Cmdline:
    """Validate `text` and write it NUL-terminated at `gpa`."""
    memory.write(gpa, encode_cmdline(text, max_len))
    return Cmdline(gpa, text)
