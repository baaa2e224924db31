"""kvmpy.qmp's framing of a QMP byte stream into messages, without a socket: as QEMU's
JSON streamer cuts it, whatever the reads and whatever a client sends between messages."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy.qmp import MAX_MESSAGE, _Framer

MESSAGES = [b'{"execute": "qmp_capabilities"}', b'{"execute": "x", "arguments": {"p": "a}{\\""}}',
            b'{"id": [1, {"a": "]"}], "execute": "query-status"}']


@given(cuts=st.lists(st.integers(0, sum(map(len, MESSAGES)) + 8), max_size=12))
def test_messages_come_out_whole_however_the_stream_is_cut(cuts: list[int]) -> None:
    stream = b" \r\n".join(MESSAGES) + b"\n"
    framer, out, start = _Framer(), [], 0
    for end in sorted(cuts) + [len(stream)]:
        out += framer.feed(stream[start:end])
        start = max(start, end)
    assert [m and m.strip() for m in out] == MESSAGES  # (whitespace before one is its own)
    assert json.loads(out[1] or b"")["arguments"]["p"] == 'a}{"'


@pytest.mark.parametrize("junk", [b"42", b'"str"', b"\xff\xfe\x00garbage", b"]", b"}}", b"null"])
def test_a_value_that_is_not_an_object_is_one_error_and_the_next_message_comes(
        junk: bytes) -> None:
    framer = _Framer()
    out = framer.feed(junk + b" ") + framer.feed(MESSAGES[0])
    assert (out[-1] or b"").strip() == MESSAGES[0] and None in out[:-1], out


def test_a_message_without_end_is_refused_past_the_limit() -> None:
    framer = _Framer()
    framer.feed(b'{"execute": "' + b"a" * (MAX_MESSAGE // 2))
    with pytest.raises(ValueError, match="longer than"):
        framer.feed(b"a" * (MAX_MESSAGE // 2 + 16))
