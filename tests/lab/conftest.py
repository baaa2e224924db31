"""Fixtures shared by the Linux-booting tests: kvmpy's minimal kernel and default initramfs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmpy import assets


@pytest.fixture(scope="module")
def kernel() -> assets.KernelAssets:
    return assets.kernel_path()


@pytest.fixture(scope="module")
def initrd() -> Path:
    return assets.initramfs_path()
