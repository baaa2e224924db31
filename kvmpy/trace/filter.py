"""The `--trace=FILTER` language: which VM exits get a trace line.

    FILTER  := TERM ("," TERM)*
    TERM    := REASON                      io, mmio, hlt, intr, debug, shutdown, ...
             | "port:" RANGE               port I/O exits to these ports
             | "addr:" RANGE               MMIO exits to these guest-physical addresses
             | "dev:" GLOB                 exits a device with this bus label handled
    RANGE   := NUMBER ["-" NUMBER]         inclusive; decimal or 0x hex

Reasons are alternatives; `port:` implies the reason io, `addr:` mmio and
`dev:` both. The address and device terms then narrow down the port I/O and
MMIO exits only: a port I/O exit must match some `port:` range (if any is
given), an MMIO exit some `addr:` range (if any), and either must be handled
by a `dev:` device (if any). So `--trace=hlt,port:0x3f8-0x3ff` shows halts and
the serial port, `--trace=io,dev:serial*` port I/O handled by the serial ports,
`--trace=mmio,port:0x80` every MMIO exit and port 0x80. An empty filter shows
every exit.

What it is not: a query on anything the trace line shows. It decides from
what is known before reading registers (reason, address, device), so that
filtered-out exits cost only the match.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from kvmpy.errors import ConfigError
from kvmpy.kvm.exits import ExitReason

ALIASES = {"pio": "IO", "kick": "INTR", "triple_fault": "SHUTDOWN", "fail": "FAIL_ENTRY",
           "internal": "INTERNAL_ERROR", "event": "SYSTEM_EVENT"}


@dataclass(frozen=True)
class TraceFilter:
    reasons: frozenset[int] = frozenset()
    ports: tuple[tuple[int, int], ...] = ()
    addresses: tuple[tuple[int, int], ...] = ()  # MMIO guest-physical
    devices: tuple[str, ...] = field(default=())

    @classmethod
    def parse(cls, text: str | None) -> TraceFilter:
        """Parse FILTER; raises ConfigError with the offending term."""
        reasons: set[int] = set()
        ports: list[tuple[int, int]] = []
        addresses: list[tuple[int, int]] = []
        devices: list[str] = []
        for term in (text or "").split(","):
            term = term.strip()
            if not term:
                continue
            kind, sep, value = term.partition(":")
            kind = kind.strip().lower()
            if sep and kind == "port":
                lo, hi = _range(value, term)
                if hi > 0xFFFF:
                    raise ConfigError(f"--trace: port {hi:#x} in {term!r} is above 0xffff")
                ports.append((lo, hi))
            elif sep and kind in ("addr", "mmio"):
                addresses.append(_range(value, term))
            elif sep and kind in ("dev", "device"):
                if not value.strip():
                    raise ConfigError(f"--trace: {term!r} names no device")
                devices.append(value.strip())
            elif not sep:
                reasons.add(_reason(term))
            else:
                raise ConfigError(f"--trace: unknown filter {term!r} (use a reason, port:, "
                                  "addr: or dev:)")
        return cls(frozenset(reasons), tuple(ports), tuple(addresses), tuple(devices))

    @property
    def everything(self) -> bool:
        return not (self.reasons or self.ports or self.addresses or self.devices)

    @property
    def all_reasons(self) -> frozenset[int]:
        """The reasons asked for, with those the address and device terms imply."""
        implied = set(self.reasons)
        if self.ports or self.devices:
            implied.add(ExitReason.IO)
        if self.addresses or self.devices:
            implied.add(ExitReason.MMIO)
        return frozenset(implied)

    def matches(self, reason: int, bus: str | None = None, addr: int | None = None,
                device: str | None = None) -> bool:
        """Does an exit of `reason` (on `bus` at `addr`, handled by `device`) pass?"""
        if self.everything:
            return True
        if reason not in self.all_reasons:
            return False
        if bus is None:
            return True
        ranges = self.ports if bus == "pio" else self.addresses
        if ranges and (addr is None or not any(lo <= addr <= hi for lo, hi in ranges)):
            return False
        if self.devices:
            if device is None or not any(fnmatch.fnmatchcase(device, g) for g in self.devices):
                return False
        return True


def _number(text: str, term: str) -> int:
    try:
        value = int(text.strip(), 0)
    except ValueError:
        raise ConfigError(f"--trace: {text.strip()!r} in {term!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"--trace: negative address in {term!r}")
    return value


def _range(text: str, term: str) -> tuple[int, int]:
    lo_text, dash, hi_text = text.partition("-")
    lo = _number(lo_text, term)
    hi = _number(hi_text, term) if dash else lo
    if hi < lo:
        raise ConfigError(f"--trace: range {text!r} ends before it starts")
    return lo, hi


def _reason(term: str) -> int:
    name = ALIASES.get(term.lower(), term.upper())
    try:
        return int(ExitReason[name])
    except KeyError:
        known = ", ".join(sorted(r.name.lower() for r in ExitReason))
        raise ConfigError(f"--trace: unknown exit reason {term!r} (known: {known})") from None
