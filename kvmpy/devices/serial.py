"""A 16550A UART (the PC's COM port) as a pure state machine.

What it is: the eight registers at offsets 0-7 from the port base, with the
divisor latch behind LCR.DLAB, FIFO mode as Linux's 8250 driver detects it
(IIR bits 7:6 follow FCR bit 0), loopback mode (MCR.LOOP: THR feeds RBR, MCR
outputs feed MSR inputs), and the four interrupt sources of the PC16550D
datasheet (Table IV "Interrupt Control Functions"), in priority order: receiver
line status, received data available, THR empty, modem status.

Transmit: the line is infinitely fast. A byte written to THR is "on the wire"
at once, so LSR.THRE and LSR.TEMT always read 1 and the THR-empty interrupt is
pending again right after every write. Bytes are batched in memory and handed
to `out` on a newline, every 4 KiB, when the guest turns off the THR-empty
interrupt (Linux does so when its transmit buffer runs dry: the transmitter is
idle), or when the VMM calls `flush()`. A write to FCR never discards them.

Receive: another thread (the stdin reader) calls `enqueue_input`; the bytes
wait in a buffer larger than the 16-byte FIFO (64 KiB by default) so a paste
arrives whole, and LSR.DR and the receive interrupt follow it. Nothing is
received while the guest holds the UART in loopback, as on hardware.

Interrupt line: its level is always "some enabled source is pending" (what IIR
bit 0 says, inverted), and it changes only on the edges of that condition. The
ISA IRQ is edge-triggered on the IO-APIC, so every rising edge is one interrupt.
This is kvmtool's hw/serial.c scheme; it loses nothing with Linux because
serial8250_interrupt() reads IIR in a loop until it says "no interrupt": the
line is low when the handler returns, and any later cause makes a new edge. THRE
follows the datasheet: reading IIR while it reports THRE clears it, and setting
IER.ETBEI while THR is empty raises it (Linux's THRE re-assert test in
serial8250_do_startup() depends on both). MCR.OUT2, which gates the IRQ pin on
a real PC board, is ignored as in QEMU, kvmtool and vm-superio.

What it is not: no baud-rate timing, no parity/framing errors, no break, no
character-timeout interrupt (IIR 0xC reads as plain 0x4), no 16750/16650
extensions (EFR, 64-byte FIFO). The only line error is overrun in loopback.

Learned from rust-vmm vm-superio serial.rs and kvmtool hw/serial.c.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, BinaryIO

from kvmpy.bus import IrqLine
from kvmpy.log import get_logger
from kvmpy.state.values import U8, StateReader, b64

log = get_logger(__name__)

# Register offsets from the base port (PC16550D datasheet, Table II).
RBR = THR = DLL = 0  # receive buffer (read), transmit holding (write), divisor low (DLAB=1)
IER = DLM = 1  # interrupt enable; divisor high when DLAB=1
IIR = FCR = 2  # interrupt identification (read), FIFO control (write)
LCR = 3  # line control
MCR = 4  # modem control
LSR = 5  # line status
MSR = 6  # modem status
SCR = 7  # scratch
REGISTERS = 8

# IER: the four interrupt enables; bits 7:4 read as zero on a 16550A.
IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status
IER_MASK = 0x0F

# IIR: bit 0 clear means an interrupt is pending; bits 3:1 name the source.
IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFOS_ENABLED = 0xC0  # bits 7:6 mirror FCR bit 0

# FCR
FCR_FIFO_ENABLE = 0x01
FCR_RCVR_RESET = 0x02
FCR_XMIT_RESET = 0x04  # self-clearing; transmitted bytes are already gone
FCR_TRIGGER = 0xC0  # receive trigger level: kept, has no effect here

LCR_DLAB = 0x80  # divisor latch access

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01  # data ready
LSR_OE = 0x02  # overrun error
LSR_THRE = 0x20  # transmitter holding register empty
LSR_TEMT = 0x40  # transmitter empty

MSR_DCTS = 0x01  # delta clear-to-send
MSR_DDSR = 0x02  # delta data-set-ready
MSR_TERI = 0x04  # trailing edge of ring indicator
MSR_DDCD = 0x08  # delta data-carrier-detect
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
# With no loopback the other end of the line is always ready (as vm-superio and kvmtool).
MSR_LINE_READY = MSR_DCD | MSR_DSR | MSR_CTS

FIFO_SIZE = 16  # 16550A receive FIFO depth: what loopback can hold
RX_CAPACITY = 64 * 1024  # host input waiting for the guest
TX_FLUSH_AT = 4096  # batch size that triggers a write to `out`

_BYTE = [bytes((i,)) for i in range(256)]

Output = Callable[[bytes], object] | BinaryIO | None


class Serial:
    """A 16550A at 8 consecutive ports; `irq` is its ISA interrupt line (COM1: IRQ 4).

    `out` receives the guest's output: a callable taking bytes, a binary
    file-like object with `write` (and optionally `flush`), or None to discard.
    Safe to use from several threads: one lock guards the registers.
    """

    def __init__(self, irq: IrqLine, out: Output = None, *, rx_capacity: int = RX_CAPACITY) -> None:
        self._irq = irq
        self._emit = _sink(out)
        self._lock = threading.Lock()
        self._out_lock = threading.Lock()  # keeps batches in order across flushing threads
        self._rx_capacity = rx_capacity
        # registers (reset values as QEMU and vm-superio: 9600 8N1, OUT2 set)
        self._dll = 0x0C
        self._dlm = 0x00
        self._ier = 0
        self._fcr = 0
        self._lcr = 0x03
        self._mcr = MCR_OUT2
        self._scr = 0
        self._lsr_errors = 0  # LSR.OE; cleared by reading LSR
        self._msr_delta = 0  # MSR bits 3:0; cleared by reading MSR
        self._thre_pending = False  # THR-empty interrupt condition (Table IV)
        self._rx = bytearray()  # RBR/receive FIFO, oldest byte first
        self._tx = bytearray()  # transmitted, not yet handed to `out`
        self._level = False
        self.bytes_out = 0  # bytes the guest transmitted
        self.bytes_in = 0  # bytes accepted by enqueue_input
        self.tx_lost = 0  # bytes `out` failed to take
        self._warned = False

    # -- the Device protocol ----------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        """Register at `offset`; wider reads return it in the low byte, zeros above."""
        if size != 1:
            if size <= 0:
                return b""
            return self.read(offset, 1) + bytes(size - 1)
        with self._lock:
            value = self._read_register(offset)
        return _BYTE[value]

    def write(self, offset: int, data: bytes) -> None:
        """Write the first byte of `data` to the register at `offset`."""
        if not data:
            return
        value = data[0]
        with self._lock:
            if offset == THR and not (self._lcr & LCR_DLAB) and not (self._mcr & MCR_LOOP):
                # The hot path: a transmitted byte. Only THRE can become pending.
                tx = self._tx
                tx.append(value)
                self.bytes_out += 1
                self._thre_pending = True
                if self._ier & IER_ETBEI and not self._level:
                    self._level = True
                    self._irq.set_level(True)
                flush = value == 0x0A or len(tx) >= TX_FLUSH_AT
            else:
                flush = self._write_register(offset, value)
                self._update_irq()
        if flush:
            self.flush()

    # -- what the VMM calls -------------------------------------------------
    @property
    def ready_for_input(self) -> bool:
        """The guest's driver has enabled receive interrupts (and is not in loopback).

        Input offered earlier may be thrown away by the driver's probe (FIFO
        resets, loopback tests), so the VMM holds it until this is true.
        """
        return bool(self._ier & IER_ERBFI) and not self._mcr & MCR_LOOP

    def enqueue_input(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were taken.

        Takes nothing while the guest has the UART in loopback mode and no more
        than the free room in the receive buffer: the caller keeps the rest and
        offers it again later.
        """
        with self._lock:
            if self._mcr & MCR_LOOP:
                return 0
            taken = min(len(data), self._rx_capacity - len(self._rx))
            if taken <= 0:
                return 0
            self._rx += data[:taken]
            self.bytes_in += taken
            self._update_irq()
        return taken

    def flush(self) -> None:
        """Hand every transmitted byte to `out` now."""
        if not self._tx:
            return
        with self._out_lock:
            with self._lock:
                data = bytes(self._tx)
                self._tx.clear()
            if not data:
                return
            try:
                self._emit(data)
            except (OSError, ValueError) as e:  # closed or broken stdout: never raise
                self.tx_lost += len(data)
                if not self._warned:
                    self._warned = True
                    log.warning("serial output failed (%s); guest output is being dropped", e)

    # -- state ------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The registers and both buffers, as plain values (kvmpy.state.values).

        `tx` holds transmitted bytes not yet handed to `out`: the VMM flushes before
        it saves (so they are not printed twice), and a restored UART prints what a
        state saved without that flush still held.
        """
        with self._lock:
            return {"dll": self._dll, "dlm": self._dlm, "ier": self._ier, "fcr": self._fcr,
                    "lcr": self._lcr, "mcr": self._mcr, "scr": self._scr,
                    "lsr_errors": self._lsr_errors, "msr_delta": self._msr_delta,
                    "thre_pending": self._thre_pending, "rx": b64(self._rx), "tx": b64(self._tx)}

    def restore(self, state: object, where: str = "serial") -> None:
        """Take a `state()`; every value is checked first, so a bad one changes nothing.
        The interrupt line is driven to what the restored registers say."""
        self.restorer(state, where)()

    def restorer(self, state: object, where: str = "serial") -> Callable[[], None]:
        """`restore`, checked now: returns what puts the state back, as often as asked."""
        r = StateReader(state, where)
        regs = {name: r.int(name, 0, U8) for name in ("dll", "dlm", "lcr", "scr")}
        for name, allowed in (("ier", IER_MASK), ("fcr", FCR_FIFO_ENABLE | FCR_TRIGGER),
                              ("mcr", MCR_MASK), ("lsr_errors", LSR_OE), ("msr_delta", 0x0F)):
            regs[name] = r.int(name, 0, U8)
            if regs[name] & ~allowed:
                raise r.fail(name, f"{regs[name]:#x} sets bits outside {allowed:#x}")
        thre_pending = r.bool("thre_pending")
        rx = r.bytes("rx", self._rx_capacity)
        tx = r.bytes("tx", TX_FLUSH_AT)
        r.done()

        def put() -> None:
            with self._lock:
                self._dll, self._dlm, self._lcr, self._scr = (regs["dll"], regs["dlm"],
                                                              regs["lcr"], regs["scr"])
                self._ier, self._fcr, self._mcr = regs["ier"], regs["fcr"], regs["mcr"]
                self._lsr_errors, self._msr_delta = regs["lsr_errors"], regs["msr_delta"]
                self._thre_pending = thre_pending
                self._rx[:] = rx
                self._tx[:] = tx
                self._level = self._pending_iid() != IIR_NO_INT
                self._irq.set_level(self._level)

        return put

    # -- registers ----------------------------------------------------------
    def _read_register(self, offset: int) -> int:
        if offset == LSR:
            value = LSR_THRE | LSR_TEMT | self._lsr_errors | (LSR_DR if self._rx else 0)
            if self._lsr_errors:
                self._lsr_errors = 0
                self._update_irq()
            return value
        if offset == RBR:
            if self._lcr & LCR_DLAB:
                return self._dll
            rx = self._rx
            if not rx:
                return 0
            value = rx[0]
            del rx[0]  # bytearray deletes from the front in O(1)
            if not rx:
                self._update_irq()
            return value
        if offset == IIR:
            iid = self._pending_iid()
            if iid == IIR_THRI:  # reading IIR while it reports THRE clears it
                self._thre_pending = False
                self._update_irq()
            return iid | (IIR_FIFOS_ENABLED if self._fcr & FCR_FIFO_ENABLE else 0)
        if offset == IER:
            return self._dlm if self._lcr & LCR_DLAB else self._ier
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == MSR:
            value = self._modem_inputs() | self._msr_delta
            if self._msr_delta:
                self._msr_delta = 0
                self._update_irq()
            return value
        if offset == SCR:
            return self._scr
        return 0xFF  # outside the 8 registers (the bus never sends this)

    def _write_register(self, offset: int, value: int) -> bool:
        """Apply a register write; True if the transmitter just went idle (flush)."""
        dlab = self._lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self._dll = value
            else:  # loopback: the transmitter feeds the receiver (FIFO-sized)
                if len(self._rx) < (FIFO_SIZE if self._fcr & FCR_FIFO_ENABLE else 1):
                    self._rx.append(value)
                else:
                    self._lsr_errors |= LSR_OE
                self._thre_pending = True
        elif offset == IER:
            if dlab:
                self._dlm = value
            else:
                old, self._ier = self._ier, value & IER_MASK
                rising = self._ier & ~old
                if rising & IER_ETBEI:  # THR is always empty: THRE is pending now
                    self._thre_pending = True
                if old & ~self._ier & IER_ETBEI:
                    return True  # Linux turns THRE off when it has nothing left to send
        elif offset == FCR:
            if (value ^ self._fcr) & FCR_FIFO_ENABLE or value & FCR_RCVR_RESET:
                self._rx.clear()  # toggling FIFO mode also empties the FIFOs
            self._fcr = value & (FCR_FIFO_ENABLE | FCR_TRIGGER)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            before = self._modem_inputs()
            self._mcr = value & MCR_MASK
            self._note_modem_change(before, self._modem_inputs())
        elif offset == SCR:
            self._scr = value
        # LSR and MSR writes (factory test) are ignored, as on the 16550A.
        return False

    def _modem_inputs(self) -> int:
        """MSR bits 7:4. In loopback MCR's outputs are wired to them: RTS->CTS, DTR->DSR,
        OUT1->RI, OUT2->DCD (Linux's autoconfig expects 0x90 for MCR = LOOP|OUT2|RTS)."""
        mcr = self._mcr
        if not mcr & MCR_LOOP:
            return MSR_LINE_READY
        return ((MSR_CTS if mcr & MCR_RTS else 0) | (MSR_DSR if mcr & MCR_DTR else 0)
                | (MSR_RI if mcr & MCR_OUT1 else 0) | (MSR_DCD if mcr & MCR_OUT2 else 0))

    def _note_modem_change(self, before: int, after: int) -> None:
        changed = before ^ after
        delta = ((MSR_DCTS if changed & MSR_CTS else 0) | (MSR_DDSR if changed & MSR_DSR else 0)
                 | (MSR_DDCD if changed & MSR_DCD else 0)
                 | (MSR_TERI if before & MSR_RI and not after & MSR_RI else 0))
        self._msr_delta |= delta

    # -- interrupts -----------------------------------------------------------
    def _pending_iid(self) -> int:
        """The highest-priority enabled pending source, as IIR bits 3:0."""
        ier = self._ier
        if ier & IER_ELSI and self._lsr_errors:
            return IIR_RLSI
        if ier & IER_ERBFI and self._rx:
            return IIR_RDI
        if ier & IER_ETBEI and self._thre_pending:
            return IIR_THRI
        if ier & IER_EDSSI and self._msr_delta:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._pending_iid() != IIR_NO_INT
        if level != self._level:
            self._level = level
            self._irq.set_level(level)


def _sink(out: Output) -> Callable[[bytes], object]:
    """A function that writes all of `data` to `out` (see `Serial`)."""
    if out is None:
        return lambda data: None
    write = getattr(out, "write", None)
    if write is None:
        if not callable(out):
            raise TypeError(f"serial output must be callable or have write(): {out!r}")
        return out
    flush = getattr(out, "flush", None)

    def emit(data: bytes) -> None:
        done = write(data)
        if isinstance(done, int) and done < len(data):  # a raw file may write less
            view = memoryview(data)[done:]
            while view:
                n = write(view)
                if not n:
                    raise BlockingIOError(f"output took no bytes, {len(view)} left")
                view = view[n:]
        if flush is not None:
            flush()

    return emit
