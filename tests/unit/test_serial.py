"""16550A UART: driven through read/write exactly as Linux's 8250 driver drives it."""

from __future__ import annotations

import io
import random
import threading
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.bus import NullIrq
from kvmpy.devices.serial import Serial

# Register offsets and bits, spelled out as Linux's include/uapi/linux/serial_reg.h does.
RX = TX = DLL = 0
IER = DLM = 1
IIR = FCR = EFR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08
IIR_NO_INT, IIR_THRI, IIR_RDI, IIR_RLSI = 0x01, 0x02, 0x04, 0x06
FCR_ENABLE_FIFO, FCR_CLEAR_RCVR, FCR_CLEAR_XMIT = 0x01, 0x02, 0x04
LCR_DLAB, LCR_WLEN8, LCR_CONF_MODE_B = 0x80, 0x03, 0xBF
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MSR_DCTS, MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x01, 0x10, 0x20, 0x40, 0x80


def rd(s: Serial, offset: int) -> int:
    return s.read(offset, 1)[0]


def wr(s: Serial, offset: int, value: int) -> None:
    s.write(offset, bytes([value]))


@pytest.fixture
def uart() -> tuple[Serial, NullIrq, io.BytesIO]:
    irq, out = NullIrq(), io.BytesIO()
    return Serial(irq, out), irq, out


# -- Linux's probe ---------------------------------------------------------------
def test_8250_autoconfig_finds_a_16550a(uart):
    """drivers/tty/serial/8250/8250_port.c autoconfig(), step by step."""
    s, irq, _ = uart
    # existence test: IER keeps exactly its low four bits
    scratch = rd(s, IER)
    wr(s, IER, 0)
    assert rd(s, IER) & 0x0F == 0
    wr(s, IER, 0x0F)
    assert rd(s, IER) & 0x0F == 0x0F
    wr(s, IER, scratch)
    save_mcr, save_lcr = rd(s, MCR), rd(s, LCR)
    # loopback test: MCR outputs come back as MSR inputs
    wr(s, MCR, MCR_LOOP | 0x0A)
    assert rd(s, MSR) & 0xF0 == 0x90
    wr(s, MCR, save_mcr)
    # FIFO detection: IIR bits 7:6 after enabling the FIFO
    wr(s, LCR, LCR_CONF_MODE_B)
    wr(s, EFR, 0)
    wr(s, LCR, 0)
    wr(s, FCR, FCR_ENABLE_FIFO)
    assert rd(s, IIR) >> 6 == 3  # 16550A
    # autoconfig_16550a: no EFR behind DLAB, no XScale UUE bit in IER
    wr(s, LCR, LCR_DLAB)
    assert rd(s, EFR) != 0
    wr(s, LCR, 0)
    iersave = rd(s, IER)
    wr(s, IER, iersave | 0x40)
    assert not rd(s, IER) & 0x40
    wr(s, IER, iersave)
    # reset the UART as autoconfig does at the end
    wr(s, LCR, save_lcr)
    wr(s, MCR, save_mcr)
    wr(s, FCR, FCR_ENABLE_FIFO)
    wr(s, FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | FCR_CLEAR_XMIT)
    wr(s, FCR, 0)
    rd(s, RX)
    wr(s, IER, 0)
    assert rd(s, IIR) == IIR_NO_INT  # FIFOs off again, nothing pending
    assert rd(s, LSR) == LSR_THRE | LSR_TEMT
    assert rd(s, MCR) == save_mcr and rd(s, LCR) == save_lcr
    assert not irq.level


@pytest.mark.parametrize("value", [0x00, 0x55, 0xAA, 0xFF])
def test_scratch_register_keeps_any_byte(uart, value):
    s, _, _ = uart
    wr(s, SCR, value)
    assert rd(s, SCR) == value


def test_divisor_latch_hides_behind_dlab(uart):
    s, _, out = uart
    wr(s, LCR, LCR_DLAB | LCR_WLEN8)
    wr(s, DLL, 0x01)
    wr(s, DLM, 0x02)
    assert (rd(s, DLL), rd(s, DLM)) == (0x01, 0x02)
    wr(s, LCR, LCR_WLEN8)
    assert rd(s, IER) == 0  # IER, not DLM
    wr(s, TX, ord("x"))
    s.flush()
    assert out.getvalue() == b"x"  # transmitted, did not touch DLL
    wr(s, LCR, LCR_DLAB | LCR_WLEN8)
    assert rd(s, DLL) == 0x01


def test_loopback_fifo_holds_16_bytes_as_size_fifo_counts(uart):
    """8250_port.c size_fifo(): a 16550A's receive FIFO holds 16 bytes in loopback."""
    s, _, out = uart
    wr(s, FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | FCR_CLEAR_XMIT)
    wr(s, MCR, MCR_LOOP)
    for count in range(256):
        wr(s, TX, count)
    assert rd(s, LSR) & LSR_OE  # the rest overran
    received = []
    while rd(s, LSR) & LSR_DR and len(received) < 256:
        received.append(rd(s, RX))
    assert received == list(range(16))
    assert not rd(s, LSR) & LSR_OE  # reading LSR cleared it
    s.flush()
    assert out.getvalue() == b""  # loopback never reaches the wire
    assert s.enqueue_input(b"typed") == 0  # nor does the line reach the receiver
    wr(s, MCR, MCR_OUT2)
    assert s.enqueue_input(b"typed") == 5


def test_loopback_modem_lines_and_delta_interrupt(uart):
    s, irq, _ = uart
    wr(s, IER, IER_MSI)
    wr(s, MCR, MCR_LOOP | MCR_OUT2)  # entering loopback: CTS and DSR drop
    assert irq.level
    assert rd(s, IIR) & 0x0F == 0x00  # modem status interrupt
    msr = rd(s, MSR)
    assert msr & 0xF0 == MSR_DCD
    assert msr & MSR_DCTS
    assert not irq.level  # reading MSR cleared the deltas
    wr(s, MCR, MCR_LOOP | MCR_OUT2 | MCR_DTR | MCR_RTS | MCR_OUT1)
    assert rd(s, MSR) & 0xF0 == MSR_DCD | MSR_DSR | MSR_CTS | MSR_RI
    wr(s, MCR, MCR_LOOP | MCR_OUT2 | MCR_DTR | MCR_RTS)
    assert rd(s, MSR) & 0x04  # trailing edge of RI


# -- THRE: what serial8250_do_startup() tests -------------------------------------
def test_thre_interrupt_is_reasserted_when_etbei_is_set_again(uart):
    s, irq, _ = uart
    wr(s, FCR, FCR_ENABLE_FIFO)
    wr(s, IER, IER_THRI)
    assert irq.level
    iir1 = rd(s, IIR)
    assert iir1 == 0xC0 | IIR_THRI
    assert not irq.level  # reading IIR while it reports THRE clears it
    assert rd(s, IIR) == 0xC0 | IIR_NO_INT
    wr(s, IER, 0)
    wr(s, IER, IER_THRI)
    assert irq.level
    assert not rd(s, IIR) & IIR_NO_INT  # no UART_BUG_THRE
    wr(s, IER, 0)
    assert not irq.level


def test_txen_test_sees_thre(uart):
    s, _, _ = uart
    wr(s, IER, IER_THRI)
    lsr, iir = rd(s, LSR), rd(s, IIR)
    wr(s, IER, 0)
    assert lsr & LSR_TEMT and not iir & IIR_NO_INT  # no UART_BUG_TXEN


def test_every_transmitted_byte_rearms_thre(uart):
    s, irq, _ = uart
    wr(s, IER, IER_THRI)
    rd(s, IIR)
    assert not irq.level
    wr(s, TX, ord("a"))
    assert irq.level and rd(s, IIR) & 0x0F == IIR_THRI


# -- receive ------------------------------------------------------------------------
def test_received_data_sets_dr_and_interrupts(uart):
    s, irq, _ = uart
    wr(s, FCR, FCR_ENABLE_FIFO)
    assert s.enqueue_input(b"hi") == 2
    assert rd(s, LSR) & LSR_DR
    assert not irq.level  # not enabled yet
    wr(s, IER, IER_RDI | IER_RLSI)
    assert irq.level
    assert rd(s, IIR) == 0xC0 | IIR_RDI
    assert rd(s, RX) == ord("h")
    assert irq.level
    assert rd(s, RX) == ord("i")
    assert not irq.level
    assert not rd(s, LSR) & LSR_DR
    assert rd(s, RX) == 0  # empty reads zero
    assert s.bytes_in == 2


def test_receive_has_priority_over_thre(uart):
    s, irq, _ = uart
    wr(s, IER, IER_RDI | IER_THRI)
    s.enqueue_input(b"k")
    assert rd(s, IIR) & 0x0F == IIR_RDI
    assert rd(s, RX) == ord("k")
    assert rd(s, IIR) & 0x0F == IIR_THRI
    assert rd(s, IIR) & 0x0F == IIR_NO_INT
    assert not irq.level


def test_fcr_receiver_reset_drops_pending_input(uart):
    s, irq, _ = uart
    wr(s, IER, IER_RDI)
    s.enqueue_input(b"abc")
    wr(s, FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR)
    assert not rd(s, LSR) & LSR_DR
    assert not irq.level


def test_input_beyond_capacity_is_left_to_the_caller():
    s = Serial(NullIrq(), None, rx_capacity=4)
    assert s.enqueue_input(b"abcdef") == 4
    assert s.enqueue_input(b"ef") == 0
    assert rd(s, RX) == ord("a")
    assert s.enqueue_input(b"ef") == 1


# -- output batching ------------------------------------------------------------------
class CountingWriter:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.flushes = 0

    def write(self, data: bytes) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        self.flushes += 1


def test_output_is_batched_until_newline_idle_or_flush():
    w = CountingWriter()
    s = Serial(NullIrq(), w)
    for c in b"hello":
        wr(s, TX, c)
    assert w.chunks == []
    wr(s, TX, ord("\n"))
    assert w.chunks == [b"hello\n"] and w.flushes == 1
    wr(s, IER, IER_THRI)  # Linux's interrupt-driven transmit...
    for c in b"$ ":
        wr(s, TX, c)
    wr(s, IER, 0)  # ...stops THRE when its buffer is empty: the prompt shows now
    assert w.chunks[-1] == b"$ "
    wr(s, TX, ord("x"))
    s.flush()
    assert w.chunks[-1] == b"x"
    s.flush()  # nothing left: no empty write
    assert len(w.chunks) == 3
    assert s.bytes_out == 9


def test_long_lines_are_written_in_large_chunks():
    w = CountingWriter()
    s = Serial(NullIrq(), w)
    for _ in range(10_000):
        wr(s, TX, ord("."))
    assert 1 <= len(w.chunks) <= 3
    s.flush()
    assert b"".join(w.chunks) == b"." * 10_000


def test_callable_output_and_short_raw_writes():
    got: list[bytes] = []
    s = Serial(NullIrq(), got.append)
    for c in b"a\n":
        wr(s, TX, c)
    assert got == [b"a\n"]

    class Trickle:  # a raw file that writes one byte at a time
        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, data) -> int:
            self.data += bytes(data[:1])
            return 1

    t = Trickle()
    s = Serial(NullIrq(), t)
    for c in b"abc\n":
        wr(s, TX, c)
    assert t.data == b"abc\n"


def test_broken_output_never_raises_into_the_guest():
    def broken(data: bytes) -> None:
        raise BrokenPipeError("stdout closed")

    s = Serial(NullIrq(), broken)
    for c in b"lost\n":
        wr(s, TX, c)
    wr(s, TX, ord("\n"))
    assert s.tx_lost == 6
    assert rd(s, LSR) & LSR_THRE


def test_wide_accesses_use_the_first_byte(uart):
    s, _, _ = uart
    s.write(SCR, b"\x12\x34")
    assert s.read(SCR, 2) == b"\x12\x00"
    assert s.read(LSR, 4) == bytes([LSR_THRE | LSR_TEMT, 0, 0, 0])
    s.write(SCR, b"")
    assert rd(s, SCR) == 0x12


# -- no lost characters ---------------------------------------------------------------
class Linux8250:
    """The interrupt-driven parts of Linux's 8250 driver, on an edge-triggered line.

    serial8250_interrupt() calls handle_irq until IIR says "no interrupt";
    serial8250_tx_chars() writes up to 16 bytes and clears IER.THRI when the
    transmit buffer is empty; start_tx sets THRI only when it is clear.
    """

    def __init__(self, s: Serial, irq: NullIrq) -> None:
        self.s, self.irq = s, irq
        self.xmit: deque[int] = deque()
        self.received = bytearray()
        self.handled = 0
        self.ier = IER_RLSI | IER_RDI
        wr(s, LCR, LCR_WLEN8)
        wr(s, MCR, MCR_DTR | MCR_RTS | MCR_OUT2)
        wr(s, FCR, FCR_ENABLE_FIFO | 0x80)
        wr(s, IER, self.ier)

    def write(self, data: bytes) -> None:  # uart_write -> start_tx
        self.xmit.extend(data)
        if not self.ier & IER_THRI:
            self.ier |= IER_THRI
            wr(self.s, IER, self.ier)

    def interrupt(self) -> None:
        s = self.s
        while not (iir := rd(s, IIR)) & IIR_NO_INT:
            lsr = rd(s, LSR)
            count = 256
            while lsr & LSR_DR and count:
                self.received.append(rd(s, RX))
                count -= 1
                lsr = rd(s, LSR)
            rd(s, MSR)
            if lsr & LSR_THRE and self.ier & IER_THRI:
                for _ in range(16):
                    if not self.xmit:
                        break
                    wr(s, TX, self.xmit.popleft())
                if not self.xmit:
                    self.ier &= ~IER_THRI
                    wr(s, IER, self.ier)
            assert iir & 0x0F in (IIR_RDI, IIR_THRI, IIR_RLSI, 0x00)

    def run_pending_interrupts(self) -> None:
        """The CPU: one handler run per rising edge the IO-APIC saw."""
        while self.handled < self.irq.edges:
            self.handled += 1
            self.interrupt()


def test_interrupt_driven_output_and_input_lose_nothing():
    rng = random.Random(4)
    irq, out = NullIrq(), io.BytesIO()
    s = Serial(irq, out)
    linux = Linux8250(s, irq)
    sent, typed = bytearray(), bytearray()
    for _ in range(400):
        chunk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600)))
        sent += chunk
        linux.write(chunk)
        if rng.random() < 0.3:  # the stdin thread delivers keys at any time
            keys = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
            typed += keys[: s.enqueue_input(keys)]
        linux.run_pending_interrupts()
    for _ in range(50):  # then a quiet console: only the keyboard
        keys = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        typed += keys[: s.enqueue_input(keys)]
        linux.run_pending_interrupts()
        assert linux.received == typed
    s.flush()
    assert out.getvalue() == bytes(sent)
    assert linux.received == typed
    assert not linux.xmit and not irq.level


def test_input_from_another_thread_arrives_whole_and_in_order():
    s = Serial(NullIrq(), None, rx_capacity=64)
    data = bytes(random.Random(1).randrange(256) for _ in range(20_000))

    def stdin_reader() -> None:
        view = memoryview(data)
        while view:
            view = view[s.enqueue_input(view):]

    t = threading.Thread(target=stdin_reader)
    t.start()
    got = bytearray()
    while len(got) < len(data):
        if rd(s, LSR) & LSR_DR:
            got.append(rd(s, RX))
    t.join()
    assert got == data


# -- property: the line always tells the truth -------------------------------------------
ops = st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 7), st.integers(0, 255)),
    st.tuples(st.just("r"), st.integers(0, 7), st.just(0)),
    st.tuples(st.just("in"), st.integers(0, 20), st.just(0)),
    st.tuples(st.just("wide"), st.integers(0, 7), st.integers(0, 8)),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_random_accesses_never_raise_and_irq_level_matches_pending(sequence):
    irq = NullIrq()
    s = Serial(irq, io.BytesIO(), rx_capacity=32)
    for op, offset, value in sequence:
        if op == "w":
            wr(s, offset, value)
        elif op == "r":
            assert len(s.read(offset, 1)) == 1
        elif op == "in":
            assert s.enqueue_input(b"x" * offset) <= offset
        else:
            assert len(s.read(offset, value)) == value
            s.write(offset, bytes(value))
        level = irq.level
        iir = rd(s, IIR)  # pending-and-enabled is what IIR bit 0 reports
        assert level == (not iir & IIR_NO_INT)
        assert iir & 0x0F in (IIR_NO_INT, IIR_RLSI, IIR_RDI, IIR_THRI, 0x00)
        lcr = rd(s, LCR)
        if not lcr & LCR_DLAB:
            ier = rd(s, IER)
            assert ier & ~0x0F == 0
            if ier & IER_RDI and rd(s, LSR) & LSR_DR:
                assert irq.level
            if ier == 0:
                assert not irq.level
        assert rd(s, LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
