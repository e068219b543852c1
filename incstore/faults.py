"""Fault point: a named place in a write path where the crash tests make the process die.

The kill-anywhere harness sets `INCSTORE_KILL_AT=<point>:<n>` to have the process SIGKILL itself
the n-th time it reaches `<point>`, so that every step between two durable writes gets a crash
on purpose, not only those a timer happens to hit. Unset (always, outside tests), a point costs
one global lookup.
"""

from __future__ import annotations

import os
import signal
import threading

_SPEC = os.environ.get("INCSTORE_KILL_AT", "")
_TARGET, _, _COUNT = _SPEC.partition(":")
_LEFT = int(_COUNT or "1")
_LOCK = threading.Lock()


def point(name: str) -> None:
    global _LEFT
    if not _SPEC or name != _TARGET:
        return
    with _LOCK:
        _LEFT -= 1
        if _LEFT == 0:
            os.kill(os.getpid(), signal.SIGKILL)
