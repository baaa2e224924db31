"""kvmpy.hostcommand: the script the lab and the sandbox run a host command with."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.errors import ConfigError
from kvmpy.hostcommand import command_script

_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"),
                max_size=20)


@settings(max_examples=40, deadline=None)
@given(argv=st.lists(_text, min_size=1, max_size=4).filter(lambda a: "=" not in a[0]),
       env=st.dictionaries(st.text("ABCxyz_.-1", min_size=1, max_size=6), _text, max_size=4))
def test_command_script_carries_argv_env_and_cwd_exactly(
        tmp_path_factory: pytest.TempPathFactory, argv: list[str], env: dict[str, str]) -> None:
    # Run the script with the host's sh, printf standing in for the command.
    cwd = tmp_path_factory.mktemp("it's a dir")
    script = command_script(["printf", "%s\\0", *argv], str(cwd), env)
    done = subprocess.run(["/bin/sh", "-c", script], capture_output=True, check=True)
    assert done.stdout.split(b"\0")[:-1] == [a.encode() for a in argv]
    probe = command_script(
        [sys.executable, "-c", "import json, os; print(json.dumps([os.getcwd(), {**os.environ}]))"],
        str(cwd), env)
    out = subprocess.run(["/bin/sh", "-c", probe], capture_output=True, check=True).stdout
    got_cwd, got_env = json.loads(out)
    assert got_cwd == str(cwd)
    assert {k: v for k, v in got_env.items() if k != "LC_CTYPE"} == env


def test_command_script_refuses_empty_and_assignment_like_commands() -> None:
    with pytest.raises(ConfigError):
        command_script([], "/", {})
    with pytest.raises(ConfigError):
        command_script(["A=B"], "/", {})
