"""Daemon DB: the SQLite database in which a Guix or Nix daemon records valid store paths.

Reading: one consistent snapshot through SQLite itself (never a file copy: a daemon in WAL mode
keeps committed data in `-wal`). Writing: registration of items in one transaction, ValidPaths,
then Refs, then DerivationOutputs, with ids mapped by path; either into a copy that is swapped in
under the exclusive `big-lock`, or (for callers that choose it) into a DB directly.

The flavour (Guix schema 7 or Nix schema 10) is read from the DB's own columns, and a DB whose
`schema` file disagrees is refused, so a Guix DB is never handled as a Nix one or the reverse.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from incstore import atomicfile, faults, regularfile
from incstore.errors import DatabaseError, LockedError, ManifestError
from incstore.locks import Primitive

FlavourName = Literal["guix", "nix"]


@dataclass(frozen=True)
class Flavour:
    """What differs between a Guix and a Nix store: directories, schema, lock primitive."""

    name: FlavourName
    store_dir: str
    state_dir: str
    schema_version: int
    schema_sql: str
    lock_primitive: Primitive
    extra_columns: tuple[str, ...]

    @property
    def db_dir(self) -> str:
        return f"{self.state_dir}/db"


GUIX = Flavour("guix", "/gnu/store", "/var/guix", 7, "guix-schema-7.sql", "fcntl", ())
NIX = Flavour(
    "nix", "/nix/store", "/nix/var/nix", 10, "nix-schema-10.sql", "flock",
    ("ultimate", "sigs", "ca"),
)
FLAVOURS: dict[str, Flavour] = {"guix": GUIX, "nix": NIX}


@dataclass(frozen=True, slots=True)
class PathInfo:
    """One ValidPaths row with its references and DerivationOutputs rows."""

    path: str
    hash: str
    nar_size: int
    registration_time: int
    deriver: str | None = None
    references: tuple[str, ...] = ()
    derivation_outputs: tuple[tuple[str, str], ...] = ()
    # Nix only; copied verbatim. None for Guix.
    ultimate: int | None = None
    sigs: str | None = None
    ca: str | None = None


@dataclass
class Snapshot:
    """Everything read from a DB in one read transaction."""

    flavour: Flavour
    infos: dict[str, PathInfo] = field(default_factory=dict)

    def closure(self, roots: Iterable[str]) -> list[str]:
        seen: set[str] = set()
        stack = list(roots)
        while stack:
            path = stack.pop()
            if path in seen:
                continue
            info = self.infos.get(path)
            if info is None:
                raise DatabaseError("not a valid path in the daemon DB", item=path)
            seen.add(path)
            stack.extend(info.references)
        return sorted(seen)


def schema_sql(flavour: Flavour) -> str:
    from importlib import resources  # only needed to create a DB; keeps startup short

    return resources.files("incstore.schema").joinpath(flavour.schema_sql).read_text()


SQLITE_BUSY, SQLITE_LOCKED = 5, 6


def busy_timeout_ms() -> int:
    """How long to wait for a DB another process holds locked (INCSTORE_DB_TIMEOUT seconds,
    default 30): the daemon's own transactions are short."""
    try:
        return max(0, int(float(os.environ.get("INCSTORE_DB_TIMEOUT", "30")) * 1000))
    except ValueError:
        return 30000


def _error(e: sqlite3.Error, db_path: Path, doing: str) -> DatabaseError | LockedError:
    """An SQLite error as one of ours: a busy or locked DB is `LockedError` (exit 5), not a
    broken one."""
    code = getattr(e, "sqlite_errorcode", None)  # Python 3.11 and later
    if code in (SQLITE_BUSY, SQLITE_LOCKED) or "locked" in str(e):
        return LockedError(f"the DB is locked by another process ({e}); {doing} gave up after "
                           f"{busy_timeout_ms() // 1000} s", item=str(db_path))
    return DatabaseError(f"{doing}: {e}", item=str(db_path))


def _schema_file_version(db_path: Path) -> int | None:
    path = db_path.parent / "schema"
    try:
        raw = regularfile.read(path, 64)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DatabaseError(f"cannot read the schema file: {e.strerror or e}",
                            item=str(path)) from None
    text = raw.decode("ascii", errors="replace")
    if not text.isdigit() or not text.isascii():
        raise DatabaseError(f"schema file is corrupt: {text!r}", item=str(path))
    return int(text)


def detect_flavour(conn: sqlite3.Connection, db_path: Path) -> Flavour:
    """Tell Guix from Nix by the DB's columns, cross-checked against its `schema` file."""
    try:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
        if not {"ValidPaths", "Refs", "DerivationOutputs"} <= tables:
            raise DatabaseError("not a Guix or Nix daemon DB (no ValidPaths/Refs)",
                                item=str(db_path))
        columns = {r[1] for r in conn.execute("pragma table_info(ValidPaths)")}
    except sqlite3.DatabaseError as e:
        error = _error(e, db_path, "reading its tables")
        if isinstance(error, LockedError):
            raise error from e
        raise DatabaseError(f"not an SQLite database ({e})", item=str(db_path)) from e
    flavour = NIX if set(NIX.extra_columns) <= columns else GUIX
    version = _schema_file_version(db_path)
    if version is not None and version != flavour.schema_version:
        raise DatabaseError(
            f"schema version {version} is not the {flavour.name} schema "
            f"{flavour.schema_version} its tables have; refusing to touch it",
            item=str(db_path),
        )
    return flavour


def _connect_ro(db_path: Path) -> sqlite3.Connection:
    if not db_path.is_file():
        raise DatabaseError("no such daemon DB" if not db_path.exists() else
                            "is not a regular file", item=str(db_path))
    try:
        uri = "file:" + urllib.parse.quote(str(db_path)) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        conn.execute(f"pragma busy_timeout = {busy_timeout_ms()}")
    except sqlite3.Error as e:
        raise _error(e, db_path, "opening it") from e
    return conn


def read_snapshot(db_path: Path) -> Snapshot:
    """Read every valid path, its references and DerivationOutputs in one consistent snapshot."""
    conn = _connect_ro(db_path)
    try:
        flavour = detect_flavour(conn, db_path)
        extra = "".join(f", {c}" for c in flavour.extra_columns)
        conn.execute("begin")
        try:
            rows = conn.execute(
                "select id, path, hash, registrationTime, deriver, narSize"
                f"{extra} from ValidPaths"
            ).fetchall()
            refs = conn.execute("select referrer, reference from Refs").fetchall()
            outputs = conn.execute("select drv, id, path from DerivationOutputs").fetchall()
        finally:
            conn.execute("commit")
    except sqlite3.Error as e:
        raise _error(e, db_path, "reading it") from e
    finally:
        conn.close()
    by_id = {row[0]: row[1] for row in rows}
    ref_map: dict[int, list[str]] = {}
    for referrer, reference in refs:
        ref_map.setdefault(referrer, []).append(by_id[reference])
    out_map: dict[int, list[tuple[str, str]]] = {}
    for drv, output_id, output_path in outputs:
        out_map.setdefault(drv, []).append((output_id, output_path))
    snapshot = Snapshot(flavour)
    for row in rows:
        row_id, path, hash_, reg_time, deriver, nar_size = row[:6]
        nix = dict(zip(flavour.extra_columns, row[6:], strict=True))
        snapshot.infos[path] = PathInfo(
            path=path,
            hash=hash_,
            nar_size=nar_size or 0,
            registration_time=reg_time,
            deriver=deriver or None,
            references=tuple(sorted(ref_map.get(row_id, ()))),
            derivation_outputs=tuple(sorted(out_map.get(row_id, ()))),
            **nix,
        )
    return snapshot


def _rows(db_path: Path, flavour: Flavour, query: str) -> Iterator[tuple[str, ...]]:
    """The rows of `query` on an existing DB, checked to be of `flavour`, streamed."""
    conn = _connect_ro(db_path)
    try:
        found = detect_flavour(conn, db_path)
        if found != flavour:
            raise DatabaseError(
                f"is a {found.name} DB but the manifest is for a {flavour.name} store",
                item=str(db_path),
            )
        yield from conn.execute(query)
    except sqlite3.Error as e:
        raise _error(e, db_path, "reading it") from e
    finally:
        conn.close()


def valid_paths(db_path: Path, flavour: Flavour) -> dict[str, str]:
    """Map of valid path to hash in an existing DB, checked to be of `flavour`."""
    return dict(_rows(db_path, flavour, "select path, hash from ValidPaths"))  # type: ignore[arg-type]


def iter_valid_paths(db_path: Path, flavour: Flavour) -> Iterator[str]:
    """Every valid path of an existing DB of `flavour`, streamed (no list of them is built)."""
    for (path,) in _rows(db_path, flavour, "select path from ValidPaths"):
        yield path


def is_valid(db_path: Path, path: str) -> bool:
    conn = _connect_ro(db_path)
    try:
        return is_valid_on(conn, path)
    except sqlite3.Error as e:
        raise _error(e, db_path, "reading it") from e
    finally:
        conn.close()


def is_valid_on(conn: sqlite3.Connection, path: str) -> bool:
    return conn.execute("select 1 from ValidPaths where path = ?", (path,)).fetchone() is not None


REGISTER_SLICE = 2000  # rows built at a time: a restore of 200,000 items stays small


def register(conn: sqlite3.Connection, flavour: Flavour, infos: Iterable[PathInfo]) -> None:
    """Register `infos` inside the caller's transaction: ValidPaths, then Refs, then outputs.

    `infos` are consumed once, a slice at a time, so a large restore never builds all its rows
    at once; they usually come in dependency order (what an item references is in an earlier
    slice, or already valid), and a reference to a later one waits for the end. A path that is
    already valid keeps its id and registration data; only its hash and narSize are updated, as
    the daemon's own updatePathInfo does. Every reference must be valid in the DB or among
    `infos`.
    """
    columns = ["path", "hash", "registrationTime", "deriver", "narSize", *flavour.extra_columns]
    insert = (
        f"insert into ValidPaths ({', '.join(columns)}) "
        f"values ({', '.join('?' * len(columns))})"
    )
    ids: dict[str, int] = {}
    later: list[tuple[int, str, str]] = []  # (referrer id, reference, referrer path)

    def id_of(path: str) -> int | None:
        if path not in ids:
            row = conn.execute("select id from ValidPaths where path = ?", (path,)).fetchone()
            if row is None:
                return None
            ids[path] = row[0]
        return ids[path]

    def refs(chunk: list[PathInfo]) -> Iterator[tuple[int, int]]:
        for i in chunk:
            for ref in i.references:
                found = id_of(ref)
                if found is None:
                    later.append((ids[i.path], ref, i.path))
                else:
                    yield ids[i.path], found

    it = iter(infos)
    while chunk := list(itertools.islice(it, REGISTER_SLICE)):
        for info in chunk:
            row = conn.execute("select id from ValidPaths where path = ?",
                               (info.path,)).fetchone()
            if row:
                conn.execute(
                    "update ValidPaths set hash = ?, narSize = ? where id = ?",
                    (info.hash, info.nar_size, row[0]),
                )
                ids[info.path] = row[0]
                continue
            values = [info.path, info.hash, info.registration_time, info.deriver,
                      info.nar_size]
            values += [getattr(info, c) for c in flavour.extra_columns]
            cursor = conn.execute(insert, values)
            assert cursor.lastrowid is not None
            ids[info.path] = cursor.lastrowid
        conn.executemany("insert or replace into Refs (referrer, reference) values (?, ?)",
                         refs(chunk))
        conn.executemany(
            "insert or replace into DerivationOutputs (drv, id, path) values (?, ?, ?)",
            ((ids[i.path], oid, opath) for i in chunk for oid, opath in i.derivation_outputs),
        )
    for referrer, ref, path in later:
        found = id_of(ref)
        if found is None:
            raise ManifestError(f"reference {ref} is not valid", item=path)
        conn.execute("insert or replace into Refs (referrer, reference) values (?, ?)",
                     (referrer, found))


def _open_rw(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"pragma busy_timeout = {busy_timeout_ms()}")
    conn.execute("pragma foreign_keys = 1")
    return conn


def open_live(db_path: Path) -> sqlite3.Connection:
    """A read-write connection to an existing live daemon DB, for `register_batch`."""
    if not db_path.is_file():
        raise DatabaseError("no such daemon DB", item=str(db_path))
    try:
        uri = "file:" + urllib.parse.quote(str(db_path)) + "?mode=rw"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        conn.execute(f"pragma busy_timeout = {busy_timeout_ms()}")
        conn.execute("pragma foreign_keys = 1")
        return conn
    except sqlite3.Error as e:
        raise _error(e, db_path, "opening it") from e


def register_batch(conn: sqlite3.Connection, db_path: Path, flavour: Flavour,
                   infos: Iterable[PathInfo]) -> None:
    """Register `infos` in one BEGIN IMMEDIATE transaction, as Guix's own tools do on a live
    DB; nothing of the batch is registered if any of it fails."""
    if isinstance(infos, Sequence) and not infos:
        return
    try:
        conn.execute("begin immediate")
        try:
            register(conn, flavour, infos)
        except BaseException:
            conn.execute("rollback")
            raise
        conn.execute("commit")
    except sqlite3.Error as e:
        raise _error(e, db_path, "registering") from e


def create(db_path: Path, flavour: Flavour, infos: Sequence[PathInfo] = ()) -> None:
    """Create a fresh daemon DB at `db_path` (atomically), with `infos` registered."""
    tmp = atomicfile.temp_path_for(db_path)
    try:
        conn = _open_rw(tmp)
        try:
            conn.executescript(schema_sql(flavour))
            conn.execute("begin immediate")
            register(conn, flavour, infos)
            conn.execute("commit")
        finally:
            conn.close()
        _fsync_file(tmp)
        os.rename(tmp, db_path)
        atomicfile.fsync_dir(db_path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    write_schema_file(db_path, flavour)


def write_schema_file(db_path: Path, flavour: Flavour) -> None:
    schema = db_path.parent / "schema"
    if not schema.exists():
        atomicfile.write_bytes(schema, str(flavour.schema_version).encode())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def register_in_place(db_path: Path, flavour: Flavour, infos: Iterable[PathInfo]) -> None:
    """Register into a live DB in one BEGIN IMMEDIATE transaction, as Guix's own tools do."""
    conn = open_live(db_path)
    try:
        register_batch(conn, db_path, flavour, infos)
    finally:
        conn.close()


def _copy_with(
    source: Path | None, dest: Path, flavour: Flavour, infos: Iterable[PathInfo]
) -> None:
    """Write `source` (or a fresh DB) plus `infos` to the new file `dest`, durably."""
    conn = _open_rw(dest)
    try:
        if source is not None:
            src = _connect_ro(source)
            try:
                src.backup(conn)  # one step: a single consistent snapshot
            finally:
                src.close()
            # the daemon turns WAL back on at its next open; a rollback journal keeps the copy
            # one self-contained file until then
            conn.execute("pragma journal_mode = delete")
        else:
            conn.executescript(schema_sql(flavour))
        conn.execute("begin immediate")
        register(conn, flavour, infos)
        conn.execute("commit")
    except sqlite3.Error as e:
        raise _error(e, dest, "writing the DB copy") from e
    finally:
        conn.close()
    if source is not None:
        st = source.stat()
        os.chmod(dest, st.st_mode & 0o7777)
        if os.geteuid() == 0:
            os.chown(dest, st.st_uid, st.st_gid)
    _fsync_file(dest)


def write_copy(
    source: Path | None, out: Path, flavour: Flavour, infos: Iterable[PathInfo]
) -> None:
    """Write the DB `source` (or a fresh one) plus `infos` to `out`; `source` is not touched."""
    tmp = atomicfile.temp_path_for(out)
    try:
        _copy_with(source, tmp, flavour, infos)
        os.rename(tmp, out)
        atomicfile.fsync_dir(out.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def swap_in(db_path: Path, flavour: Flavour, infos: Iterable[PathInfo]) -> None:
    """Register `infos` in a copy of `db_path` and rename the copy over it.

    The caller holds the daemon's `big-lock` exclusively, so no daemon session has the DB
    open and nothing written between the copy and the rename can be lost. (The lock is not
    taken here: a second descriptor on `big-lock`, once closed, would drop the caller's fcntl
    lock.) The old DB is checkpointed first so that no `-wal` content can ever be replayed
    into the new file.
    """
    db_path.parent.mkdir(parents=True, exist_ok=True)
    exists = db_path.exists()
    if exists:
        try:
            conn = _open_rw(db_path)
            try:
                conn.execute("pragma wal_checkpoint(truncate)")
            finally:
                conn.close()
        except sqlite3.Error as e:
            raise _error(e, db_path, "checkpointing it") from e
    tmp = atomicfile.temp_path_for(db_path)
    try:
        _copy_with(db_path if exists else None, tmp, flavour, infos)
        faults.point("db.copy-written")
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{db_path}{suffix}")
        os.rename(tmp, db_path)
        atomicfile.fsync_dir(db_path.parent)
        faults.point("db.swapped")
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    write_schema_file(db_path, flavour)
