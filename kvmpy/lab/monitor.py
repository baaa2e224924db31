"""What the lab's CPUs are doing, asked of QEMU's human monitor (the job's monitor.sock).

Why: a lab that stops making progress shows nothing from inside, since every process in
it, `timeout` included, has stopped. QEMU still knows each lab CPU's state. Two lab hangs
read this way on 2026-11-26 were QEMU's (TCG): both CPUs looping through an int3 at a
patched jump with interrupts off, and a CPU halted with interrupts on and its timer
vector pending in the LAPIC's IRR, never woken. `cpu_states` puts that in one line,
with each RIP named from the lab kernel's symbols (`kvmpy.lab.symbols`).
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

from kvmpy.cpu.registers import RFLAGS_IF
from kvmpy.lab.symbols import Symbolizer

PROMPT = b"(qemu) "
_RIP = re.compile(r"RIP=([0-9a-f]+) RFL=([0-9a-f]+) .*?CPL=(\d) .*?HLT=(\d)")
_LAPIC_CPU = re.compile(r"dumping local APIC state for CPU (\d+)")
_IRR = re.compile(r"^IRR\s+(.*)$", re.MULTILINE)


def ask(path: Path, commands: list[str], timeout: float = 5.0) -> list[str]:
    """Each command's answer (echo and prompt removed); OSError if the monitor is gone."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        _read_to_prompt(s)  # the banner
        answers = []
        for command in commands:
            s.sendall(command.encode() + b"\n")
            text = _read_to_prompt(s).decode(errors="replace")
            answers.append(text.split("\n", 1)[1] if "\n" in text else "")
        return answers


def _read_to_prompt(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(PROMPT):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.removesuffix(PROMPT)


def cpu_states(path: Path, cpus: int, symbolize: Symbolizer | None = None,
               samples: int = 2, interval: float = 1.0) -> str:
    """Each lab CPU's RIP (named by `symbolize`), CPL, halted, interrupts on and LAPIC IRR,
    asked `samples` times `interval` seconds apart (a livelock moves, a lost wake-up
    does not); or why it is not known."""
    commands = ["info registers -a"]
    for cpu in range(cpus):
        commands += [f"cpu {cpu}", "info lapic"]
    lines = []
    for n in range(samples):
        if n:
            time.sleep(interval)
        try:
            answers = ask(path, commands)
        except OSError as e:
            return f"QEMU's monitor did not answer: {e}"
        lines.append(describe(answers[0], answers[2::2], symbolize))
    if len(set(lines)) == 1:
        return lines[0] + (f" (the same {samples} times, {interval:g} s apart)"
                           if samples > 1 else "")
    return " | then: ".join(lines)


def describe(registers: str, lapics: list[str], symbolize: Symbolizer | None = None) -> str:
    """One line from `info registers -a` and each CPU's `info lapic`."""
    irr = {}
    for answer in lapics:
        which, pending = _LAPIC_CPU.search(answer), _IRR.search(answer)
        if which and pending:
            irr[int(which.group(1))] = pending.group(1).strip()

    def where(rip: str) -> str:
        name = symbolize(int(rip, 16)) if symbolize else None
        return f"rip={rip}" + (f" ({name})" if name else "")

    return "; ".join(
        f"cpu{i} {where(rip)} cpl={cpl} {'halted' if hlt == '1' else 'running'} "
        f"if={int(bool(int(rfl, 16) & RFLAGS_IF))} irr={irr.get(i, '?')}"
        for i, (rip, rfl, cpl, hlt) in enumerate(_RIP.findall(registers))
    ) or "no CPU state from QEMU"
