"""Control-register, EFER and RFLAGS bits, named once for every module that needs them.

Intel SDM Vol. 3A §2.5 (CR0, CR4), §2.2.1 (EFER), Vol. 1 §3.4.3 (EFLAGS).
"""

CR0_PE = 1 << 0  # protected mode
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5  # native x87 error reporting
CR0_WP = 1 << 16  # supervisor writes honour read-only pages
CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR0_PG = 1 << 31  # paging

CR4_PSE = 1 << 4
CR4_PAE = 1 << 5  # required for long mode
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_LA57 = 1 << 12  # 5-level paging
CR4_VMXE = 1 << 13

MSR_EFER = 0xC000_0080
EFER_SCE = 1 << 0  # syscall/sysret
EFER_LME = 1 << 8  # long mode enable
EFER_LMA = 1 << 10  # long mode active
EFER_NXE = 1 << 11

RFLAGS_RESERVED = 1 << 1  # bit 1 always reads as 1
RFLAGS_IF = 1 << 9
RFLAGS_IOPL3 = 3 << 12  # lets CPL3 code use in/out (SDM Vol. 1 §19.5)
