"""Fast reset on this machine's /dev/kvm: a CPL3 guest scribbles over RAM, its registers
and a device; after `ResetPoint.reset()` guest RAM, every vCPU register set, the LAPIC
and each device's state are byte for byte what they were at the mark, and the guest
runs again exactly as the first time."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from kvmpy.api import Guest
from kvmpy.cpu import lapic
from kvmpy.cpu.modes import Mode
from kvmpy.errors import KvmpyError
from kvmpy.kvm.state import MSR_IA32_TSC, capture_vcpu
from kvmpy.machine import FlatConfig, Machine, MachineConfig
from kvmpy.memory import PAGE
from kvmpy.state.reset import mark
from kvmpy.stop import StopKind
from tests.kvm.test_snapshot import LIMIT, count_line, counter

pytestmark = pytest.mark.kvm

BASE, STRIDE = 8 << 20, 1 << 20  # the guest's first page, and the distance between two


def scribbler(guest_dir: Path, pages: int, mem_size: int = 128 << 20,
              irqchip: bool = False) -> MachineConfig:
    """scribble_cpl3: one word into each of `pages` pages 1 MiB apart from 8 MiB."""
    return MachineConfig(mem_size=mem_size, console=io.BytesIO(), flat=FlatConfig(
        guest_dir / "scribble_cpl3.bin", Mode.LONG, cpl=3, irqchip=irqchip,
        gprs={"rsi": BASE, "rdx": STRIDE, "rcx": pages, "r8": 0xA5A5_5A5A_0123_4567}))


def ram(machine: Machine) -> list[bytes]:
    return [bytes(region.view) for region in machine.memory]


def vcpu_state(machine: Machine) -> list[dict[str, object]]:
    """Every vCPU's saved state but the TSC, which runs on while the test looks."""
    out = []
    for vcpu in machine.vcpus:
        state = capture_vcpu(vcpu)
        state["msrs"] = [m for m in state["msrs"] if m[0] != MSR_IA32_TSC]
        out.append(state)
    return out


def device_state(machine: Machine) -> dict[str, object]:
    return {name: owner.state() for name, owner in machine.stateful().items()}


@pytest.mark.parametrize("irqchip", [False, True], ids=["plain", "irqchip"])
def test_reset_puts_back_ram_registers_lapic_and_devices(guest_dir: Path,
                                                         irqchip: bool) -> None:
    m = Machine(scribbler(guest_dir, 64, irqchip=irqchip))
    try:
        point = mark(m)
        ram0, vcpus0, devices0 = ram(m), vcpu_state(m), device_state(m)
        for run in range(3):
            stop = m.run()
            assert stop.kind is StopKind.DEBUG_EXIT and stop.status == 0, stop
            assert m.memory.read_u64(BASE + 63 * STRIDE) == 0xA5A5_5A5A_0123_4567
            assert device_state(m) != devices0 and vcpu_state(m) != vcpus0
            m.memory.write(BASE - PAGE, b"DMA" * 100)  # as a device writes guest RAM
            if irqchip:  # a CPL3 guest cannot reach its LAPIC: the host scribbles on it
                page = bytearray(m.vcpus[0].get_lapic())
                lapic.write_u32(page, lapic.LVT_LINT0, 0x10000 | 0x30 + run)
                m.vcpus[0].set_lapic(bytes(page))
                assert vcpu_state(m)[0]["lapic"] != vcpus0[0]["lapic"]
            copied = point.reset()
            # the guest's 64 pages and its data page, the device's, page tables KVM set
            # accessed/dirty bits in: a handful more than 64, nowhere near the 32,768
            assert 65 <= copied <= 80, copied
            assert ram(m) == ram0
            assert vcpu_state(m) == vcpus0
            assert device_state(m) == devices0
    finally:
        m.close()


@pytest.mark.parametrize("kind", ["real", "cpl3"])
def test_a_guest_marked_mid_run_prints_the_same_rest_after_each_reset(
        guest_dir: Path, tmp_path: Path, kind: str) -> None:
    """Guest.mark() on a running counter (its count kept in a register, RAM and, at
    CPL3, %xmm0, compared before each line; the real-mode one on two vCPUs with the
    in-kernel irqchip, a disk and virtio-rng), run to its end, reset: it runs again
    from the mark and prints exactly what it printed after the mark, three times."""
    with Guest.from_config(counter(guest_dir, kind, tmp_path)) as g:
        g.expect(count_line(kind, 0x10) + "\n", 60)
        g.pause()
        at_mark = len(g.output)
        g.mark()
        g.resume()
        rests = []
        for _ in range(3):
            stop = g.wait(120)
            assert stop is not None and stop.status == 0, stop
            rests.append(g.output[at_mark:])
            at_mark = len(g.output)
            g.reset()
        assert rests[0].endswith(count_line(kind, LIMIT) + "\n"), rests[0]
        assert "MISMATCH" not in rests[0] and rests == [rests[0]] * 3
        g.stop()


def test_mark_and_reset_of_a_paused_guest(guest_dir: Path) -> None:
    """A running machine is refused; a paused one is marked and reset, and stays paused."""
    with Guest.flat(guest_dir / "spin.bin", irqchip=True) as g:
        with pytest.raises(KvmpyError, match="running"):
            mark(g.machine)
        g.pause()
        point = mark(g.machine)
        regs = capture_vcpu(g.machine.vcpus[0])["regs"]
        g.resume()
        time.sleep(0.05)
        g.pause()
        point.reset()
        assert g.paused and capture_vcpu(g.machine.vcpus[0])["regs"] == regs
        g.resume()
        assert g.running()
