"""`python -m kvmpy.assets {guest-kernel,guest,stock-kernel,paths}`: what `make` runs."""

from __future__ import annotations

import sys

from kvmpy import initramfs
from kvmpy.assets.guest import (
    build_initramfs,
    build_kernel,
    fetch_stock_kernel,
    initramfs_path,
    kernel_path,
    stock_kernel_path,
)
from kvmpy.boot.unpack import unpack_file
from kvmpy.cachedir import cache_dir
from kvmpy.errors import AssetError

USAGE = "usage: python -m kvmpy.assets {guest-kernel,guest,stock-kernel,paths}"


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "paths"
    try:
        if what == "guest-kernel":
            k = build_kernel()
            print(f"{k.bzimage} ({k.bzimage.stat().st_size} bytes)\n{k.vmlinux}")
            # what its first boot would do: the lab cannot write the cache, so do it here
            print(unpack_file(k.bzimage) or "(not unpacked)")
        elif what == "guest":
            print(build_initramfs())
        elif what == "stock-kernel":
            s = fetch_stock_kernel()
            # its initramfs too, so a lab session does not build it under emulation
            tree = initramfs.find_modules_dir(s.modules, s.release)
            initrd = initramfs.modules_guest_initramfs_path(tree, cache_dir() / "initramfs")
            print(f"{s.vmlinuz}\n{s.modules}\n{initrd}")
        elif what == "paths":
            for name, fn in (("kernel", lambda: kernel_path().bzimage),
                             ("vmlinux", lambda: kernel_path().vmlinux),
                             ("initramfs", initramfs_path),
                             ("stock", lambda: stock_kernel_path().vmlinuz)):
                try:
                    print(f"{name}: {fn()}")
                except AssetError as e:
                    print(f"{name}: missing ({e})")
        else:
            print(USAGE, file=sys.stderr)
            return 2
    except AssetError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return e.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
