"""The i8042 PS/2 controller, with a keyboard and no mouse: enough for Linux's probe and reboot.

What it is: the controller behind ports 0x60 (data) and 0x64 (status on read,
command on write), registered as one device at base 0x60 spanning 5 ports, so
offset 0 is the data port and offset 4 the status/command port. The controller
has a one-byte output buffer (status bit OBF), a 32-byte RAM whose byte 0 is the
command byte ("CTR" in Linux), an output port, and the commands Linux's
drivers/input/serio/i8042.c and arch/x86/kernel/reboot.c send:

    0x20-0x3F read RAM (0x20: CTR)     0x60-0x7F write RAM (0x60: CTR)
    0xA7/0xA8 disable/enable AUX       0xA9 AUX interface test -> 0x02
    0xAA self-test -> 0x55             0xAB keyboard interface test -> 0x00
    0xAD/0xAE disable/enable keyboard  0xC0 read input port
    0xD0/0xD1 read/write output port   0xD2 write keyboard output buffer
    0xD3 write AUX output buffer       0xD4 write to AUX device (dropped)
    0xE0 read test inputs              0xF0-0xFF pulse output lines: bit 0 low
                                       pulses the CPU reset line (0xFE) -> on_reset

There is no AUX (mouse) port. Linux's i8042_check_aux() must learn that fast,
not by timing out (each i8042 command waits up to 0.5 s): 0xD3 echoes its byte
without status bit AUXDATA, which Linux reads as "auxerr", and the AUX interface
test answers 0x02 ("clock line stuck high"), which makes it give up at once.
`i8042.noaux` on the command line skips all of this.

The keyboard answers the commands atkbd sends (reset 0xFF -> FA AA, get ID
0xF2 -> FA AB 83, or AB 41 while the controller translates, echo 0xEE, set
LEDs/rate/scancode set with their parameter byte, everything else FA). Its
bytes wait in the keyboard until the output buffer is free and the keyboard
interface is enabled. With `kbd_irq` (ISA IRQ 1) the output buffer raises it
while CTR.KBDINT is set; each new byte gives a new rising edge, because Linux's
i8042_interrupt() reads one byte per interrupt and the IO-APIC pin is edge
triggered. Without `kbd_irq` the keyboard probe times out and Linux carries on
without a keyboard.

Port 0x61 (offset 1, system control port B) falls inside the range: reads give
the speaker bits last written and timer 2 output high; KVM's in-kernel PIT
normally claims that port before it reaches here. Offsets 2 and 3 float high.

What it is not: no scancodes from the host, no mouse, no multiplexer, no
translation table beyond the keyboard ID, no A20 gating.

Learned from rust-vmm vm-superio i8042.rs, Firecracker's fuller i8042.rs and
kvmtool hw/i8042.c.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from kvmpy.bus import IrqLine
from kvmpy.log import get_logger
from kvmpy.state.values import U8, StateReader, b64

log = get_logger(__name__)

PORT_SPAN = 5  # 0x60-0x64
DATA = 0  # port 0x60
PORT_B = 1  # port 0x61
STATUS = COMMAND = 4  # port 0x64

# Status register
STR_OBF = 0x01  # output buffer full: a byte waits at the data port
STR_IBF = 0x02  # input buffer full: never, commands complete at once
STR_SYSFLAG = 0x04  # mirrors CTR bit 2
STR_CMDDAT = 0x08  # the last write went to the command port
STR_KEYLOCK = 0x10  # 1 = keyboard not inhibited
STR_AUXDATA = 0x20  # the byte came from the AUX port

# Command byte (CTR)
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYSFLAG = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
CTR_DEFAULT = CTR_KBDINT | CTR_SYSFLAG | CTR_XLATE  # what a BIOS leaves without a mouse

# Controller commands
CMD_READ_RAM = 0x20  # 0x20-0x3F
CMD_WRITE_RAM = 0x60  # 0x60-0x7F
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_CTL_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_INPUT = 0xC0
CMD_READ_OUTPUT = 0xD0
CMD_WRITE_OUTPUT = 0xD1
CMD_KBD_LOOP = 0xD2
CMD_AUX_LOOP = 0xD3
CMD_AUX_SEND = 0xD4
CMD_READ_TEST_INPUTS = 0xE0
CMD_PULSE = 0xF0  # 0xF0-0xFF; bits 3:0 low = pulse that output line

CTL_TEST_OK = 0x55
KBD_TEST_OK = 0x00
AUX_TEST_CLOCK_HIGH = 0x02  # "AUX clock line stuck high": no AUX port
INPUT_PORT = 0x80  # bit 7: keyboard not inhibited

OUTP_RESET = 0x01  # output port bit 0: CPU reset line, active low
OUTP_A20 = 0x02
OUTP_DEFAULT = OUTP_RESET | OUTP_A20

# Keyboard commands and replies
KBD_ACK = 0xFA
KBD_BAT_OK = 0xAA
KBD_ECHO = 0xEE
KBD_SET_LEDS = 0xED
KBD_SCANCODE_SET = 0xF0
KBD_GET_ID = 0xF2
KBD_SET_RATE = 0xF3
KBD_RESET = 0xFF
KBD_ID = (0xAB, 0x83)
KBD_ID_TRANSLATED = (0xAB, 0x41)
KBD_QUEUE = 16  # bytes a keyboard buffers before it drops

PORT_B_WRITABLE = 0x0F  # timer 2 gate, speaker, parity/IO-check enables
PORT_B_TIMER2_OUT = 0x20

_BYTE = [bytes((i,)) for i in range(256)]


class I8042:
    """The PS/2 controller; `on_reset()` is called when the guest pulses the reset line.

    `on_reset` may be called more than once (Linux retries the reset command);
    the VMM should treat it as a request to stop.
    """

    def __init__(self, on_reset: Callable[[], None], kbd_irq: IrqLine | None = None) -> None:
        self._on_reset = on_reset
        self._irq = kbd_irq
        self._lock = threading.Lock()
        self._ram = bytearray(32)
        self._ram[0] = CTR_DEFAULT
        self._outp = OUTP_DEFAULT
        self._port_b = 0
        self._ob: int | None = None  # the output buffer
        self._ob_from_kbd = False
        self._kbd: deque[int] = deque()  # keyboard bytes waiting for the output buffer
        self._kbd_param: int | None = None  # keyboard command waiting for its parameter
        self._scancode_set = 2
        self._pending: int | None = None  # controller command waiting for a data byte
        self._last_was_command = False
        self._level = False
        self.resets = 0
        self._warned: set[int] = set()

    # -- the Device protocol ------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        """The port's byte; wider reads return it in the low byte, zeros above."""
        if size != 1:
            return self.read(offset, 1) + bytes(size - 1) if size > 0 else b""
        with self._lock:
            if offset == STATUS:
                value = self._status()
            elif offset == DATA:
                value = self._read_data()
            elif offset == PORT_B:
                value = (self._port_b & PORT_B_WRITABLE) | PORT_B_TIMER2_OUT
            else:
                value = 0xFF
        return _BYTE[value]

    def write(self, offset: int, data: bytes) -> None:
        """Write the first byte of `data` to the port."""
        if not data:
            return
        value = data[0]
        reset = False
        with self._lock:
            if offset == COMMAND:
                self._last_was_command = True
                reset = self._command(value)
            elif offset == DATA:
                self._last_was_command = False
                reset = self._write_data(value)
            elif offset == PORT_B:
                self._port_b = value & PORT_B_WRITABLE
            self._update_irq()
        if reset:  # outside the lock: the callback may stop the VM
            self.resets += 1
            self._on_reset()

    # -- state ------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Controller RAM, ports, the output buffer and the keyboard's queue (plain values)."""
        with self._lock:
            return {"ram": b64(self._ram), "outp": self._outp, "port_b": self._port_b,
                    "ob": self._ob, "ob_from_kbd": self._ob_from_kbd, "kbd": list(self._kbd),
                    "kbd_param": self._kbd_param, "scancode_set": self._scancode_set,
                    "pending": self._pending, "last_was_command": self._last_was_command}

    def restore(self, state: object, where: str = "i8042") -> None:
        """Take a `state()`, all values checked first; the IRQ line follows the output buffer."""
        r = StateReader(state, where)
        ram = r.bytes("ram", len(self._ram), exact=len(self._ram))
        outp = r.int("outp", 0, U8)
        port_b = r.int("port_b", 0, PORT_B_WRITABLE)
        ob = r.optional_int("ob", 0, U8)
        ob_from_kbd = r.bool("ob_from_kbd")
        kbd = r.ints("kbd", KBD_QUEUE, 0, U8)
        kbd_param = r.optional_int("kbd_param", 0, U8)
        if kbd_param not in (None, KBD_SET_LEDS, KBD_SCANCODE_SET, KBD_SET_RATE):
            raise r.fail("kbd_param", f"{kbd_param:#x} is not a command that takes a parameter")
        scancode_set = r.int("scancode_set", 1, 3)
        pending = r.optional_int("pending", 0, U8)
        if pending is not None and not (CMD_WRITE_RAM <= pending < CMD_WRITE_RAM + 0x20 or pending
                                        in (CMD_WRITE_OUTPUT, CMD_KBD_LOOP, CMD_AUX_LOOP,
                                            CMD_AUX_SEND)):
            raise r.fail("pending", f"{pending:#x} is not a command that takes a data byte")
        last_was_command = r.bool("last_was_command")
        r.done()
        with self._lock:
            self._ram[:] = ram
            self._outp, self._port_b = outp, port_b
            self._ob, self._ob_from_kbd = ob, ob_from_kbd and ob is not None
            self._kbd = deque(kbd)
            self._kbd_param, self._scancode_set = kbd_param, scancode_set
            self._pending, self._last_was_command = pending, last_was_command
            self._level = self._ob is not None and bool(self._ctr & CTR_KBDINT)
            if self._irq is not None:
                self._irq.set_level(self._level)

    # -- controller -----------------------------------------------------------
    @property
    def _ctr(self) -> int:
        return self._ram[0]

    def _status(self) -> int:
        status = STR_KEYLOCK | (self._ctr & CTR_SYSFLAG)
        if self._ob is not None:
            status |= STR_OBF
        if self._last_was_command:
            status |= STR_CMDDAT
        return status

    def _read_data(self) -> int:
        """Take the output buffer (0 when empty) and let the keyboard refill it."""
        value = self._ob
        if value is None:
            return 0
        self._ob = None
        self._refill()
        if self._ob is not None and self._level:
            # One edge per byte: drop the line so the refill raises it again.
            self._level = False
            if self._irq is not None:
                self._irq.set_level(False)
        self._update_irq()
        return value

    def _command(self, cmd: int) -> bool:
        """Run a controller command; True if it pulses the reset line."""
        self._pending = None
        if CMD_READ_RAM <= cmd < CMD_READ_RAM + 0x20:
            self._reply(self._ram[cmd & 0x1F])
        elif CMD_WRITE_RAM <= cmd < CMD_WRITE_RAM + 0x20 or cmd in (
                CMD_WRITE_OUTPUT, CMD_KBD_LOOP, CMD_AUX_LOOP, CMD_AUX_SEND):
            self._pending = cmd  # the parameter follows at the data port
        elif cmd == CMD_AUX_DISABLE:
            self._ram[0] |= CTR_AUXDIS
        elif cmd == CMD_AUX_ENABLE:
            self._ram[0] &= ~CTR_AUXDIS
        elif cmd == CMD_AUX_TEST:
            self._reply(AUX_TEST_CLOCK_HIGH)
        elif cmd == CMD_CTL_TEST:
            self._ram[0] |= CTR_SYSFLAG
            self._reply(CTL_TEST_OK)
        elif cmd == CMD_KBD_TEST:
            self._reply(KBD_TEST_OK)
        elif cmd == CMD_KBD_DISABLE:
            self._ram[0] |= CTR_KBDDIS
        elif cmd == CMD_KBD_ENABLE:
            self._ram[0] &= ~CTR_KBDDIS
            self._refill()
        elif cmd == CMD_READ_INPUT:
            self._reply(INPUT_PORT)
        elif cmd == CMD_READ_OUTPUT:
            self._reply(self._outp)
        elif cmd == CMD_READ_TEST_INPUTS:
            self._reply(0x00)
        elif cmd >= CMD_PULSE:
            return not cmd & OUTP_RESET  # 0xFE: the classic reboot
        elif cmd not in self._warned:
            self._warned.add(cmd)
            log.info("i8042: command %#04x not implemented, ignored", cmd)
        return False

    def _write_data(self, value: int) -> bool:
        """A data-port byte: a controller command's parameter, else a keyboard command."""
        cmd, self._pending = self._pending, None
        if cmd is None:
            self._ram[0] &= ~CTR_KBDDIS  # sending to the keyboard re-enables it
            self._keyboard(value)
            self._refill()
        elif cmd == CMD_WRITE_OUTPUT:
            self._outp = value
            return not value & OUTP_RESET
        elif cmd == CMD_KBD_LOOP:
            self._reply(value, from_kbd=True)
        elif cmd == CMD_AUX_LOOP:
            self._reply(value)  # no AUXDATA: "no AUX port" to Linux (see above)
        elif cmd == CMD_AUX_SEND:
            pass  # nobody on the AUX port
        else:
            self._ram[cmd & 0x1F] = value
            self._refill()  # CTR may have enabled the keyboard
        return False

    def _reply(self, value: int, from_kbd: bool = False) -> None:
        """A controller reply takes the output buffer; a keyboard byte there goes back."""
        if self._ob is not None and self._ob_from_kbd:
            self._kbd.appendleft(self._ob)
        self._ob, self._ob_from_kbd = value, from_kbd

    def _refill(self) -> None:
        if self._ob is None and self._kbd and not self._ctr & CTR_KBDDIS:
            self._ob, self._ob_from_kbd = self._kbd.popleft(), True

    def _update_irq(self) -> None:
        level = self._ob is not None and bool(self._ctr & CTR_KBDINT)
        if level != self._level:
            self._level = level
            if self._irq is not None:
                self._irq.set_level(level)

    # -- keyboard -------------------------------------------------------------
    def _keyboard(self, value: int) -> None:
        command, self._kbd_param = self._kbd_param, None
        if command is not None:  # the parameter of ED, F0 or F3
            self._send(KBD_ACK)
            if command == KBD_SCANCODE_SET:
                if value == 0:
                    self._send(self._scancode_set)
                elif value in (1, 2, 3):
                    self._scancode_set = value
        elif value == KBD_RESET:
            self._scancode_set = 2
            self._send(KBD_ACK, KBD_BAT_OK)
        elif value == KBD_GET_ID:
            self._send(KBD_ACK, *(KBD_ID_TRANSLATED if self._ctr & CTR_XLATE else KBD_ID))
        elif value == KBD_ECHO:
            self._send(KBD_ECHO)
        elif value in (KBD_SET_LEDS, KBD_SCANCODE_SET, KBD_SET_RATE):
            self._kbd_param = value
            self._send(KBD_ACK)
        else:  # enable, disable, set defaults, typematic modes...: all acknowledged
            self._send(KBD_ACK)

    def _send(self, *values: int) -> None:
        for value in values:
            if len(self._kbd) < KBD_QUEUE:
                self._kbd.append(value)
