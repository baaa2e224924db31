"""A kernel build configuration (`.config` or a config fragment) as a dict.

What it is: the one parser kvmpy has for Kconfig output, used where the kernel is built
(`kvmpy.guest_assets`) and where kvmpy decides how to describe the machine to a kernel
(`kvmpy.acpi.choice`). What it is not: Kconfig; dependencies and defaults are the
kernel's business.
"""

from __future__ import annotations


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
