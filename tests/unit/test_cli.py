"""Command-line parsing: one-line errors for bad device options."""

from pathlib import Path

import pytest

from kvmpy.cli import parse_disk, parse_net
from kvmpy.errors import ConfigError


def test_disk_options():
    assert parse_disk("a.img").path == Path("a.img") and not parse_disk("a.img").read_only
    assert parse_disk("/x/b.img,ro").read_only
    with pytest.raises(ConfigError, match="the only option is ',ro'"):
        parse_disk("a.img,rw")


def test_net_options():
    n = parse_net("tap=tap7,mac=52:54:00:12:34:56")
    assert (n.tap, n.mac) == ("tap7", "52:54:00:12:34:56")
    assert parse_net("").tap == ""
    with pytest.raises(ConfigError, match="unknown option 'bridge'"):
        parse_net("tap=x,bridge=br0")
