"""The README's Python API example, run as written in a Linux guest (tests/readme.py)."""

from __future__ import annotations

import pytest

from tests.readme import snippet

pytestmark = pytest.mark.lab


def test_python_api_example_runs_as_written() -> None:
    code = snippet("api")
    assert "from kvmpy.api import Guest" in code
    exec(compile(code, "README.md:api", "exec"), {})  # its own asserts check the guest
