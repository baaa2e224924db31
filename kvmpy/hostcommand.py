"""A host command as a shell script another machine runs: the lab's and the sandbox's jobs.

What it is: the script that enters the same working directory and execs the same argv
with exactly the same environment, for a VM that sees the host's files at their own
paths (the lab over virtiofs/9p, `kvmpy sandbox` over kvmpy's 9p server).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence

from kvmpy.errors import ConfigError

STATUS_NO_CWD = 125  # like `env`/`timeout`: the command itself never ran


def check_argv(argv: Sequence[str], who: str) -> None:
    """What `command_script` cannot run: no command, or one whose name env would take
    for one more variable (it contains "=")."""
    if not argv:
        raise ConfigError(f"{who}: no command given")
    if "=" in argv[0]:
        raise ConfigError(f"{who}: cannot run a command whose name contains '=': {argv[0]!r}")


def command_script(argv: Sequence[str], cwd: str, env: Mapping[str, str],
                   who: str = "kvmpy lab") -> str:
    """The sh script that enters `cwd` and execs `argv` with exactly `env` (`who` names
    the runner in the message for a missing `cwd`: exit status 125).

    `env -i -- NAME=VALUE... argv` rather than `export`, so that names which are not shell
    identifiers (even ones starting with "-") reach the command too.
    """
    check_argv(argv, who)
    assigns = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items() if "=" not in k and k)
    failed = shlex.quote(f"{who}: cannot enter {cwd}")
    return (f"cd {shlex.quote(cwd)} || {{ echo {failed} >&2; exit {STATUS_NO_CWD}; }}\n"
            f"exec env -i -- {assigns} {' '.join(shlex.quote(a) for a in argv)}\n")
