"""Saved state as plain values, and the checked reading of them back.

What it is: the one vocabulary every owner of state (a device, a virtqueue, a vCPU)
uses for its `state()` / `restore(state)` pair. A state is a JSON object of ints,
bools, strings, lists and nested objects; bytes travel as base64 strings (`b64`).
`StateReader` reads one owner's object back and checks every field as it is taken
(type, range, length) and that no field is left over, so a restore from an edited or
hostile snapshot stops at the first bad value with one line naming it:

    snapshot state serial0.ier: 300 is outside 0..0xff

What it is not: a schema language. Each owner says in its own `restore` what its
fields are and what values make sense together; this module only makes that short.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import functools
import math
from collections.abc import Callable
from typing import Any, TypeAlias

from kvmpy.errors import SnapshotError

# (StateReader's methods are named after the types they read, which hides the builtins
# inside its class body)
_Int: TypeAlias = builtins.int
_Bool: TypeAlias = builtins.bool
_Str: TypeAlias = builtins.str
_Bytes: TypeAlias = builtins.bytes
_List: TypeAlias = builtins.list

U8 = 0xFF
U16 = 0xFFFF
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF


def shown(text: str) -> str:
    """A name from a snapshot as a message shows it: quoted unless it is plain printable
    text (a newline in it would make a one-line refusal two, an escape sequence would
    reach the terminal)."""
    return text if text and text.isprintable() and text.strip() == text else repr(text)


def b64(data: bytes | bytearray | memoryview) -> str:
    """Bytes as a state value."""
    return base64.b64encode(bytes(data)).decode("ascii")


class StateReader:
    """Checked access to one saved object; `where` names it in errors ("serial0")."""

    def __init__(self, state: object, where: _Str) -> None:
        if not isinstance(state, dict):
            raise SnapshotError(f"snapshot state {where}: expected an object, "
                                f"got {_kind(state)}")
        self._state: dict[_Str, Any] = state
        self.where = where
        self._taken: set[_Str] = set()

    def fail(self, key: _Str, problem: _Str) -> SnapshotError:
        """The error for a value that is well formed but impossible (for `raise`)."""
        return SnapshotError(f"snapshot state {self.where}.{key}: {problem}")

    def _get(self, key: _Str) -> Any:
        if key not in self._state:
            raise SnapshotError(f"snapshot state {self.where}: no {key!r}")
        self._taken.add(key)
        return self._state[key]

    def again(self) -> StateReader:
        """A fresh reader of the same object: to check it once, then read it for real."""
        return StateReader(self._state, self.where)

    def has(self, key: _Str) -> _Bool:
        return key in self._state

    def is_str(self, key: _Str) -> _Bool:
        """Whether the field is a string (nothing taken): a value saved in two forms."""
        return isinstance(self._state.get(key), str)

    def null(self, key: _Str) -> _Bool:
        """Whether the field is null (taken if so); else read it with another method."""
        if self._get(key) is None:
            return True
        self._taken.discard(key)
        return False

    def int(self, key: _Str, lo: _Int = 0, hi: _Int = U64) -> _Int:
        return _int(self._get(key), lo, hi, f"{self.where}.{key}")

    def optional_int(self, key: _Str, lo: _Int = 0, hi: _Int = U64) -> _Int | None:
        value = self._get(key)
        return None if value is None else _int(value, lo, hi, f"{self.where}.{key}")

    def number(self, key: _Str) -> float:
        """A finite number, whole or not (a duration)."""
        value = self._get(key)
        if isinstance(value, _Bool) or not isinstance(value, _Int | float) \
                or not math.isfinite(value):
            raise self.fail(key, f"expected a number, got {_kind(value)}")
        return float(value)

    def bool(self, key: _Str) -> _Bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_kind(value)}")
        return value

    def str(self, key: _Str, max_len: _Int = 256) -> _Str:
        value = self._get(key)
        if not isinstance(value, str) or len(value) > max_len:
            raise self.fail(key, f"expected a string of at most {max_len} characters")
        return value

    def bytes(self, key: _Str, max_len: _Int, exact: _Int | None = None) -> _Bytes:
        """A base64 value of at most `max_len` bytes (exactly `exact` if given)."""
        value = self._get(key)
        if not isinstance(value, str) or len(value) > (max_len + 2) // 3 * 4:
            raise self.fail(key, f"expected base64 of at most {max_len} bytes")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise self.fail(key, "not valid base64") from None
        if exact is not None and len(data) != exact:
            raise self.fail(key, f"{len(data)} bytes, expected {exact}")
        return data

    def list(self, key: _Str, max_len: _Int, exact: _Int | None = None) -> _List[Any]:
        value = self._get(key)
        if not isinstance(value, list) or len(value) > max_len:
            raise self.fail(key, f"expected a list of at most {max_len} items")
        if exact is not None and len(value) != exact:
            raise self.fail(key, f"{len(value)} items, expected {exact}")
        return value

    def ints(self, key: _Str, max_len: _Int, lo: _Int = 0, hi: _Int = U64,
             exact: _Int | None = None) -> _List[_Int]:
        return [_int(v, lo, hi, f"{self.where}.{key}[{i}]")
                for i, v in enumerate(self.list(key, max_len, exact))]

    def sub(self, key: _Str) -> StateReader:
        """A nested object, read with its own reader (check it with `done()` too)."""
        return StateReader(self._get(key), f"{self.where}.{key}")

    def subs(self, key: _Str, max_len: _Int, exact: _Int | None = None) -> _List[StateReader]:
        return [StateReader(v, f"{self.where}.{key}[{i}]")
                for i, v in enumerate(self.list(key, max_len, exact))]

    def done(self) -> None:
        """Every field was read: a field this kvmpy does not know is an error, not ignored."""
        extra = sorted(set(self._state) - self._taken)
        if extra:
            raise SnapshotError(f"snapshot state {self.where}: unknown field {extra[0]!r}")


def restorer(owner: Any, state: object, where: str) -> Callable[[], None]:
    """What puts `state` back into `owner` (a device), as often as asked: its own
    `restorer(state, where)` if it has one (the checks done once, here), else its
    `restore(state, where)` at every call. A fast reset (kvmpy.state.reset) puts the
    same state back after every input; checking it again each time is most of a
    device's share of that."""
    make = getattr(owner, "restorer", None)
    if make is not None:
        return make(state, where)  # type: ignore[no-any-return]
    return functools.partial(owner.restore, state, where)


def _int(value: object, lo: int, hi: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SnapshotError(f"snapshot state {where}: expected an integer, got {_kind(value)}")
    if not lo <= value <= hi:
        raise SnapshotError(f"snapshot state {where}: {value} is outside {lo}..{hi:#x}")
    return value


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value),
                                                                        type(value).__name__)
