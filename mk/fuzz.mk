# Device-model fuzzing (issue 5). `make fuzz` feeds FUZZ_RUNS inputs to each virtio device
# through fuzz/virtio_fuzz.py, and to the 9p server's message parser through
# fuzz/ninep_fuzz.py (the `9p-messages` entry): coverage-guided with atheris (libFuzzer)
# when it installs, otherwise with hypothesis. Not part of `make test`: 100,000 inputs per
# device take minutes.
#   make fuzz                                  # atheris, 100000 runs per device
#   make fuzz FUZZ_ENGINE=hypothesis FUZZ_RUNS=20000 FUZZ_DEVICES="blk net"
# atheris writes crashing inputs to $(CACHE)/fuzz/; replay one with
#   KVMPY_FUZZ_DEVICE=blk .venv/bin/python fuzz/virtio_fuzz.py $(CACHE)/fuzz/crash-...

FUZZ_RUNS ?= 100000
FUZZ_ENGINE ?= atheris
FUZZ_DEVICES ?= blk net console rng 9p vsock 9p-messages
FUZZ_MAX_LEN ?= 4096

.PHONY: fuzz
fuzz: venv
	@mkdir -p $(CACHE)/fuzz
	@engine=$(FUZZ_ENGINE); \
	if [ "$$engine" = atheris ] && ! $(PY) -c 'import atheris' 2>/dev/null; then \
		$(PY) -m pip install -q atheris 2>/dev/null \
			|| { echo "atheris does not install here; fuzzing with hypothesis"; engine=hypothesis; }; \
	fi; \
	for device in $(FUZZ_DEVICES); do \
		echo "== fuzz $$device: $(FUZZ_RUNS) inputs ($$engine)"; \
		if [ "$$device" = 9p-messages ]; then \
			$(PY) fuzz/ninep_fuzz.py --engine $$engine --runs $(FUZZ_RUNS) \
				$$([ "$$engine" = atheris ] && echo "-max_len=$(FUZZ_MAX_LEN) -print_final_stats=1 -artifact_prefix=$(CACHE)/fuzz/") \
				2>&1 | grep -E '^(Done|9p fuzz|stat::number_of_executed_units|==|Traceback|  |[A-Za-z]*Error|Failure)' \
				; status=$${PIPESTATUS[0]}; \
		elif [ "$$engine" = atheris ]; then \
			KVMPY_FUZZ_DEVICE=$$device $(PY) fuzz/virtio_fuzz.py --engine atheris \
				--runs $(FUZZ_RUNS) -max_len=$(FUZZ_MAX_LEN) -print_final_stats=1 \
				-artifact_prefix=$(CACHE)/fuzz/ 2>&1 | grep -E '^(Done|stat::number_of_executed_units|==|Traceback|  |[A-Za-z]*Error)' \
				; status=$${PIPESTATUS[0]}; \
		else \
			$(PY) fuzz/virtio_fuzz.py --engine hypothesis --device $$device --runs $(FUZZ_RUNS); \
			status=$$?; \
		fi; \
		[ $$status -eq 0 ] || { echo "fuzz $$device FAILED"; exit 1; }; \
	done
