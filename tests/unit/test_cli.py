"""Command-line parsing: one-line errors for bad device options."""

from pathlib import Path

import pytest

from kvmpy.errors import ConfigError
from kvmpy.options import disk_config as parse_disk
from kvmpy.options import net_config as parse_net


def test_disk_options():
    assert parse_disk("a.img").path == Path("a.img") and not parse_disk("a.img").read_only
    assert parse_disk("/x/b.img,ro").read_only
    with pytest.raises(ConfigError, match="the options are ro, bw=MB/s and iops=N"):
        parse_disk("a.img,rw")
    limited = parse_disk("a.img,ro,bw=2.5,iops=100")
    assert limited.read_only and (limited.limits.bw, limited.limits.ops) == (2_500_000, 100)
    assert not parse_disk("a.img").limits


def test_net_options():
    n = parse_net("tap=tap7,mac=52:54:00:12:34:56")
    assert (n.tap, n.mac) == ("tap7", "52:54:00:12:34:56")
    assert parse_net("").tap == ""
    assert parse_net("tap=t,bw=10").limits.bw == 10_000_000
    with pytest.raises(ConfigError, match="unknown option 'bridge'"):
        parse_net("tap=x,bridge=br0")


def test_help_is_printed(capsys: pytest.CaptureFixture[str]):
    from kvmpy.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["run", "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage: kvmpy run [-h]")


def test_the_boot_path_leaves_heavy_modules_unimported():
    """What `kvmpy run` imports before its guest starts is start-up time (README, "Boot
    time"): these are only needed by options or failures that ask for them."""
    import subprocess
    import sys

    heavy = ["dataclasses", "logging", "shutil", "json", "ctypes", "calendar", "hashlib",
             "kvmpy.acpi.tables", "kvmpy.virtio.mmio", "kvmpy.assets",
             # a bzImage boot without ACPI or --stats needs none of these
             "kvmpy.trace.stats", "kvmpy.devices.acpi_pm", "kvmpy.flat", "kvmpy.boot.pvh"]
    code = ("import sys, kvmpy.cli, kvmpy.machine, kvmpy.console, kvmpy.acpi.choice, "
            "kvmpy.lab.host; kvmpy.cli.build_parser().parse_args(['run']); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout == "[]\n"
    # the default guest adds virtio-rng: the transport, queue and I/O thread come in
    code = code.replace("kvmpy.lab.host;",
                        "kvmpy.lab.host, kvmpy.virtio.rng, kvmpy.virtio.iothread;")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout == "['kvmpy.virtio.mmio']\n"
