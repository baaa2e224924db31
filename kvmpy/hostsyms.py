"""Is a guest's RIP an address of this host's kernel? /proc/kallsyms, asked by a diagnosis.

Why: in the lab (nested SVM emulated by QEMU's TCG) a Linux guest that went quiet was
found running with RIP 0xffffffffc044520c, an address its own page tables do not map.
That is the host's side of the world: the instruction after VMRUN in the host's
kvm_amd (`__svm_vcpu_run`), so the vCPU was carrying its host's state, a fault below
kvmpy. A diagnosis that finds a RIP unmapped in the guest asks here, and says so when
the address is one of the host kernel's.

What it is: a lookup of the nearest symbol at or below an address in /proc/kallsyms,
named only if it is code (a data symbol, or none within 64 KiB, is no claim). What it
is not: a symbolizer for guests, or reliable without root (kallsyms shows zeros for
addresses to others, and then nothing is claimed).
"""

from __future__ import annotations

KALLSYMS = "/proc/kallsyms"
KERNEL_HALF = 0xFFFF_8000_0000_0000  # x86-64 kernels live in the upper canonical half
MAX_SYMBOL = 64 << 10  # past this distance from the nearest symbol, no claim is made
_TEXT = frozenset("tTwW")


def host_kernel_symbol(address: int, kallsyms: str | None = None) -> str | None:
    """'symbol+0xoff' ('[module] symbol+0xoff' in a module) for an address in this host
    kernel's text, or None: not a kernel address, not near a symbol, or hidden from us."""
    if address < KERNEL_HALF:
        return None
    # kallsyms prints addresses as 16 lowercase hex digits, so comparing the text is
    # comparing the numbers: no line but the answer is split or parsed
    key = f"{address:016x}"
    best = ""
    try:
        with open(kallsyms or KALLSYMS, encoding="ascii", errors="replace") as f:
            for line in f:
                if best[:16] < line[:16] <= key:
                    best = line
    except OSError:
        return None
    fields = best.split()
    try:
        start = int(fields[0], 16)
    except (IndexError, ValueError):
        return None
    if start == 0 or fields[1] not in _TEXT or address - start > MAX_SYMBOL:
        return None  # hidden addresses (zeros), data, or too far past any symbol
    where = f"{fields[2]}+{address - start:#x}"
    return f"{fields[3]} {where}" if len(fields) > 3 else where
