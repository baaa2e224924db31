# Tutorial guests (docs/tutorial/): one flat binary per chapter, built the way the
# test guests are (mk/guests.mk): gcc's preprocessor and GNU as -> ld with
# guests/tests/flat.ld (linked at layout.FLAT_LOAD) -> objcopy to a raw image.
# They share guests/tests/uart.inc and guests/tutorial/print.inc. Outputs live in
# $(CACHE)/tutorial, never in the repo.
TUTORIAL_SRC := $(wildcard guests/tutorial/*.S)
TUTORIAL_BIN := $(patsubst guests/tutorial/%.S,$(CACHE)/tutorial/%.bin,$(TUTORIAL_SRC))
TUTORIAL_INC := guests/tests/uart.inc guests/tutorial/print.inc guests/tests/flat.ld

.PHONY: tutorial-guests
tutorial-guests: $(TUTORIAL_BIN)

$(CACHE)/tutorial/%.bin: guests/tutorial/%.S $(TUTORIAL_INC)
	@mkdir -p $(@D)
	gcc -c -nostdlib -I guests/tests -I guests/tutorial -o $(@D)/$*.o $<
	ld -m elf_x86_64 --no-warn-rwx-segments -T guests/tests/flat.ld -o $(@D)/$*.elf $(@D)/$*.o
	objcopy -O binary $(@D)/$*.elf $@
