"""A kernel build configuration (`.config` or a config fragment) as a dict.

What it is: the one parser kvmpy has for Kconfig output, used where the kernel is built
(`kvmpy.assets`) and where kvmpy decides how to describe the machine to a kernel
(`kvmpy.acpi.choice`). What it is not: Kconfig; dependencies and defaults are the
kernel's business.
"""

from __future__ import annotations

import re


def parse_kconfig(text: str) -> dict[str, str]:
    """CONFIG_X=v lines and `# CONFIG_X is not set` (as "n") of a .config or fragment."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            out[line[2:].split()[0]] = "n"
    return out


def kconfig_options(text: str, names: tuple[str, ...]) -> dict[str, str]:
    """The values of just `names` in a .config (as `parse_kconfig` gives them).

    One regular-expression scan instead of a loop over every line: a distribution's
    .config has ~10,000 lines, and under the lab's emulated CPU the loop costs a tenth
    of a second of `kvmpy run`'s start-up.
    """
    alternatives = "|".join(map(re.escape, names))
    pattern = re.compile(rf"^(?:({alternatives})=(.*)|# ({alternatives}) is not set)\s*$",
                         re.MULTILINE)
    return {m[1] or m[3]: m[2].strip() if m[1] else "n" for m in pattern.finditer(text)}
