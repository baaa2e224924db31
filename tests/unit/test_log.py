"""kvmpy.log: standard logging records, with `logging` imported only when one is shown."""

import subprocess
import sys

import pytest

from kvmpy import log


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)


def test_a_dropped_record_or_a_warning_imports_nothing_and_a_warning_is_one_line():
    done = _run("import sys\n"
                "from kvmpy import log\n"
                "log.configure_cli(verbose=False)\n"
                "log.get_logger('kvmpy.x').info('not shown %d', 1)\n"
                "log.get_logger('kvmpy.x').warning('rtc: %s', 'odd')\n"
                "print('logging' in sys.modules)\n"
                "import logging\n"
                "log.get_logger('kvmpy.x').warning('rtc: %s', 'again')\n")
    assert done.stdout == "False\n"
    assert done.stderr == "kvmpy: rtc: odd\nkvmpy: rtc: again\n"  # (the second via logging)


def test_a_line_that_cannot_be_written_or_formatted_is_dropped_not_raised():
    done = _run("import sys\n"
                "from kvmpy import log\n"
                "log.configure_cli(verbose=False)\n"
                "log.get_logger('kvmpy.x').warning('%d', 'not a number')\n"
                "sys.stderr.close()\n"
                "log.get_logger('kvmpy.x').warning('gone')\n"
                "print('still here')\n")
    assert done.stdout == "still here\n" and done.stderr == ""


def test_verbose_shows_info():
    done = _run("from kvmpy import log\n"
                "log.configure_cli(verbose=True)\n"
                "log.get_logger('kvmpy.x').info('bus: %s', 'hello')\n")
    assert done.stderr == "kvmpy: bus: hello\n"


def test_without_the_command_line_records_go_to_the_applications_logging(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(log, "_cli_level", None)
    with caplog.at_level("INFO", logger="kvmpy.test"):
        log.get_logger("kvmpy.test").info("i8042: %s", "reset")
        try:
            raise ValueError("boom")
        except ValueError:
            log.get_logger("kvmpy.test").exception("device failed")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "i8042: reset"), ("ERROR", "device failed")]
    assert caplog.records[1].exc_info is not None
