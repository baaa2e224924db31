"""What the lab's emulator makes every Linux guest say, whatever its VMM.

Why: the lab reads every guest's kernel log for distress (`kvmpy.distress`), and a
few complaints come from the lab itself, not from the VMM under test: each is listed
here with the evidence that QEMU microvm's guest says it too, in the same lab. They
are allowed inside the lab only (`here()`): on real hardware they would be real.

- "XSAVE consistency problem: size 2696 != kernel_size 576" (then `WARNING: ... at
  arch/x86/kernel/fpu/xstate.c ... fpu__init_system_xstate` and a dump of CPUID 0xD):
  the guest enabled AVX and PKRU in XCR0, but the lab's KVM answers CPUID 0xD.0 with
  the size for x87 and SSE only, the XCR0 it believes the guest has. QEMU 7.2's TCG
  runs a nested guest's XSETBV itself, without an SVM exit to the lab's KVM (its
  `helper_xsetbv` checks no intercept), so KVM never learns of it. Seen 2026-12-06 with
  Debian's cloud kernel on kvmpy and on QEMU microvm (`-cpu host`) in one lab; the
  guest falls back to FXSAVE.
"""

from __future__ import annotations

import os

from kvmpy.lab.runner import INSIDE_ENV

LAB_QUIRKS: tuple[str, ...] = (
    r"WARNING: CPU: \d+ PID: \d+ at arch/x86/kernel/fpu/xstate\.c:\d+ fpu__init_system_xstate",
)


def here() -> tuple[str, ...]:
    """LAB_QUIRKS inside the lab, nothing elsewhere: patterns for `kvmpy.distress`."""
    return LAB_QUIRKS if os.environ.get(INSIDE_ENV) == "1" else ()
