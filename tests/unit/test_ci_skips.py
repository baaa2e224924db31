"""tests/conftest.py: in CI a skipped kvm or lab test fails the run; elsewhere it is a skip."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

TESTS = """
import pytest

@pytest.mark.kvm
def test_needs_kvm():
    pytest.skip("/dev/kvm does not exist")

@pytest.mark.lab
def test_boots_linux():
    pytest.skip("the lab cannot start: qemu-system-x86_64 not found")

def test_plain_skip():
    pytest.skip("nothing to do with KVM")

@pytest.mark.kvm
@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False
"""


@pytest.mark.parametrize("ci", ["true", ""])
def test_ci_fails_skipped_kvm_and_lab_tests(pytester: pytest.Pytester,
                                            monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    pytester.makeconftest("from tests.conftest import pytest_runtest_makereport  # noqa: F401\n")
    pytester.makepyfile(TESTS)
    monkeypatch.setenv("CI", ci)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-W", "ignore")
    if ci:
        result.assert_outcomes(failed=2, skipped=1, xfailed=1)
        result.stdout.fnmatch_lines(["*/dev/kvm does not exist*",
                                     "*a skipped kvm or lab test fails a CI run*"])
    else:
        result.assert_outcomes(skipped=3, xfailed=1)
