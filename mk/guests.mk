# Test guests: GNU as (through gcc's preprocessor) -> ld with guests/tests/flat.ld
# (linked at layout.FLAT_LOAD) -> objcopy to a flat binary. Outputs live in
# $(CACHE)/guests, never in the repo.
GUEST_SRC := $(wildcard guests/tests/*.S)
GUEST_BIN := $(patsubst guests/tests/%.S,$(CACHE)/guests/%.bin,$(GUEST_SRC))

.PHONY: guests
guests: $(GUEST_BIN)

$(CACHE)/guests/%.bin: guests/tests/%.S guests/tests/uart.inc guests/tests/testdev.inc \
		guests/tests/flat.ld
	@mkdir -p $(@D)
	gcc -c -nostdlib -I guests/tests -o $(@D)/$*.o $<
	ld -m elf_x86_64 --no-warn-rwx-segments -T guests/tests/flat.ld -o $(@D)/$*.elf $(@D)/$*.o
	objcopy -O binary $(@D)/$*.elf $@
