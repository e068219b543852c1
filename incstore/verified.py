"""Verified: this machine's record of the chunk files a save has written, or a save or a
restore read and found to match their size and XXH3-128, so that the next save reads only the
chunks that changed since (on a CI runner, where the chunk store arrives from the cache, the
restore's reads spare the save a second pass over every chunk it extracted).

A save checks every chunk it reuses (a chunk store may hold junk under a plausible narinfo),
which for a large store means reading gigabytes to learn that nothing changed. The record lets
it skip the chunks whose file is provably the one it checked: same device, inode, size and
change time. The change time (ctime) is set by the kernel on every write, rename or
permission change, and no user can set it back, so a chunk rewritten in place or replaced
since shows a new identity and is read again.

A save renews the mtime of every chunk it reuses, which moves its change time; it records the
identity it reads right after its own renewal. A write that lands between the check and that
read goes unnoticed, for this save and the next: the record is a saving of work, not a proof.
What it can cost is bounded: a restore still checks every NAR against the manifest's hash
(taken from the daemon's DB, never from a chunk), so such a chunk is refused and quarantined
there, and the save after that writes it again.

The record is kept outside the chunk store, in the user's state directory
(`$XDG_STATE_HOME/incstore`, else `~/.local/state/incstore`): whoever can write the chunk
store must not be able to vouch for a chunk. A record that cannot be read counts as empty.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from incstore import atomicfile

Identity = tuple[int, int, int, int]  # device, inode, size, ctime in ns


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns)


def _state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "incstore"


class Record:
    """key -> (identity, xxh3) for one local chunk store."""

    def __init__(self, chunk_store: Path) -> None:
        name = hashlib.sha256(os.fsencode(os.path.realpath(chunk_store))).hexdigest()[:24]
        self.path = _state_dir() / f"verified-{name}.json"
        self.entries: dict[str, tuple[Identity, str]] = {}
        self.changed = False
        with contextlib.suppress(OSError, ValueError, TypeError):
            raw = json.loads(self.path.read_bytes())
            self.entries = {k: (tuple(v[0]), str(v[1])) for k, v in raw.items()
                            if len(v) == 2 and len(v[0]) == 4}

    def vouches(self, key: str, st: os.stat_result, xxh3: str) -> bool:
        entry = self.entries.get(key)
        return entry is not None and entry == (identity(st), xxh3)

    def note(self, key: str, st: os.stat_result, xxh3: str) -> None:
        self.entries[key] = (identity(st), xxh3)
        self.changed = True

    def forget(self, key: str) -> None:
        if self.entries.pop(key, None) is not None:
            self.changed = True

    def save(self) -> None:
        """Write the record back; a state directory that cannot be written only costs the
        next save a full check."""
        if not self.changed:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomicfile.write_bytes(self.path, json.dumps(
                {k: [list(v[0]), v[1]] for k, v in self.entries.items()}).encode(), 0o600)
