"""The garbage collector's pauses, measured: with thousands of tunnels a full collection
walks every object the process holds, and the event loop stands still meanwhile.

:func:`gc_pauses` installs one ``gc.callbacks`` hook per process (the first call) that
times every collection; :class:`GcPauses` keeps the total and the longest, by generation.
Services export them on ``/metrics`` (``visiona_gc_pause_seconds_total``,
``visiona_gc_longest_pause_seconds``).
"""

from __future__ import annotations

import gc
import time
from typing import Any

__all__ = ["GcPauses", "gc_pauses"]


class GcPauses:
    """Collections seen since the hook was installed: the total and the longest pause (s),
    by generation."""

    def __init__(self) -> None:
        self.total = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = info["generation"]
        self.total[generation] += pause
        self.longest[generation] = max(self.longest[generation], pause)


_PAUSES: GcPauses | None = None


def gc_pauses() -> GcPauses:
    """This process's :class:`GcPauses`, its hook installed on first use."""
    global _PAUSES
    if _PAUSES is None:
        _PAUSES = GcPauses()
        gc.callbacks.append(_PAUSES)
    return _PAUSES
