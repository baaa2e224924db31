"""Booting Linux, the KVM-free half: loaders and the boot data structures.

What it is: pure functions over file bytes and `GuestMemory`. A loader
(`kernel.load_kernel`, `initrd.load_initrd`) puts an image in guest RAM and
returns what it loaded (entry, range, protocol). The configurators write what
the kernel reads at entry: the command line (`cmdline`), the e820 map
(`e820`), the zero page (`params`) or PVH start info (`pvh`), the MP table
(`mptable`). `cpuid` and its `boot_msrs` compute the values a vCPU gets. `synthetic` builds
minimal valid images for tests, fuzzers and tiny KVM test guests.

What it is not: nothing here touches a vCPU or imports the KVM layer. The
machine calls these in order and sets registers itself.

Design anchor: rust-vmm linux-loader (loaders and configurators are separate
steps) and Firecracker's arch/x86_64.
"""
