"""Check tables with ACPICA's own tools (`iasl`, `acpiexec`): the same parser Linux runs.

What it is: thin wrappers that write bytes to a temporary directory, run
Debian's acpica-tools on them and return what they said, with the lines that
are problems (warnings, errors, remarks, "Incorrect checksum") picked out.
The unit tests use them as the oracle for kvmpy's tables and AML encoder;
a developer can use them to look at what a guest will see:

    print(disassemble(dsdt(...)).text)

What it is not: needed at run time. Nothing in kvmpy's VM path imports this
module, and the tools are not a dependency of kvmpy (tests skip without them).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

IASL = "iasl"
ACPIEXEC = "acpiexec"
TIMEOUT = 60

# "Warning", "Error", "Remark" as words, but not the "0 Errors, 0 Warnings" summary.
_PROBLEM = re.compile(r"\b(warning|error|remark)s?\b|incorrect|\*\*\*\*", re.IGNORECASE)
_SUMMARY = re.compile(r"(\d+) Errors?, (\d+) Warnings?, (\d+) Remarks?")


def available(tool: str = IASL) -> bool:
    return shutil.which(tool) is not None


@dataclass
class ToolResult:
    returncode: int
    log: str  # stdout and stderr of the tool
    text: str = ""  # the disassembly (.dsl), when there is one
    output: bytes = b""  # the compiled table (.aml), when there is one

    @property
    def problems(self) -> list[str]:
        """Lines of the log or disassembly that report anything wrong."""
        found = []
        for line in (self.log + "\n" + self.text).splitlines():
            summary = _SUMMARY.search(line)
            if summary:
                if any(int(n) for n in summary.groups()):
                    found.append(line.strip())
                continue
            if _PROBLEM.search(line):
                found.append(line.strip())
        if self.returncode != 0:
            found.append(f"exit status {self.returncode}")
        return found


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)


def disassemble(table: bytes) -> ToolResult:
    """`iasl -d` on one table (a data table, or AML for a DSDT/SSDT)."""
    with tempfile.TemporaryDirectory(prefix="kvmpy-iasl-") as tmp:
        work = Path(tmp)
        (work / "table.dat").write_bytes(table)
        proc = _run([IASL, "-d", "table.dat"], work)
        dsl = work / "table.dsl"
        text = dsl.read_text(errors="replace") if dsl.exists() else ""
        return ToolResult(proc.returncode, proc.stdout + proc.stderr, text=text)


def compile_source(source: str, *flags: str) -> ToolResult:
    """`iasl` on ASL (a DefinitionBlock) or data-table source; `output` is the table."""
    with tempfile.TemporaryDirectory(prefix="kvmpy-iasl-") as tmp:
        work = Path(tmp)
        (work / "table.asl").write_text(source)
        proc = _run([IASL, *flags, "table.asl"], work)
        aml = work / "table.aml"
        output = aml.read_bytes() if aml.exists() else b""
        return ToolResult(proc.returncode, proc.stdout + proc.stderr, output=output)


def compile_aml(asl_body: str, *flags: str) -> bytes:
    """The AML `iasl` makes of `asl_body` inside a revision-2 DSDT, without the header.

    Raises ValueError with iasl's words if it reports any error, warning or remark.
    """
    source = f'DefinitionBlock ("", "DSDT", 2, "KVMPY ", "KVMPDSDT", 1)\n{{\n{asl_body}\n}}\n'
    result = compile_source(source, *flags)
    if result.problems or not result.output:
        raise ValueError("iasl: " + "\n".join(result.problems or [result.log]))
    return result.output[36:]


def acpiexec(tables: list[bytes], commands: list[str]) -> ToolResult:
    """Load `tables` (FADT, DSDT, ...) into ACPICA's interpreter and run batch `commands`.

    acpiexec makes its own RSDP and XSDT; it evaluates AML exactly as the
    kernel's ACPICA does, so "evaluate \\_S5" returns what Linux will read.
    """
    with tempfile.TemporaryDirectory(prefix="kvmpy-acpiexec-") as tmp:
        work = Path(tmp)
        names = []
        for i, table in enumerate(tables):
            path = work / f"t{i}.dat"
            path.write_bytes(table)
            names.append(path.name)
        proc = _run([ACPIEXEC, "-b", "; ".join(commands), *names], work)
        return ToolResult(proc.returncode, proc.stdout + proc.stderr)
