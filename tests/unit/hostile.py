"""Hostile saved states for restore tests: a good state with one thing changed.

`mutate(data, state)` draws (with hypothesis) one change to a JSON-like state: a
value replaced by junk of any type or size, a field deleted, or an unknown field
added, anywhere in the tree. `check_restore` restores it into a fresh owner: either
it is refused with a one-line `SnapshotError` and the owner is unchanged, or it is
taken and the owner still works (`exercise` must not raise).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from kvmpy.errors import SnapshotError

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.integers(-3, 300), st.floats(allow_nan=False), st.text(max_size=8),
    st.sampled_from(["", "AAAA", "!!!!", "A" * 400, "AAECAwQF", "Zm9v", "52:54:00:12:34:56"]),
    st.lists(st.integers(-1, 300), max_size=40), st.dictionaries(st.text(max_size=4),
                                                                  st.integers(), max_size=2))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


def mutate(data: st.DataObject, state: Any) -> Any:
    state = copy.deepcopy(state)
    paths = _paths(state)
    path = data.draw(st.sampled_from(paths))
    parent = state
    for key in path[:-1]:
        parent = parent[key]
    how = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if how == "replace" or isinstance(parent, list):
        parent[path[-1]] = data.draw(JUNK)
    elif how == "delete":
        del parent[path[-1]]
    else:
        parent[data.draw(st.text(min_size=1, max_size=6))] = data.draw(JUNK)
    return state


def check_restore(bad: Any, fresh: Any, restore: Callable[[Any], None],
                  snapshot: Callable[[], Any], exercise: Callable[[Any], None]) -> bool:
    """Restore `bad` into `fresh`; True if taken. Refused: one line, nothing changed."""
    before = json.dumps(snapshot(), sort_keys=True)
    try:
        restore(bad)
    except SnapshotError as e:
        assert "\n" not in str(e), str(e)
        assert json.dumps(snapshot(), sort_keys=True) == before, "a refused restore changed it"
        return False
    exercise(fresh)
    return True


def round_trip(state: Any) -> Any:
    """Through JSON, as a snapshot file carries it."""
    return json.loads(json.dumps(state))


def resign(path: Path, edit: Callable[[dict[str, Any]], None] | None = None,
           sections: dict[str, Any] | None = None) -> None:
    """Edit snapshot `path` as an attacker who knows the format would: the state's
    sections replaced (and the metadata's machine with them) and/or the metadata
    edited, every checksum recomputed."""
    import hashlib

    from kvmpy.state import stream
    from kvmpy.state.snapshot import METADATA, STATE, write_metadata

    meta = json.loads((path / METADATA).read_text())
    if sections is not None:
        data = stream.encode(sections)
        (path / STATE).write_bytes(data)
        meta["state"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        meta["machine"] = sections["machine"]
    if edit is not None:
        edit(meta)
    write_metadata(path, meta)
