"""The README's runnable examples, found by the `<!-- snippet: NAME -->` line before them.

The README promises commands a user can paste; tests run the marked ones as written
(`tests/kvm/test_readme_flat.py`, `tests/lab/test_readme_api.py`), so an example that stops
working fails the suite instead of misleading its reader.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def snippet(name: str) -> str:
    """The body of the fenced code block right after `<!-- snippet: name -->`."""
    pattern = rf"<!-- snippet: {re.escape(name)} -->\n```\w*\n(.*?)\n```"
    found = re.search(pattern, README.read_text(), re.S)
    assert found, f"README.md has no snippet {name!r}"
    return found.group(1)


def shell_commands(name: str) -> list[str]:
    """A shell snippet's commands, one per line (`\\`-continued lines joined)."""
    return [line.strip() for line in snippet(name).replace("\\\n", " ").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
