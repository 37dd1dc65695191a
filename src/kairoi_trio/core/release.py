"""Letting go of a large structure a slice at a time (pure).

Freeing a list drops a reference to each of its items, and each drop touches the
item's memory: ~20-60 ns an item, a cache miss each, in one C-level step that
holds the GIL. Ten million of them took ~0.2 s in-process, more in a busy
server: one step of the actor whose work grows with the store, every client
waiting. The actor's structures that are let go whole (a compaction's copy of
the jobs, a due index replaced by its rebuild) are emptied from the end instead,
`budget` items a call, between which the actor serves requests.
"""

from __future__ import annotations

from typing import Any

# Items a call drops when the actor lets go of a structure between its steps:
# ~20-60 ns each, so ~1-2 ms a call.
RELEASE_SLICE = 32_768


def drop_some(lists: list[list[Any]], budget: int) -> bool:
    """Empty `lists`, the last one first, each from its end, dropping up to
    `budget` items (and every list found empty); whether items remain."""
    while lists and budget > 0:
        items = lists[-1]
        taken = min(budget, len(items))
        del items[len(items) - taken :]
        budget -= taken
        if not items:
            lists.pop()
    return bool(lists)
