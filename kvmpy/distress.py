"""Is a Linux guest's kernel in distress? Read from its console transcript (or `dmesg`).

Why: a guest can keep going after its kernel has said something is badly wrong. A
virtio-net transmit queue that timed out and was reset (NETDEV WATCHDOG), a block
request retried after an I/O error, a `WARNING:` with its call trace, an RCU stall or an
interrupt that "nobody cared" about all leave the data arriving in the end, so a test
that only checks the data passes. The kernel log says so; `distress(text)` finds it.

What it is: a table of signs (`SIGNS`), each a name and a regular expression for one
kind of line the kernel prints when in trouble (the oops family, lockups and stalls,
lost interrupts, device timeouts and I/O errors, virtqueue corruption, ACPI
complaints), and `check_calm(text)`, which raises `GuestInDistress` listing every such
line. `allow` exempts lines a caller provoked on purpose.

What it is not: a parser of kernel logs. It reads lines as text, whatever their
source; what the console carries depends on the console log level: `quiet` (level 4)
hides `WARNING:` and the call traces printed with it, so a guest whose distress must
be seen boots without `quiet`, or with `loglevel=5` after it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from kvmpy.acpi.linuxlog import COMPLAINT as ACPI_COMPLAINT
from kvmpy.errors import KvmpyError


class Sign(NamedTuple):
    kind: str
    pattern: re.Pattern[str]


def _sign(kind: str, pattern: str, flags: int = 0) -> Sign:
    return Sign(kind, re.compile(pattern, flags))


# Each from the kernel's own message, as Linux 6.1 prints it (file where it is printed);
# a line counts once, as the first kind it matches (a soft lockup says "BUG:" too).
SIGNS: tuple[Sign, ...] = (
    _sign("panic", r"Kernel panic"),  # kernel/panic.c
    # (not "NMI watchdog: Perf NMI watchdog permanently disabled": no perf counters)
    _sign("lockup", r"soft lockup|hard LOCKUP"),  # kernel/watchdog*.c
    _sign("bug", r"\bBUG:"),  # BUG(), sleeping in atomic context, bad page state...
    _sign("warning", r"\bWARNING:"),  # WARN_ON: kernel/panic.c __warn()
    _sign("call trace", r"Call Trace:"),  # arch/x86/kernel/dumpstack.c
    _sign("oops", r"\bOops\b|general protection fault|invalid opcode: |double fault"
                  r"|Unable to handle (?:kernel|page fault)"),  # arch/x86/mm/fault.c, traps.c
    _sign("rcu stall", r"detected stalls? on CPU|self-detected stall|rcu_\w+ kthread"
                       r" (?:starved|timer wakeup didn't happen)"),  # kernel/rcu/tree_stall.h
    _sign("hung task", r"INFO: task \S+ blocked for more than"),  # kernel/hung_task.c
    _sign("nmi", r"NMI received for unknown reason|Dazed and confused"),  # arch/x86/kernel/nmi.c
    _sign("irq", r"nobody cared|Disabling IRQ #|too much work for irq"),  # kernel/irq/spurious.c,
    # drivers/tty/serial/8250/8250_core.c
    _sign("netdev watchdog", r"NETDEV WATCHDOG|transmit queue \d+ timed out"
                             r"|TX timeout on queue"),  # net/sched/sch_generic.c, virtio_net.c
    _sign("i/o error", r"I/O error|critical (?:medium|target|nexus|space allocation) error"
                       r"|blk_update_request|end_request:"),  # block/blk-core.c, fs/buffer.c
    _sign("fs error", r"EXT4-fs (?:error|warning)|JBD2: .*(?:error|abort)"
                      r"|Remounting filesystem read-only"),  # fs/ext4/super.c, fs/jbd2
    _sign("timeout", r"\b(?:vd[a-z]+|hvc\d+|ttyS\d+|eth\d+|virtio\d+|hwrng)\b.*"
                     r"\btime(?:d)? ?out", re.IGNORECASE),  # a timeout on a kvmpy device
    _sign("virtqueue", r"is not a head!|id \d+ out of range|Bad virtqueue length"
                       r"|virtio: device refuses features|failed add_buf"
                       r"|Errors adding \d+ buffers back to vq"),  # drivers/virtio, virtio_console
    _sign("msr", r"unchecked MSR access error"),  # arch/x86/mm/extable.c: a missing MSR
    _sign("segfault", r"\bsegfault at\b|\btraps: \S+\[\d+\]"),  # arch/x86/kernel/traps.c
    _sign("oom", r"invoked oom-killer|Out of memory"),  # mm/oom_kill.c
    _sign("acpi", ACPI_COMPLAINT.pattern),  # kvmpy.acpi.linuxlog: Linux on kvmpy's tables
)


class Distress(NamedTuple):
    kind: str
    line: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.line}"


def distress(text: str, allow: Iterable[str | re.Pattern[str]] = ()) -> list[Distress]:
    """Every line of `text` that shows the kernel in distress, in order, with its kind.

    `allow`: patterns (searched in the line) of lines the caller expects, e.g. the
    I/O error of a write it made to a read-only disk on purpose. The call trace printed
    after an allowed line is allowed with it."""
    exempt = [re.compile(a) if isinstance(a, str) else a for a in allow]
    found = []
    excused = False  # the last sign was allowed: so is the call trace printed with it
    for raw in text.splitlines():
        line = raw.strip("\r\x00 ")
        for sign in SIGNS:
            if sign.pattern.search(line):
                if sign.kind != "call trace":
                    excused = any(a.search(line) for a in exempt)
                if not (excused or any(a.search(line) for a in exempt)):
                    found.append(Distress(sign.kind, line))
                break
    return found


class GuestInDistress(KvmpyError):
    """A guest's kernel log shows distress; the message lists the lines."""


def check_calm(text: str, allow: Iterable[str | re.Pattern[str]] = (),
               what: str = "the guest") -> None:
    """Raise GuestInDistress, with the lines (at most 40) and what follows the first, if
    `text` shows distress (see `distress`)."""
    found = distress(text, allow)
    if not found:
        return
    lines = [f"  {d}" for d in found[:40]]
    if len(found) > 40:
        lines.append(f"  ... and {len(found) - 40} more")
    after = _following(text, found[0].line)
    raise GuestInDistress(f"{what}'s kernel log shows distress ({len(found)} line(s)):\n"
                          + "\n".join(lines) + "\n--- from the first one on:\n" + after)


def _following(text: str, first: str, count: int = 30) -> str:
    """The `count` lines of `text` from the one that is `first` (a call trace follows it)."""
    lines = [ln.strip("\r\x00 ") for ln in text.splitlines()]
    start = lines.index(first) if first in lines else 0
    return "\n".join(lines[start:start + count])
