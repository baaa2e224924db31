"""Parsing sizes and addresses from the command line, with one-line errors."""

from __future__ import annotations

from kvmpy.errors import ConfigError

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'512M', '2G', '65536', '64K' -> bytes (binary units; a trailing 'iB'/'B' is allowed)."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = s[-1:] if s[-1:] in _SUFFIX else ""
    number = s[: len(s) - len(suffix)]
    try:
        value = int(number, 0) * _SUFFIX[suffix]
    except ValueError:
        raise ConfigError(f"bad size {text!r}: use a number with an optional K, M or G") from None
    if value <= 0:
        raise ConfigError(f"bad size {text!r}: must be positive")
    return value


def parse_address(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise ConfigError(f"bad address {text!r}: use a number like 0x10000") from None
    if value < 0:
        raise ConfigError(f"bad address {text!r}: must not be negative")
    return value
