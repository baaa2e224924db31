"""x86 CPU state kvmpy sets up before the first instruction: GDT, page tables, modes."""
