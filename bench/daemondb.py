"""The bench's own access to a Guix daemon DB (schema 7), with nothing but sqlite3.

`create` makes a DB from the real schema (`schema/guix-schema-7.sql`, the daemon's own DDL) and
registers items the way the daemon does: ValidPaths, then Refs, then DerivationOutputs. `drop`
makes a fraction of a restored store missing again for the "90% present" scenarios. The bench
keeps these here rather than calling incstore's `db` module, which is being rewritten; only
incstore's CLI is ever timed.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SCHEMA = Path(__file__).resolve().parent.parent / "schema" / "guix-schema-7.sql"
STORE_DIR = "/gnu/store"
DB_DIR = "var/guix/db"


@dataclass(frozen=True)
class Registration:
    """One ValidPaths row with its references and, for a `.drv`, its DerivationOutputs rows."""

    path: str
    hash: str  # "sha256:<hex>", as the DB spells it
    nar_size: int
    registration_time: int
    deriver: str | None = None
    references: tuple[str, ...] = ()
    outputs: tuple[tuple[str, str], ...] = ()  # (output id, output path)


def db_path(prefix: Path) -> Path:
    return prefix / DB_DIR / "db.sqlite"


def _insert(conn: sqlite3.Connection, rows: list[Registration]) -> None:
    """ValidPaths, then Refs, then DerivationOutputs, in the caller's transaction."""
    conn.executemany(
        "insert into ValidPaths (path, hash, registrationTime, deriver, narSize) "
        "values (?, ?, ?, ?, ?)",
        [(r.path, r.hash, r.registration_time, r.deriver, r.nar_size) for r in rows])
    ids = dict(conn.execute("select path, id from ValidPaths"))
    conn.executemany("insert into Refs (referrer, reference) values (?, ?)",
                     [(ids[r.path], ids[ref]) for r in rows for ref in r.references])
    conn.executemany("insert into DerivationOutputs (drv, id, path) values (?, ?, ?)",
                     [(ids[r.path], oid, opath) for r in rows for oid, opath in r.outputs])


def create(path: Path, items: Iterable[Registration]) -> None:
    """A fresh daemon DB at `path` holding `items` (each reference must be among them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    if tmp.exists():
        tmp.unlink()
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        conn.executescript(SCHEMA.read_text())
        conn.execute("pragma foreign_keys = 1")
        conn.execute("begin")
        _insert(conn, list(items))
        conn.execute("commit")
    finally:
        conn.close()
    os.rename(tmp, path)
    # the daemon reads the schema version from this file: "7", no newline
    (path.parent / "schema").write_text("7")


def register(path: Path, items: Iterable[Registration]) -> None:
    """Add new `items` to an existing DB in one transaction (references must be valid)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("pragma foreign_keys = 1")
        conn.execute("begin immediate")
        _insert(conn, list(items))
        conn.execute("commit")
    finally:
        conn.close()


def references(path: Path) -> dict[str, set[str]]:
    """Every valid path with the set of paths it references."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        by_id = dict(conn.execute("select id, path from ValidPaths"))
        out: dict[str, set[str]] = {p: set() for p in by_id.values()}
        for referrer, reference in conn.execute("select referrer, reference from Refs"):
            out[by_id[referrer]].add(by_id[reference])
        return out
    finally:
        conn.close()


def remove_tree(path: Path) -> None:
    """Delete a file or tree whose directories are read-only (0555, as in a store)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink()
        return
    for root, dirs, _files in os.walk(path):
        os.chmod(root, 0o700)
        for d in dirs:
            full = os.path.join(root, d)
            if not os.path.islink(full):
                os.chmod(full, 0o700)
    shutil.rmtree(path)


@dataclass(frozen=True)
class Dropped:
    items: int
    nar_bytes: int
    file_bytes: int  # bytes of the regular files deleted: what a restore writes back


def _file_bytes(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size if path.is_file() and not path.is_symlink() else 0
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(path)
               for f in files if not os.path.islink(os.path.join(d, f)))


def drop(prefix: Path, fraction: float, mirrors: Iterable[Path] = ()) -> Dropped:
    """Make `fraction` of a store's items missing again, unregistered and deleted, keeping the
    rest closed: leaves first (nothing references them), then the leaves that uncovers. The
    same items' trees are also deleted under each of `mirrors` (the baseline's copy)."""
    db = db_path(prefix)
    refs = references(db)
    want = max(1, int(len(refs) * fraction))
    referrers: dict[str, int] = dict.fromkeys(refs, 0)
    for path, targets in refs.items():
        for t in targets - {path}:
            referrers[t] += 1
    victims: list[str] = []
    leaves = sorted(p for p, n in referrers.items() if n == 0)
    while leaves and len(victims) < want:
        uncovered = []
        for path in leaves:
            if len(victims) == want:
                break
            victims.append(path)
            for t in refs[path] - {path}:
                referrers[t] -= 1
                if referrers[t] == 0:
                    uncovered.append(t)
        leaves = sorted(uncovered)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("pragma foreign_keys = 1")
        conn.execute("begin")
        nar = sum(conn.execute("select narSize from ValidPaths where path = ?", (p,)).fetchone()[0]
                  for p in victims)
        # referrers before what they reference: the order they were peeled in
        conn.executemany("delete from ValidPaths where path = ?", [(p,) for p in victims])
        conn.execute("commit")
    finally:
        conn.close()
    file_bytes = 0
    for path in victims:
        physical = prefix / path.lstrip("/")
        file_bytes += _file_bytes(physical)
        remove_tree(physical)
        for mirror in mirrors:
            remove_tree(mirror / path.lstrip("/"))
    return Dropped(len(victims), nar, file_bytes)
