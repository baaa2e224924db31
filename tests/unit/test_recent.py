"""Recent: the last few answers, found by equality, newest first, never more than `size`."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvmpy.recent import Recent


@given(st.lists(st.binary(max_size=3), max_size=30), st.integers(1, 5))
def test_holds_the_newest_distinct_keys(keys: list[bytes], size: int) -> None:
    memo: Recent[bytes, int] = Recent(size)
    for i, key in enumerate(keys):
        if memo.get(key) is None:
            memo.put(key, i)
        assert len(memo.items) <= size
    newest_first = [k for k, _ in memo.items]
    assert len(set(newest_first)) == len(newest_first)
    for key, value in memo.items:  # each answer is the one stored when it was new
        assert keys[value] == key


def test_a_miss_hashes_nothing() -> None:
    class Unhashable(bytes):
        __hash__ = None  # type: ignore[assignment]

    memo: Recent[bytes, str] = Recent(2)
    memo.put(Unhashable(b"table"), "spans")
    assert memo.get(Unhashable(b"table")) == "spans" and memo.hits == 1
    assert memo.get(Unhashable(b"other")) is None
    memo.clear()
    assert memo.get(Unhashable(b"table")) is None
