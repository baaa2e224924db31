"""ConsoleOutput keeps a searchable transcript; StdinPump handles the Ctrl-A escape."""

import os
import threading

from kvmpy.console import ConsoleOutput, StdinPump


def test_wait_for_finds_text_written_later_by_another_thread():
    out = ConsoleOutput()
    threading.Timer(0.05, lambda: out.write(b"login: ")).start()
    found = out.wait_for(r"login: ", timeout=5)
    assert found is not None and found.start() == 0


def test_wait_for_times_out_and_respects_start_offset():
    out = ConsoleOutput()
    out.write(b"# ")
    assert out.wait_for(r"# ", timeout=0.1, start=2) is None
    out.write(b"ok\n# ")
    assert out.wait_for(r"# ", timeout=1, start=2).start() == 5


class _NeverWait(threading.Condition):
    def wait(self, timeout=None):
        raise AssertionError("wait_for waited for a guest that is gone")


def test_wait_for_gives_up_when_the_guest_is_gone():
    out = ConsoleOutput()
    out._cond = _NeverWait()  # giving up means returning before any wait
    assert out.wait_for(r"never", timeout=3600, alive=lambda: False) is None
    out.write(b"never")  # what is there already is still found
    assert out.wait_for(r"never", timeout=3600, alive=lambda: False) is not None


class Forward:
    def __init__(self) -> None:
        self.data = b""
        self.flushes = 0

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def flush(self) -> None:
        self.flushes += 1


def test_output_is_forwarded_as_well_as_kept():
    fwd = Forward()
    out = ConsoleOutput(forward=fwd)
    out.write(b"abc")
    out.flush()
    assert fwd.data == b"abc" and fwd.flushes == 1 and out.text == "abc"


def test_stdin_pump_passes_bytes_from_a_pipe():
    r, w = os.pipe()
    got: list[bytes] = []
    done = threading.Event()

    def sink(data: bytes) -> None:
        got.append(data)
        done.set()

    pump = StdinPump(sink, on_quit=lambda: None, stdin=os.fdopen(r, "rb"))
    pump.start()
    os.write(w, b"ls\n\x01x")  # not a terminal: Ctrl-A x is just data
    assert done.wait(5)
    pump.stop()
    assert b"".join(got) == b"ls\n\x01x"
