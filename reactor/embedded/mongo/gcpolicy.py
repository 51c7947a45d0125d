"""The collector for a process that only serves the embedded MongoDB (`reactor mongo-emulator`).

Its heap is the stored documents: long-lived, and (an array anywhere makes a document tracked)
walked by every collection of the generation they sit in. With the service's young generation
of 50,000 objects, a middle-generation collection walked ten of those, ~500,000 objects, and
held every connection for 75-90 ms once the collections had grown (mongod stores documents
outside any collector and pauses for none of it). So, after each young collection, what
survived it is frozen: no later collection walks it again, and no pause grows with the data.

The price: a reference cycle that is still alive at a young collection and dies later is never
freed (acyclic garbage, most of it, is freed by reference counting as always). The emulator is
for development, tests and benches, whose runs are minutes; this is not for a process that
runs for months, and the service itself does not use it (reactor.gctune).
"""

from __future__ import annotations

import gc
from typing import Any


def _freeze_survivors(phase: str, info: dict[str, Any]) -> None:
    if phase == "stop" and info["generation"] == 0:
        gc.freeze()


def freeze_survivors_of_young_collections() -> None:
    """Install the policy (idempotent)."""
    if _freeze_survivors not in gc.callbacks:
        gc.callbacks.append(_freeze_survivors)
