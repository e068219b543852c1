"""Errors: every failure incstore reports, each class with its own exit code.

One base class, `IncstoreError`; the CLI has a single handler that prints `str(error)` as one
line on stderr and exits with `error.exit_code`. The README's exit-code table is generated from
`EXIT_CODES` and a test keeps the two equal.
"""

from __future__ import annotations


class IncstoreError(Exception):
    """Base class: a message for humans and an exit code for scripts."""

    exit_code = 1
    summary = "internal error"

    def __init__(self, message: str, *, item: str | None = None) -> None:
        super().__init__(message)
        self.item = item

    def __str__(self) -> str:
        message = super().__str__()
        return f"{self.item}: {message}" if self.item else message


class ManifestError(IncstoreError):
    exit_code = 3
    summary = "manifest is invalid (bad JSON, schema, version, store path, or not closed)"


class DatabaseError(IncstoreError):
    exit_code = 4
    summary = "daemon DB is not usable (not a daemon DB, unknown schema, wrong flavour)"


class LockedError(IncstoreError):
    exit_code = 5
    summary = "the daemon DB or store is locked by another process (daemon running)"


class ChunkMissingError(IncstoreError):
    exit_code = 6
    summary = "a chunk named by the manifest is missing from the chunk store"


class ChunkCorruptError(IncstoreError):
    exit_code = 7
    summary = "a chunk is corrupt (checksum, decompression, NAR hash or size mismatch)"


class NarFormatError(IncstoreError):
    exit_code = 8
    summary = "a NAR is malformed or hostile (bad names, order, lengths, trailing data)"


class StoreHashMismatchError(IncstoreError):
    exit_code = 9
    summary = "save: an item on disk no longer matches its hash in the daemon DB"


class PartialFailureError(IncstoreError):
    exit_code = 10
    summary = "several items failed for different reasons (each is listed on stderr)"


class StoreError(IncstoreError):
    exit_code = 11
    summary = "the store or chunk store cannot be read or written (missing item, I/O error)"


class ChunkStoreError(IncstoreError):
    exit_code = 12
    summary = "the chunk store is not an incstore chunk store or holds another store directory"


class RemoteError(IncstoreError):
    exit_code = 13
    summary = "a remote chunk store failed (credentials, missing bucket, unreachable, timeout)"


class SignatureError(IncstoreError):
    exit_code = 14
    summary = "an item or manifest is not trusted (no valid signature by a trusted key)"


class KeyFileError(IncstoreError):
    exit_code = 15
    summary = "a key file is unreadable, malformed, or not private enough"


class MissingDependencyError(IncstoreError):
    exit_code = 16
    summary = "a command needs an optional dependency that is not installed"


class InputError(IncstoreError):
    exit_code = 17
    summary = "an action input is invalid (the action step fails before any work)"


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "internal error (a bug: please report it)",
    2: "usage error (bad command line)",
    **{
        cls.exit_code: cls.summary
        for cls in (
            ManifestError,
            DatabaseError,
            LockedError,
            ChunkMissingError,
            ChunkCorruptError,
            NarFormatError,
            StoreHashMismatchError,
            PartialFailureError,
            StoreError,
            ChunkStoreError,
            RemoteError,
            SignatureError,
            KeyFileError,
            MissingDependencyError,
            InputError,
        )
    },
}


def combine(failures: list[IncstoreError], what: str) -> IncstoreError:
    """One error for several per-item failures: their own class when they agree, else partial."""
    kinds = {type(f) for f in failures}
    every = sorted({f.item or "?" for f in failures})
    # one line, however many failed: each failure was reported on its own already
    names = ", ".join(every[:5]) + (f" and {len(every) - 5} more" if len(every) > 5 else "")
    if len(kinds) == 1:
        cls = kinds.pop()
        return cls(f"{len(failures)} item(s) failed to {what}: {names}")
    return PartialFailureError(f"{len(failures)} item(s) failed to {what}: {names}")
