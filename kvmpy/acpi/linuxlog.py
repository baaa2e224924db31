"""What Linux says about kvmpy's ACPI tables: the kernel-log lines that mean one is wrong.

What it is: `acpi_complaints(log)` returns the lines of a kernel log (console output
or `dmesg`) in which Linux reports a problem with the firmware's ACPI description:
ACPICA's own reports ("ACPI Error", "ACPI BIOS Error", "ACPI Warning", "ACPI
Exception", from drivers/acpi/acpica/utxferror.c and include/acpi/acoutput.h) and the
kernel's "[Firmware Bug]" / "[Firmware Warn]" prefixes (include/linux/printk.h
FW_BUG, FW_WARN), which x86 uses for broken MADT and FADT contents. The lab tests
assert that a boot with kvmpy's tables has none.

What it is not: a log parser for anything else.
"""

from __future__ import annotations

import re

COMPLAINT = re.compile(r"ACPI (?:BIOS )?(?:Error|Warning|Exception)|\[Firmware (?:Bug|Warn)\]")


def acpi_complaints(log: str) -> list[str]:
    """Every line of `log` in which Linux complains about the ACPI tables, in order."""
    return [line.strip() for line in log.splitlines() if COMPLAINT.search(line)]
