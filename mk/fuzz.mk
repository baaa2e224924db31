# Device fuzzing. `make fuzz` runs `kvmpy fuzz` (docs/fuzzing.md) on every target for a
# fixed number of seeded inputs, KVM-free and through KVM (the op interpreter guest, a
# VM exit per access, a fast reset between inputs), and fails on the first finding,
# whose `finding:` line names the oracle and the reproducer (in $(CACHE)/fuzz/findings).
# A few minutes in all; not part of `make test`.
#   make fuzz                                  # every target, FUZZ_RUNS inputs each way
#   make fuzz FUZZ_TARGETS="blk rng" FUZZ_RUNS=20000 FUZZ_SEED=7
# Coverage-guided (atheris/libFuzzer) runs: `kvmpy fuzz --target T --runs N`.
#
# `make fuzz-harness` runs the older per-device harnesses instead: fuzz/virtio_fuzz.py
# (each virtio device, no bus, no VM) and fuzz/ninep_fuzz.py (the 9p server's message
# parser, the `9p-messages` entry), coverage-guided with atheris when it installs,
# otherwise with hypothesis; atheris writes crashing inputs to $(CACHE)/fuzz/, replay one
# with KVMPY_FUZZ_DEVICE=blk .venv/bin/python fuzz/virtio_fuzz.py $(CACHE)/fuzz/crash-...

FUZZ_TARGETS ?= $(shell $(PY) -m kvmpy fuzz --list 2>/dev/null | cut -d' ' -f1)
FUZZ_RUNS ?= 3000
FUZZ_KVM_RUNS ?= 1000
FUZZ_SEED ?= 1

.PHONY: fuzz fuzz-harness
fuzz: build guests
	@for target in $(FUZZ_TARGETS); do \
		$(PY) -m kvmpy fuzz --target $$target --no-kvm --seed $(FUZZ_SEED) \
			--runs $(FUZZ_RUNS) || exit 1; \
		$(PY) -m kvmpy fuzz --target $$target --seed $(FUZZ_SEED) \
			--runs $(FUZZ_KVM_RUNS) || exit 1; \
	done

HARNESS_RUNS ?= 100000
FUZZ_ENGINE ?= atheris
FUZZ_DEVICES ?= blk net console rng 9p vsock 9p-messages
FUZZ_MAX_LEN ?= 4096

fuzz-harness: venv
	@mkdir -p $(CACHE)/fuzz
	@engine=$(FUZZ_ENGINE); \
	if [ "$$engine" = atheris ] && ! $(PY) -c 'import atheris' 2>/dev/null; then \
		$(PY) -m pip install -q atheris 2>/dev/null \
			|| { echo "atheris does not install here; fuzzing with hypothesis"; engine=hypothesis; }; \
	fi; \
	for device in $(FUZZ_DEVICES); do \
		echo "== fuzz $$device: $(HARNESS_RUNS) inputs ($$engine)"; \
		if [ "$$device" = 9p-messages ]; then \
			$(PY) fuzz/ninep_fuzz.py --engine $$engine --runs $(HARNESS_RUNS) \
				$$([ "$$engine" = atheris ] && echo "-max_len=$(FUZZ_MAX_LEN) -print_final_stats=1 -artifact_prefix=$(CACHE)/fuzz/") \
				2>&1 | grep -E '^(Done|9p fuzz|stat::number_of_executed_units|==|Traceback|  |[A-Za-z]*Error|Failure)' \
				; status=$${PIPESTATUS[0]}; \
		elif [ "$$engine" = atheris ]; then \
			KVMPY_FUZZ_DEVICE=$$device $(PY) fuzz/virtio_fuzz.py --engine atheris \
				--runs $(HARNESS_RUNS) -max_len=$(FUZZ_MAX_LEN) -print_final_stats=1 \
				-artifact_prefix=$(CACHE)/fuzz/ 2>&1 | grep -E '^(Done|stat::number_of_executed_units|==|Traceback|  |[A-Za-z]*Error)' \
				; status=$${PIPESTATUS[0]}; \
		else \
			$(PY) fuzz/virtio_fuzz.py --engine hypothesis --device $$device --runs $(HARNESS_RUNS); \
			status=$$?; \
		fi; \
		[ $$status -eq 0 ] || { echo "fuzz $$device FAILED"; exit 1; }; \
	done
