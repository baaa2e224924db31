"""kvmpy boots its minimal Linux kernel directly, and the kernel saw what kvmpy gave it.

Every assertion reads the guest's own output: its kernel log (e820 map, command line,
initramfs) and what /init and the shell print. Marked `lab`: these run where /dev/kvm
has hardware virtualization (inside the one lab session under `make test`).
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmpy.api import Guest
from kvmpy.boot.unpack import unpack_file
from kvmpy.initramfs import INIT_MARKER
from kvmpy.stop import StopKind
from tests.lab.distress import assert_calm

pytestmark = pytest.mark.lab

MARK = "kvmpy-test-arg"


def dmesg_e820(log: str) -> list[tuple[int, int, str]]:
    """The kernel's 'BIOS-e820: [mem a-b] type' lines, as it printed them."""
    return [(int(a, 16), int(b, 16), kind) for a, b, kind in
            re.findall(r"BIOS-e820: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] (\w+)", log)]


# (image, cpus, acpi): every kernel entry with one and two vCPUs; ACPI tables (the
# default for a kernel with ACPI) and the MP table with command-line devices
@pytest.mark.parametrize(("image", "cpus", "acpi"), [
    ("bzimage", 1, "auto"), ("bzimage", 2, "off"), ("unpacked", 1, "off"),
    ("unpacked", 2, "auto"), ("vmlinux", 1, "auto"), ("vmlinux", 2, "off")])
def test_kernel_sees_what_kvmpy_gave_it(kernel, initrd: Path, image: str, cpus: int,
                                        acpi: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # bzimage: through its own decompressor; unpacked: the same file, from the kernel an
    # earlier boot unpacked into the cache (kvmpy.boot.unpack), entered at startup_64
    path = kernel.vmlinux if image == "vmlinux" else kernel.bzimage
    if image == "unpacked":
        monkeypatch.setenv("KVMPY_CACHE", str(tmp_path))  # the lab's own cache is read-only
        assert unpack_file(path) is not None
    # the kernel splits its command line on spaces, honouring double quotes only
    append = f'{MARK}=yes -- sh -c "dmesg; echo cpus=$(grep -c ^processor /proc/cpuinfo)"'
    with Guest(path, initrd, append=append, unpack=image == "unpacked", cpus=cpus,
               mem=256 << 20, acpi=acpi) as g:
        g.expect(INIT_MARKER, 120)
        g.expect(r"kvmpy-guest: exit status 0", 60)
        stop = g.wait(60)
        log = g.output
        boot = g.machine.linux_boot
    # poweroff -f: through the FADT's sleep register with ACPI; without it, a halt
    assert stop is not None
    assert stop.kind is (StopKind.HALTED if acpi == "off" else StopKind.POWEROFF), stop
    # the command line kvmpy wrote, as the kernel read it
    cmdline = re.search(r"Kernel command line: (.*)", log)
    assert cmdline and f"{MARK}=yes" in cmdline.group(1) and "console=ttyS0" in cmdline.group(1)
    # the e820 map: low RAM below the EBDA, RAM from 1 MiB to the end of guest memory
    e820 = dmesg_e820(log)
    assert (0, 0x9FBFF, "usable") in e820
    assert (0x100000, (256 << 20) - 1, "usable") in e820
    # the machine's description: the MP table, or ACPI's MADT
    if acpi == "off":
        assert "found SMP MP-table" in log and "acpi=off" in cmdline.group(1)
    else:
        assert "ACPI: Using IOAPIC for interrupt routing" in log
        assert "acpi=off" not in cmdline.group(1)
    assert all(kind != "usable" or end < 0xC0000000 for _, end, kind in e820)
    # the initrd kvmpy placed was found and unpacked, and /init ran
    assert "Unpacking initramfs" in log or "Trying to unpack rootfs" in log
    assert "Freeing initrd memory" in log
    assert INIT_MARKER in log
    # every vCPU came up (APs through the in-kernel LAPIC's INIT/SIPI)
    assert f"cpus={cpus}" in log
    if cpus > 1:
        assert f"smp: Brought up 1 node, {cpus} CPUs" in log
    # the protocol kvmpy chose for the file: a vmlinux with a PVH note is entered by it
    assert boot is not None
    assert boot.kernel.protocol == {"bzimage": "bzimage", "unpacked": "elf64",
                                    "vmlinux": "pvh"}[image]
    assert boot.kernel.unpacked == (image == "unpacked")
    # the i8042 is there for reboot=k only: the kernel probed no keyboard (i8042.nokbd)
    assert "i8042.nokbd" in cmdline.group(1) and "AT Translated Set 2 keyboard" not in log


def test_console_shell_answers_typed_commands(kernel, initrd: Path) -> None:
    with Guest(kernel.bzimage, initrd, cpus=2) as g:
        g.expect(r"/ # ", 120)
        g.send("echo $((6 * 7)) && uname -r\n")
        g.expect(r"\r?\n42\r?\n", 30)
        g.expect(r"6\.1\.\d+", 30)
        g.send("exit\n")
        stop = g.wait(60)
    assert stop is not None and stop.kind is StopKind.POWEROFF  # the shell's exit powers off


def test_reboot_ends_the_vmm_with_the_reboot_status(kernel, initrd: Path) -> None:
    append = "-- reboot -f"
    with Guest(kernel.bzimage, initrd, append=append) as g:
        stop = g.wait(120)
    assert stop is not None and stop.kind is StopKind.REBOOT, g.output[-1000:]
    assert stop.exit_status == 5


def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """The process's stdout up to `marker`, or all it printed by `timeout`: a guest that
    hangs prints nothing, so the pipe is read with the deadline in hand."""
    deadline = time.monotonic() + timeout
    seen = b""
    while marker.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            break
        chunk = os.read(proc.stdout.fileno(), 4096)  # type: ignore[union-attr]
        if not chunk:
            break
        seen += chunk
    return seen.decode(errors="replace")


def test_kvmpy_run_cli_status_and_sigterm(kernel, initrd: Path) -> None:
    """`kvmpy run` ends with the guest's status; SIGTERM stops it cleanly with 143."""
    run = [sys.executable, "-m", "kvmpy", "run", "--kernel", str(kernel.bzimage),
           "--initrd", str(initrd)]
    done = subprocess.run([*run, "--append", "-- true"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=180)
    assert done.returncode == 0, done.stderr  # powered off: no line on stderr
    assert done.stderr == ""
    assert "kvmpy-guest: exit status 0" in done.stdout
    assert_calm(done.stdout)
    # a kernel without a way to power off (here: told to ignore ACPI) halts: status 6
    done = subprocess.run([*run, "--acpi", "off", "--append", "-- true"], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=180)
    assert done.returncode == StopKind.HALTED.value, done.stderr
    assert "every vCPU halted with interrupts disabled" in done.stderr
    assert "kvmpy-guest: exit status 0" in done.stdout
    assert_calm(done.stdout)

    proc = subprocess.Popen(run, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen = _read_until(proc, INIT_MARKER, timeout=120)
        assert INIT_MARKER in seen, seen[-500:]
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "stopped by signal 15" in err
    assert "Traceback" not in err
    assert_calm(seen + rest)


def test_kvmpy_run_unpacks_a_bzimage_on_its_first_boot_for_the_next(
        kernel, initrd: Path, tmp_path: Path) -> None:
    """The first `kvmpy run` of a bzImage runs its decompressor and keeps an unpacked
    copy; the second boots that copy. The guest's answer is the same both times."""
    run = [sys.executable, "-m", "kvmpy", "-v", "run", "--kernel", str(kernel.bzimage),
           "--initrd", str(initrd), "--append", "-- uname -r"]
    env = dict(os.environ, KVMPY_CACHE=str(tmp_path))  # the lab's own cache is read-only
    first, second = (subprocess.run(run, capture_output=True, text=True, env=env,
                                    stdin=subprocess.DEVNULL, timeout=180) for _ in range(2))
    for done in (first, second):
        assert done.returncode == 0, done.stderr
        assert "kvmpy-guest: exit status 0" in done.stdout, done.stdout[-2000:]
        assert_calm(done.stdout)
    assert "as unpacked by an earlier boot" not in first.stderr
    assert len(list((tmp_path / "unpacked").glob("*.elf"))) == 1
    assert "as unpacked by an earlier boot" in second.stderr, second.stderr
    release = re.search(r"^(\d+\.\d+\.\d+\S*)\s*$", first.stdout, re.M)
    assert release and release.group(0) in second.stdout.splitlines()
