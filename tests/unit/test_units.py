import pytest

from kvmpy.errors import ConfigError
from kvmpy.units import parse_address, parse_size


@pytest.mark.parametrize("text,value", [("128M", 128 << 20), ("2G", 2 << 30), ("64k", 65536),
                                        ("4096", 4096), ("1GiB", 1 << 30), ("0x1000", 4096)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "12Q", "-5M", "0", "lots"])
def test_bad_sizes(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_addresses():
    assert parse_address("0x10000") == 0x10000
    with pytest.raises(ConfigError):
        parse_address("here")
