"""Fixtures shared by the Linux-booting tests: kvmpy's minimal kernel and default initramfs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmpy import guest_assets


@pytest.fixture(scope="module")
def kernel() -> guest_assets.KernelAssets:
    return guest_assets.kernel_path()


@pytest.fixture(scope="module")
def initrd() -> Path:
    return guest_assets.initramfs_path()
