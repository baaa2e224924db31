# The lab and kvmpy's Linux guest assets (kvmpy/lab/, kvmpy/assets/,
# guests/linux/, guests/stock/). Everything is built into $(CACHE) once and
# found there afterwards: each target is a cheap check when its output exists.
#
#   make guest-kernel  kvmpy's minimal kernel from Debian's linux-source-6.1
#                      (~5 min on 2 cores, once per config fragment + source version)
#   make guest         the default busybox initramfs (well under a second)
#   make lab           the lab image: Debian's generic kernel + a busybox initramfs
#   make stock-kernel  Debian's cloud kernel and its modules, unpacked
#   make lab-assets    all of the above: what `make test` needs
#   make lab-shell     `kvmpy lab` smoke test: prints whether /dev/kvm exists inside
#   make lab-soak      the lab's reliability: boots until it tells (SOAK_ARGS, below)

# Packages these recipes use (also listed in the top Makefile; `+=` keeps them
# installed if that list changes). apt-get/dpkg-deb are part of every Debian.
DEB_PACKAGES += qemu-system-x86 busybox-static cpio flex bison bc libelf-dev libssl-dev \
	gcc make xz-utils

.PHONY: guest-kernel guest lab stock-kernel lab-assets lab-shell
guest-kernel: deps venv
	$(PY) -m kvmpy.assets guest-kernel

guest: deps venv
	$(PY) -m kvmpy.assets guest

lab: deps venv
	$(PY) -m kvmpy.lab.image

stock-kernel: deps venv
	$(PY) -m kvmpy.assets stock-kernel

lab-assets: guest-kernel guest lab stock-kernel

lab-shell: lab
	$(PY) -m kvmpy.lab.command -- $(PY) -c "import os; print('/dev/kvm:', os.path.exists('/dev/kvm'))"

# How often the lab stalls and its guests die (docs/lab.md, "The soak"); not part of
# `make test` or `make bench`: 200 boots per VMM take about an hour. Every part of the
# lab is one flag, e.g.
#   make lab-soak SOAK_ARGS="--boots 200 --lab-accel tcg,thread=single --out single.json"
#   make lab-soak SOAK_ARGS="--table today.json single.json"   # side by side, Markdown
SOAK_ARGS ?=
.PHONY: lab-soak
lab-soak: deps build guest-kernel guest lab
	$(PY) benchmarks/lab_soak.py $(SOAK_ARGS)
