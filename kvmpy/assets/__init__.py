"""kvmpy's Linux guest assets, built once into `$KVMPY_CACHE` and looked up by path.

- `kernel_path()` / `build_kernel()`: kvmpy's minimal kernel (`KernelAssets`).
- `initramfs_path()` / `build_initramfs()`: the default busybox initramfs.
- `stock_kernel_path()` / `fetch_stock_kernel()`: Debian's cloud kernel (`StockKernel`).
- `build_lock(name)`: one build of an asset at a time, across processes.
- `kvmpy.assets.debian`: Debian packages fetched and unpacked without installing them.

A missing or unbuildable asset is an `AssetError`. The lab (kvmpy.lab) builds its
image from these parts; nothing here knows about the lab.
"""

from kvmpy.assets.guest import (
    KernelAssets,
    StockKernel,
    build_initramfs,
    build_kernel,
    build_lock,
    fetch_stock_kernel,
    initramfs_path,
    kernel_path,
    stock_kernel_path,
)
from kvmpy.errors import AssetError

__all__ = ["AssetError", "KernelAssets", "StockKernel", "build_initramfs", "build_kernel",
           "build_lock", "fetch_stock_kernel", "initramfs_path", "kernel_path",
           "stock_kernel_path"]
