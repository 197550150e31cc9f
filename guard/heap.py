"""Keep a serving process's long-lived objects out of the cycle collector's full collections.

CPython's collector now and then walks every object in its oldest generation. In ``guard
serve`` that generation holds the modules, the engine and, above all, the configuration
snapshot: with 10k tenants and 100k extensions a full collection took ~110 ms (240 ms for the
first), and with only the libraries loaded about 100 ms on the benchmark machine. (Rate decks
are stored column by column and add few objects.) Every call waiting on the event loop
during such a walk waits that long (it was the worst authorize latency of ``bench/agi_load.py``).

``gc.freeze()`` moves every object the collector tracks into a permanent generation that no
collection walks. It is done once serving starts (after a full collection, so that no garbage
is kept) and after each snapshot reload, for the new snapshot. Frozen objects are still freed
by reference counting: the snapshot a reload replaces goes away as before (the snapshot holds no
reference cycles; ``tests/test_heap.py`` checks both). What freezing can keep is garbage that
sits in a reference cycle at the moment of a reload: a handful of objects per configuration
change.

It is for a long-running server process only (``guard serve`` and its workers): frozen objects
are process-wide, so a test suite or an admin command that happens to build a snapshot does
not freeze.
"""

from __future__ import annotations

import gc


def freeze_after_startup() -> int:
    """Collect the start-up garbage, then freeze what is left; the number of frozen objects."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def freeze_after_reload() -> int:
    """Freeze the objects made since the last freeze (the new snapshot above all); the number
    of frozen objects. No collection first: it would walk the whole new snapshot."""
    gc.freeze()
    return gc.get_freeze_count()
