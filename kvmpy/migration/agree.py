"""What both ends of a migration must agree on before any page moves.

What it is: `identity(machine)` says what a machine is made of, as far as the guest can
tell: RAM size and layout, vCPU count, the in-kernel irqchip and PIT, each device by
its state section and kind (a disk's size and whether it is read-only too), and the
CPUID each vCPU was given. `differ(here, there)` names the first difference in one
line. The source sends its identity in its hello and the destination answers with its
own, so each end can refuse a mismatch in its own words: a guest moved to a machine
with another CPU count, less RAM, a missing device or other CPU features would break
in ways no later check could undo.

What is left out: how each end was booted (the destination does not boot), which
host files or taps it uses (shared storage: the same image; each end its own tap),
and how each end is watched (tracing, statistics).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from kvmpy.state.config import describe

if TYPE_CHECKING:
    from kvmpy.machine import Machine


def identity(machine: Machine) -> dict[str, Any]:
    config = machine.config
    describe(config)  # refuses what no saved state can hold (9p, vsock) in one line
    devices = []
    for name, owner in machine.stateful().items():  # (a virtio transport: its device's kind)
        devices.append(f"{name}:{type(getattr(owner, 'device', owner)).__name__}")
    disks = []
    for disk in config.disks:
        try:
            size = os.stat(disk.path).st_size
        except OSError:
            size = -1
        disks.append({"read_only": disk.read_only, "size": size})
    return {
        "mem_size": config.mem_size,
        "regions": [[r.gpa, r.size] for r in machine.memory],
        "cpus": config.cpus,
        "irqchip": machine.vm.irqchip,
        "pit": machine.vm.pit,
        "devices": devices,
        "disks": disks,
        "cpuid": [[list(e) for e in cpuid] for cpuid in machine.cpuids],
    }


def differ(here: dict[str, Any], there: Any) -> str | None:
    """One line for the first way `there` (the other end's identity, untrusted) is not
    `here`; None when they agree."""
    if not isinstance(there, dict):
        return "the other end did not describe its machine"
    for key, mine in here.items():
        theirs = there.get(key)
        if theirs == mine:
            continue
        if key == "cpuid":
            return _cpuid_difference(mine, theirs)
        return f"the machines differ in {key}: {_say(mine)} here, {_say(theirs)} there"
    extra = sorted(set(there) - set(here))
    if extra:
        return f"the other end's machine has {extra[0]!r}, unknown here"
    return None


def _cpuid_difference(mine: list[Any], theirs: Any) -> str:
    if not isinstance(theirs, list) or len(theirs) != len(mine):
        return "the machines differ in CPUID (another vCPU count)"
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        if a != b:
            here = {tuple(e[:2]): e for e in a}
            there = {tuple(e[:2]): e for e in b if isinstance(e, list) and len(e) >= 2}
            keys = sorted(k for k in here.keys() | there.keys() if here.get(k) != there.get(k))
            leaf = f"leaf {keys[0][0]:#x}.{keys[0][1]}" if keys else "its entries"
            return (f"the machines differ in CPUID: vCPU {i}, {leaf} first (another CPU or "
                    "KVM)")
    return "the machines differ in CPUID"


def _say(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
