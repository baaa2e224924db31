"""kvmpy.isolation.landlock on this kernel, each case in a new process (a Landlock domain
is for the life of the process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvmpy.isolation.landlock import abi

pytestmark = pytest.mark.skipif(abi() == 0, reason="this kernel has no Landlock (5.13+, "
                                "landlock in lsm=)")

CONFINED = """
import os, socket, sys
from pathlib import Path
from kvmpy.isolation.landlock import Rules, python_rules, restrict

rw, ro, outside = (Path(p) for p in sys.argv[1:4])
restrict(python_rules().add(read=[ro], write=[rw]))

def attempt(what, fn):
    try:
        fn()
        print(what, "ok")
    except OSError as e:
        print(what, os.strerror(e.errno))

attempt("write rw", lambda: (rw / "new").write_text("x"))
attempt("mkdir rw", lambda: (rw / "dir").mkdir())
attempt("rename rw", lambda: (rw / "new").rename(rw / "dir" / "moved"))
attempt("read ro", lambda: (ro / "f").read_text())
attempt("write ro", lambda: (ro / "f").write_text("y"))
attempt("read outside", lambda: (outside / "f").read_text())
attempt("late import", lambda: __import__("xml.dom.minidom"))
"""


def test_only_the_given_trees_stay_reachable(tmp_path: Path) -> None:
    for name in ("rw", "ro", "outside"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(CONFINED),
                        *(str(tmp_path / n) for n in ("rw", "ro", "outside"))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "write rw ok", "mkdir rw ok", "rename rw ok", "read ro ok",
        "write ro Permission denied", "read outside Permission denied", "late import ok"]


@pytest.mark.skipif(abi() < 4, reason="TCP rules came with Landlock ABI 4 (Linux 6.7)")
def test_no_tcp_at_all(tmp_path: Path) -> None:
    code = ("import socket\nfrom kvmpy.isolation.landlock import python_rules, restrict\n"
            "restrict(python_rules())\ns = socket.socket()\n"
            "try:\n    s.bind(('127.0.0.1', 0))\nexcept OSError as e:\n    print(e.errno)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.stdout == "13\n", r.stderr
