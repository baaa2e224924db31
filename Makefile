# kvmpy: `make run` boots the default guest; `make test` runs the whole suite.
# Every target installs what it needs, idempotently; build outputs are cached
# in $(CACHE) (outside the repo) and never rebuilt when present.

SHELL := /bin/bash
# The venv's interpreter: the distribution's /usr/bin/python3 when there is one. Debian
# builds it statically linked (no libpython.so to load and relocate at every start) with
# PGO and LTO; in the lab, where all of it is emulated, it starts in 0.2 s where pyenv's
# shared-library build takes 0.4 s, and kvmpy reaches its first KVM_RUN ~0.3 s sooner.
# (Only if it is new enough for kvmpy: 3.11; otherwise whatever python3 is on PATH.)
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && echo /usr/bin/python3 || echo python3)
PYTHON := $(PYTHON)
VENV := .venv
PY := $(VENV)/bin/python
# Build outputs: $KVMPY_CACHE when set (CI points it at an empty directory), else the
# user's cache.
CACHE ?= $(or $(KVMPY_CACHE),$(HOME)/.cache/kvmpy)
export KVMPY_CACHE := $(CACHE)

.PHONY: all venv build deps test test-unit test-kvm bench run guests lint clean
all: build

# Debian packages the build and the tests need (installed once, as root).
DEB_PACKAGES := gcc binutils qemu-system-x86 busybox-static cpio acpica-tools \
	flex bison bc libelf-dev libssl-dev e2fsprogs xz-utils iproute2 gdb \
	python3-venv libseccomp2
# (checked every time: a dpkg query per package, well under a second; the package lists
# are fetched when missing too, since the lab and kernel recipes `apt-get download`)
deps:
	@mkdir -p $(CACHE)
	@missing=$$(for p in $(sort $(DEB_PACKAGES)); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ] || ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then \
		apt-get update -qq; \
	fi; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# (the stamp names the interpreter: choosing another one makes a new venv)
VENV_OK := $(VENV)/.ok$(subst /,-,$(PYTHON))
venv: $(VENV_OK)
$(VENV_OK): pyproject.toml setup.py | deps
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel cffi
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	@touch $@

# The cffi shim; rebuilt when its sources change.
build: venv kvmpy/_kvm.stamp
kvmpy/_kvm.stamp: csrc/kvm_shim.h csrc/sigsys.h csrc/kvm_shim.cdef csrc/build_shim.py
	$(PY) setup.py -q build_ext --inplace --force
	@touch $@

# Bytecode, written explicitly: these machines set PYTHONDONTWRITEBYTECODE, and in
# the lab (all of it emulated by TCG) compiling kvmpy at every start costs seconds.
.PHONY: bytecode
build: bytecode
bytecode:
	@$(PY) -m compileall -q kvmpy

# The seccomp filters, compiled into the cache once rather than at every start
# (kvmpy.isolation.seccomp.programs; compiled again whenever that file changes).
.PHONY: seccomp-filters
build: seccomp-filters
seccomp-filters: venv
	@$(PY) -c 'from kvmpy.isolation import seccomp; [seccomp.programs(m) for m in seccomp.MODES[1:]]'

include mk/*.mk

# Lint first (seconds), then unit, kvm and lab tests in one pytest run; lab tests go
# to lab sessions, one per host core, when this machine's /dev/kvm cannot boot Linux
# (tests/lab_plugin.py).
test: deps build guests tutorial-guests lab-assets lint
	$(PY) -m pytest tests

test-unit: build
	$(PY) -m pytest tests -m "not kvm and not lab and not labhost"

test-kvm: build guests tutorial-guests
	$(PY) -m pytest tests -m kvm

# `make bench BENCH="isolation_cost virtio_blk_throughput"`: only those (benchmarks/run.py's names)
bench: deps build guests lab-assets
	$(PY) benchmarks/run.py $(BENCH)

# Boot the default guest (minimal kernel + busybox initramfs) to a shell on this
# terminal; in the lab when this machine's /dev/kvm cannot boot Linux.
run: deps build lab-assets
	@if $(PY) -c 'import sys; from kvmpy.lab import can_boot_linux; sys.exit(not can_boot_linux())'; then \
		$(PY) -m kvmpy run; \
	else \
		echo "kvmpy: /dev/kvm here cannot boot Linux; booting the default guest inside the lab"; \
		$(PY) -m kvmpy lab --interactive -- $(PY) -m kvmpy run; \
	fi

lint: build
	$(VENV)/bin/ruff check kvmpy tests benchmarks fuzz docs/tutorial
	$(VENV)/bin/mypy kvmpy

clean:
	rm -rf build kvmpy/_kvm*.so kvmpy/_kvm.c kvmpy/_kvm.stamp
