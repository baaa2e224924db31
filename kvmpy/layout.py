"""The guest-physical memory map: every address kvmpy uses, named once.

No other module writes a literal guest address; they import it from here.
The low megabyte follows the PC conventions Linux expects (real-mode IVT and
BDA at the bottom, EBDA under 640 KiB, BIOS area 0xe0000-0xfffff); the
32-bit MMIO hole holds the virtio-mmio windows, the IO-APIC and the LAPIC.

Learned from Firecracker's arch/x86_64/layout.rs.
"""

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
PAGE_SIZE = 4 * KiB  # x86's base page: KVM memory slots and guest RAM come in these

# --- low memory: boot structures kvmpy writes before the first instruction ---
BOOT_GDT = 0x500  # GDT kvmpy installs for protected/long mode entry
BOOT_GDT_MAX = 0x100  # room for 32 descriptors (TSS takes two in long mode)
BOOT_IDT = 0x600  # an empty IDT (limit 0) so early faults triple-fault visibly
BOOT_TSS = 0x700  # a 104-byte 64-bit TSS (needed for a valid TR, and CPL3 entry)
BOOT_STACK_TOP = 0x8FF0  # initial RSP for kernels that want one (below the page tables)
ZERO_PAGE = 0x7000  # Linux boot_params ("zero page"), 4 KiB
PVH_START_INFO = 0x6000  # hvm_start_info for a PVH entry, with its module list after it
PVH_MEMMAP = 0x6400  # hvm_memmap_table_entry array
PML4 = 0x9000  # boot page tables: one PML4, one PDPT, and PDs for the first 4 GiB
PDPT = 0xA000
PD = 0xB000  # four consecutive 4 KiB PDs: 0xb000-0xefff map 4 GiB with 2 MiB pages
PD_COUNT = 4
PAGE_TABLES_END = PD + PD_COUNT * 0x1000

# Flat test guests are loaded here (real mode: CS=0x1000, IP=0).
FLAT_LOAD = 0x10000
FLAT_LIMIT = 0x9F000  # flat guests and their data must end below the EBDA

# `kvmpy fuzz` (kvmpy.fuzz): its op interpreter (a flat guest) reads the op list at
# FUZZ_OPS; the ops' writes to guest RAM, and the virtqueues and buffers they set up,
# stay in the arena [FUZZ_ARENA, FUZZ_ARENA_END), clear of the interpreter and its tables
FUZZ_OPS = 0x20_0000
FUZZ_OPS_MAX = 0x20_0000
FUZZ_ARENA = 0x40_0000
FUZZ_ARENA_END = 0x80_0000
FUZZ_RAM = 0x100_0000  # the fuzzed machine's RAM: 16 MiB

CMDLINE = 0x20000  # kernel command line
CMDLINE_MAX = 0x10000

EBDA = 0x9FC00  # MP floating pointer and MP config table live here
EBDA_END = 0xA0000
VGA_HOLE = 0xA0000  # legacy VGA/ROM range, reserved in e820
BIOS_START = 0xE0000  # ACPI RSDP and tables (the kernel scans 0xe0000-0xfffff)
BIOS_END = 0x100000

HIMEM = 0x100000  # 1 MiB: protected-mode kernel is loaded here
INITRD_ALIGN = 0x200000

# --- the 32-bit MMIO hole --------------------------------------------------
MMIO_HOLE = 0xC000_0000  # RAM above 3 GiB moves above 4 GiB
MMIO_HOLE_END = 0x1_0000_0000
VIRTIO_MMIO_BASE = 0xD000_0000  # first virtio-mmio window
VIRTIO_MMIO_SIZE = 0x1000  # one 4 KiB window per device (virtio 1.2 §4.2.2)
VIRTIO_MMIO_SLOTS = 32
TEST_DEVICE_BASE = 0xE000_0000  # MMIO echo device used by the test guests
TEST_DEVICE_SIZE = 0x1000
FUZZ_COPIER = 0xE000_1000  # `kvmpy fuzz`'s RAM-write doorbell (kvmpy.fuzz.rigs.OpCopier)
FUZZ_COPIER_SIZE = 0x1000
IOAPIC = 0xFEC0_0000
LAPIC = 0xFEE0_0000
IDENTITY_MAP = 0xFFFB_C000  # KVM_SET_IDENTITY_MAP_ADDR: one page (Intel only)
TSS_ADDR = 0xFFFB_D000  # KVM_SET_TSS_ADDR: three pages (Intel real-mode emulation)

# --- port I/O --------------------------------------------------------------
POST_CODE_PORT = 0x80  # last byte written (Linux uses it as an I/O delay)
COM1_PORT = 0x3F8
COM1_IRQ = 4
I8042_PORT = 0x60  # data 0x60, command/status 0x64
RTC_PORT = 0x70  # index 0x70, data 0x71
DEBUG_EXIT_PORT = 0xF4  # write N: the VM ends with status N (as QEMU's isa-debug-exit)
PM_PORT_BASE = 0x600  # ACPI PM1 / sleep registers
GED_PORT = 0x604  # ACPI Generic Event Device's event selector (4 bytes; ACPI guests)

# --- interrupts ------------------------------------------------------------
GED_GSI = 3  # the Generic Event Device (ISA IRQ 3, COM2's, which kvmpy does not have)
# GSIs for virtio-mmio slots in order: the IO-APIC pins no legacy device claims
# (1 keyboard, 4 COM1 and 8 RTC are taken; 0 and 2 are the timer's).
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23)
IOAPIC_PINS = 24

# --- boot structures written by kvmpy.boot (appended with the Linux loaders) ---
# The hvm_start_info at PVH_START_INFO is 56 bytes; its hvm_modlist_entry array
# follows it, 8-byte aligned, and must end before PVH_MEMMAP (room for 30 modules).
PVH_MODLIST = 0x6040
