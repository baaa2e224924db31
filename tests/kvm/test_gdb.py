"""The gdb stub against the real gdb (batch mode) and a raw protocol client, on test guests."""

from __future__ import annotations

import io
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmpy.cpu.modes import Mode
from kvmpy.flat import start_flat
from kvmpy.gdb.protocol import PacketReader, frame
from kvmpy.gdb.stub import GdbConfig
from kvmpy.machine import FlatConfig, Machine, MachineConfig
from kvmpy.stop import Stop, StopKind

pytestmark = pytest.mark.kvm
GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed")


class Kvmpy:
    """`kvmpy run ... --gdb 0` in the background, and the port it announced."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", *args, "--gdb", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        found = re.search(r"gdb stub listening on 127\.0\.0\.1:(\d+)", line)
        assert found, line
        self.port = int(found.group(1))

    def finish(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, out, err


def gdb(port: int, elf: Path | None, *commands: str, before: tuple[str, ...] = ()) -> str:
    argv = [str(GDB), "-batch", "-nx", "-ex", "set pagination off"]
    for c in before:
        argv += ["-ex", c]
    argv += ["-ex", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        argv += ["-ex", c]
    if elf is not None:
        argv.append(str(elf))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


@needs_gdb
def test_breakpoint_step_registers_memory_continue(guest_dir: Path) -> None:
    vm = Kvmpy("--flat", str(guest_dir / "hello_long.bin"), "--mode", "long")
    out = gdb(vm.port, guest_dir / "hello_long.elf",
              "p/x $pc", "break print", "continue", "p/x $rsi", "x/s $rsi", "stepi",
              "p/x $pc", "p/x $al", "p/x $cr0", "p/x $cr3", "p/x $efer", "delete", "continue")
    assert "0x0000000000010000 in _start ()" in out  # halted at the first instruction
    assert "Breakpoint 1, 0x0000000000010031 in print ()" in out
    assert '0x1004e:\t"Hello from long mode\\n"' in out  # memory through the page tables
    values = re.findall(r"^\$\d+ = (\S+)$", out, re.M)
    assert values == ["0x10000", "0x1004e", "0x10032", "0x48", "0x80010033", "0x9000", "0xd01"]
    assert "exited normally" in out
    status, stdout, _ = vm.finish()
    assert status == 0 and stdout == "Hello from long mode\n"


@needs_gdb
def test_hardware_breakpoint_and_writes(guest_dir: Path) -> None:
    vm = Kvmpy("--flat", str(guest_dir / "hello_long.bin"), "--mode", "long")
    out = gdb(vm.port, guest_dir / "hello_long.elf",
              "hbreak *0x10047", "continue", "continue", "p/c $al", "set var $rax = 0x41",
              "set {char}0x10052 = 0x4c", "info threads", "delete", "continue")
    assert "Hardware assisted breakpoint 1 at 0x10047" in out
    assert out.count("Breakpoint 1, 0x0000000000010047 in print ()") == 2
    assert "$1 = 101 'e'" in out
    assert re.search(r"\* 1\s+Thread 1 \(vCPU 0 \(64-bit long mode\)\)", out)
    status, stdout, _ = vm.finish()
    assert status == 0 and stdout == "HAllL from long mode\n"


@needs_gdb
def test_real_mode_guest(guest_dir: Path) -> None:
    vm = Kvmpy("--flat", str(guest_dir / "hello_real.bin"))
    hint = vm.proc.stderr.readline()  # type: ignore[union-attr]
    assert "`set architecture i8086` before `target remote`" in hint
    out = gdb(vm.port, guest_dir / "hello_real.elf", "break *0x10016", "continue", "p/x $pc",
              "p/x $cs", "p/x $eip", "x/s 0x1001c", "x/2i $pc", "stepi", "p/x $pc", "delete",
              "continue",
              before=("set architecture i8086",))
    # a guest in real mode gets gdb's i386 layout (so i8086 is allowed), and $pc is the
    # linear address CS.base + IP: it matches the breakpoint and the flat guest's symbols
    assert "Breakpoint 1, 0x00010016 in next ()" in out
    assert re.findall(r"^\$\d+ = (\S+)$", out, re.M) == ["0x10016", "0x1000", "0x10016",
                                                          "0x10017"]
    assert '0x1001c <msg>:\t"Hello from real mode\\n"' in out
    assert re.search(r"0x10016 <next\+18>:\s+out\s+%al,\(%dx\)\n\s+0x10017 <next\+19>:\s+jmp",
                     out), out
    status, stdout, _ = vm.finish()
    assert status == 0 and stdout == "Hello from real mode\n"


@needs_gdb
def test_a_dying_guest_stops_in_gdb_first(guest_dir: Path) -> None:
    vm = Kvmpy("--flat", str(guest_dir / "fail_divide.bin"), "--mode", "long")
    out = gdb(vm.port, guest_dir / "fail_divide.elf", "continue", "p/x $pc", "p/x $rcx",
              "x/i $pc", "continue")
    assert "Program received signal SIGSEGV" in out
    assert re.findall(r"^\$\d+ = (\S+)$", out, re.M) == ["0x10007", "0x0"]
    assert re.search(r"<divide>:\s+div\s+%ecx", out)
    assert "exited with code 04" in out
    status, _, err = vm.finish()
    assert status == 4 and "vCPU 0: triple fault" in err
    assert "most likely cause: #DE (divide error)" in err


@needs_gdb
def test_detach_lets_the_guest_finish(guest_dir: Path) -> None:
    vm = Kvmpy("--flat", str(guest_dir / "hello_long.bin"), "--mode", "long")
    out = gdb(vm.port, None, "break *0x10031", "continue", "detach")
    assert "[Inferior 1 (Remote target) detached]" in out
    status, stdout, err = vm.finish()
    assert status == 0 and stdout == "Hello from long mode\n"
    assert "gdb detached; the VM runs on" in err


def test_bad_gdb_options_are_one_line(guest_dir: Path) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    for value, message in ((str(port), "cannot listen on 127.0.0.1"),
                           ("nope", "is not PORT or HOST:PORT"), ("70000", "out of range")):
        r = subprocess.run([sys.executable, "-m", "kvmpy", "run", "--flat",
                            str(guest_dir / "hello_real.bin"), "--gdb", value],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1
    taken.close()


class Rsp:
    """A minimal gdb: packets out, acks and replies in."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.reader = PacketReader()
        self.backlog: list[bytes] = []

    def send(self, packet: str) -> None:
        self.sock.sendall(frame(packet.encode()))

    def reply(self) -> str:
        while not self.backlog:
            data = self.sock.recv(65536)
            assert data, "stub closed the connection"
            self.backlog += [e.payload for e in self.reader.feed(data) if e.kind == "packet"]
        self.sock.sendall(b"+")
        return self.backlog.pop(0).decode()

    def __call__(self, packet: str) -> str:
        self.send(packet)
        return self.reply()


def test_two_vcpus_ctrl_c_threads_and_vcont(guest_dir: Path) -> None:
    """Both vCPUs spin in `out; dec ecx; jnz` (real mode) until gdb stops them."""
    flat = FlatConfig(guest_dir / "pio_loop.bin", Mode.REAL, gprs={"rcx": 0xFFFFFFFF})
    machine = Machine(MachineConfig(mem_size=16 << 20, cpus=2, flat=flat, gdb=GdbConfig(0),
                                    console=io.BytesIO()))
    start_flat(machine.vcpus[1], machine.memory, Mode.REAL, 0x10000, rcx=0xFFFFFFFF)
    done: list[Stop] = []
    runner = threading.Thread(target=lambda: done.append(machine.run()))
    runner.start()
    try:
        gdb = Rsp(machine.gdb.port)  # type: ignore[union-attr]
        assert "hwbreak+" in gdb("qSupported:swbreak+;hwbreak+")
        assert gdb("?") == "T05thread:1;"
        assert (gdb("qfThreadInfo"), gdb("qsThreadInfo")) == ("m1,2", "l")
        assert gdb("vCont?") == "vCont;c;C;s;S"
        gdb.send("vCont;c")
        time.sleep(0.3)
        gdb.sock.sendall(b"\x03")  # Ctrl-C
        assert gdb.reply() == "T02thread:1;"
        # each thread's RCX counts down on its own
        assert gdb("qXfer:features:read:target.xml:0,40").startswith("m<?xml")
        assert gdb("Hg1") == "OK"
        ecx1 = int.from_bytes(bytes.fromhex(gdb("p1")), "little")  # i386 layout: ecx is 1
        assert gdb("Hg2") == "OK"
        ecx2 = int.from_bytes(bytes.fromhex(gdb("p1")), "little")
        assert ecx1 < 0xFFFFFFFF and ecx2 < 0xFFFFFFFF
        assert bytes.fromhex(gdb("qThreadExtraInfo,2")) == b"vCPU 1 (real mode)"
        # a hardware breakpoint on the `out` (linear 0x10004) stops whoever gets there
        assert gdb("Z1,10004,1") == "OK"
        gdb.send("vCont;c")
        stop = re.fullmatch(r"T05thread:([12]);hwbreak:;", gdb.reply())
        assert stop is not None
        thread = stop.group(1)
        # eip (register 8) is linear: CS.base 0x10000 + IP 4
        assert gdb(f"Hg{thread}") == "OK" and gdb("p8") == "04000100"
        # step only that thread: from the breakpoint to the next instruction
        gdb.send(f"vCont;s:{thread}")
        assert gdb.reply() == f"T05thread:{thread};"
        assert gdb("p8") == "05000100"  # one instruction, though `out` left to the VMM
        assert gdb("z1,10004,1") == "OK"
        # memory at a linear address: the guest's own code
        assert gdb("m10004,1") == "ee"
        gdb.send("vKill;1")
        assert gdb.reply() == "OK"
        runner.join(10)
        assert done and done[0].reason == "killed by gdb"
    finally:
        if runner.is_alive():
            machine.request_stop(Stop(StopKind.POWEROFF, "test cleanup"))
            runner.join(10)
        machine.close()


def test_sigusr2_prints_every_threads_stack(guest_dir: Path) -> None:
    # a VMM waiting for gdb stands in for one that seems stuck
    vmm = Kvmpy("--flat", str(guest_dir / "hello_real.bin"))
    vmm.proc.send_signal(signal.SIGUSR2)
    time.sleep(1)
    vmm.proc.terminate()
    _, _, err = vmm.finish()
    assert "Current thread" in err or "Thread 0x" in err, err
    assert 'File "' in err and "kvmpy" in err, err
