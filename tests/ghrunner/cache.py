"""GitHub's Actions cache service for one repository, with its real rules, on an emulated clock.

- An entry is (key, version, scope) plus size, creation and last-access times. The version is
  the toolkit's ``getCacheVersion``: sha256 of the input paths, the compression method and (on
  Windows only) ``windows-only``, joined by ``|`` with the salt ``1.0``.
- Lookup (``GetCacheEntryDownloadURL``): in each readable scope in turn (the run's ref, then for a
  pull request its base branch, then the default branch), the exact primary key, then the newest
  entry whose key starts with the primary key, then each restore key (exact, then newest prefix
  match); only entries of the same version match. Keys compare case-insensitively (as the
  service does; the stored spelling is returned). "Newest" is creation time, ties broken by
  creation order.
- Entries are immutable: reserving (``CreateCacheEntry``) a key, version and scope that already
  exists, or that another job is uploading, fails with 409 and the upload does not happen.
- A reservation holds its key until ``FinalizeCacheEntryUpload`` turns its uploaded blob into an
  entry; only then do lookups see it. A reservation whose job died mid-upload is never finalized
  and keeps blocking that key (actions/cache#1612), invisible to lookups; :meth:`release` is the
  emulator's way out, the real service offers none to a workflow.
- About 200 new entries per minute per repository (429 with Retry-After past that); 10 GB per
  repository, least recently accessed entries evicted beyond it; entries not accessed for 7 days
  are evicted. All of these limits are parameters.

Archives are stored as files under the service's directory (uploads staged under ``uploads/``);
the test holds the service across jobs and runs, and inspects :attr:`CacheService.entries`,
:attr:`CacheService.pending` and :attr:`CacheService.total_size`. ``tests/ghcache`` serves this
model over the real protocol to the real ``@actions/cache`` client.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

VERSION_SALT = "1.0"
COMPRESSION_ZSTD = "zstd-without-long"  # what the toolkit picks whenever zstd is installed
COMPRESSION_GZIP = "gzip"
GB = 1024 ** 3


def cache_version(paths: Sequence[str], compression: str | None = COMPRESSION_ZSTD,
                  cross_os: bool = False, windows: bool = False) -> str:
    """@actions/cache's getCacheVersion (the paths as written in the inputs, not resolved)."""
    components = list(paths)
    if compression:
        components.append(compression)
    if windows and not cross_os:
        components.append("windows-only")
    components.append(VERSION_SALT)
    return hashlib.sha256("|".join(components).encode()).hexdigest()


class Clock:
    """The emulated wall clock shared by the cache service and the runs (thread-safe)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2025, 1, 6, 12, 0, 0, tzinfo=timezone.utc)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta | None = None, **kwargs: float) -> datetime:
        """Move forward by delta (or timedelta(**kwargs)), e.g. ``clock.advance(days=8)``."""
        step = delta if delta is not None else timedelta(**kwargs)
        if step < timedelta(0):
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._now += step
            return self._now

    def set(self, when: datetime) -> None:
        with self._lock:
            self._now = when


@dataclass
class CacheEntry:
    id: int
    key: str
    version: str
    scope: str
    size: int
    created_at: datetime
    last_accessed_at: datetime
    blob: Path
    seq: int = 0

    @property
    def ref(self) -> str:
        return self.scope


class CacheServiceError(Exception):
    status = 500


class CacheConflict(CacheServiceError):
    status = 409

    def __init__(self, message: str = "cache entry with the same key, version, and scope "
                                      "already exists") -> None:
        super().__init__(message)


class CacheNotFinalized(CacheServiceError):
    """FinalizeCacheEntryUpload without a reservation, or without its upload."""

    status = 404


class CacheRateLimited(CacheServiceError):
    status = 429

    def __init__(self, retry_after: int) -> None:
        super().__init__("Too Many Requests: cache entry creation rate limit exceeded")
        self.retry_after = retry_after


@dataclass
class Reservation:
    """A CreateCacheEntry that succeeded: the key is taken until finalized (or released)."""

    key: str
    version: str
    scope: str
    created_at: datetime
    id: int = 0
    blob: Path | None = None  # where the upload lands; finalize makes it the entry's blob


@dataclass
class CacheService:
    """The cache of one repository. Thread-safe: concurrent jobs share one instance."""

    storage: Path
    clock: Clock = field(default_factory=Clock)
    size_limit: int = 10 * GB
    retention: timedelta = timedelta(days=7)
    rate_limit: int = 200
    rate_window: timedelta = timedelta(minutes=1)
    _entries: list[CacheEntry] = field(default_factory=list, init=False, repr=False)
    _pending: dict[tuple[str, str, str], Reservation] = field(default_factory=dict, init=False,
                                                              repr=False)
    _creations: list[datetime] = field(default_factory=list, init=False, repr=False)
    _next_id: int = field(default=1, init=False, repr=False)
    _next_reservation: int = field(default=1, init=False, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)
    log: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.storage = Path(self.storage)
        self.storage.mkdir(parents=True, exist_ok=True)
        (self.storage / "uploads").mkdir(exist_ok=True)

    # -- inspection ------------------------------------------------------------------------

    @property
    def entries(self) -> list[CacheEntry]:
        """The committed entries, oldest first (after applying the retention eviction)."""
        with self._lock:
            self._evict_expired()
            return sorted(self._entries, key=lambda e: (e.created_at, e.seq))

    def keys(self, scope: str | None = None) -> list[str]:
        return [e.key for e in self.entries if scope is None or e.scope == scope]

    def find(self, key: str, scope: str | None = None) -> list[CacheEntry]:
        return [e for e in self.entries if e.key == key and (scope is None or e.scope == scope)]

    @property
    def pending(self) -> list[Reservation]:
        """Reservations not finalized yet (uploads in flight, or held by a job that died)."""
        with self._lock:
            return sorted(self._pending.values(), key=lambda r: r.id)

    def entry(self, entry_id: int) -> CacheEntry | None:
        with self._lock:
            self._evict_expired()
            return next((e for e in self._entries if e.id == entry_id), None)

    def reservation(self, reservation_id: int) -> Reservation | None:
        with self._lock:
            return next((r for r in self._pending.values() if r.id == reservation_id), None)

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.entries)

    def delete(self, key: str, scope: str | None = None) -> int:
        """Delete entries by key (``gh cache delete``); returns how many."""
        with self._lock:
            doomed = [e for e in self._entries if e.key == key and scope in (None, e.scope)]
            for e in doomed:
                self._remove(e, "deleted")
            return len(doomed)

    # -- the service API ---------------------------------------------------------------------

    def lookup(self, key: str, restore_keys: Sequence[str], version: str,
               scopes: Iterable[str]) -> CacheEntry | None:
        """GetCacheEntryDownloadURL: the matching entry, whose last access becomes now."""
        with self._lock:
            self._evict_expired()
            for scope in dict.fromkeys(scopes):
                candidates = [e for e in self._entries if e.scope == scope and e.version == version]
                found = self._match(candidates, key, restore_keys)
                if found is not None:
                    found.last_accessed_at = self.clock.now()
                    self.log.append(f"hit {found.key} ({scope}) for {key}")
                    return found
            self.log.append(f"miss {key}")
            return None

    @staticmethod
    def _match(candidates: list[CacheEntry], key: str, restore_keys: Sequence[str]
               ) -> CacheEntry | None:
        def newest(prefix: str) -> CacheEntry | None:
            found = [e for e in candidates if e.key.casefold().startswith(prefix.casefold())]
            return max(found, key=lambda e: (e.created_at, e.seq)) if found else None

        def exact(wanted: str) -> CacheEntry | None:
            return next((e for e in candidates if e.key.casefold() == wanted.casefold()), None)

        hit = exact(key) or newest(key)
        if hit is not None:
            return hit
        for restore_key in restore_keys:
            hit = exact(restore_key)
            if hit is not None:
                return hit
            hit = newest(restore_key)
            if hit is not None:
                return hit
        return None

    def reserve(self, key: str, version: str, scope: str) -> Reservation:
        """CreateCacheEntry: 409 if the entry exists or is being uploaded, 429 past the rate."""
        with self._lock:
            self._evict_expired()
            now = self.clock.now()
            self._creations = [t for t in self._creations if now - t < self.rate_window]
            if len(self._creations) >= self.rate_limit:
                oldest = min(self._creations)
                retry = max(1, int((oldest + self.rate_window - now).total_seconds() + 0.999))
                self.log.append(f"rate-limited {key}")
                raise CacheRateLimited(retry)
            ident = (key.casefold(), version, scope)
            exists = any((e.key.casefold(), e.version, e.scope) == ident for e in self._entries)
            if exists or ident in self._pending:
                self.log.append(f"conflict {key} ({scope})")
                raise CacheConflict()
            reservation = Reservation(key, version, scope, now, self._next_reservation)
            reservation.blob = self.storage / "uploads" / f"{reservation.id}.blob"
            self._next_reservation += 1
            self._pending[ident] = reservation
            self._creations.append(now)
            return reservation

    def finalize(self, key: str, version: str, scope: str, size: int | None = None
                 ) -> CacheEntry:
        """FinalizeCacheEntryUpload: the reservation's uploaded blob becomes a visible entry.
        Without a reservation, or before its upload landed (or of another size than the client
        says), nothing changes and :class:`CacheNotFinalized` is raised."""
        with self._lock:
            ident = (key.casefold(), version, scope)
            reservation = self._pending.get(ident)
            if reservation is None:
                raise CacheNotFinalized(f"no cache entry reserved for key {key} in {scope}")
            assert reservation.blob is not None
            if not reservation.blob.is_file():
                raise CacheNotFinalized(f"nothing was uploaded for key {key}")
            actual = reservation.blob.stat().st_size
            if size is not None and size != actual:
                raise CacheNotFinalized(f"uploaded {actual} bytes for key {key}, not {size}")
            entry_id = self._next_id
            self._next_id += 1
            blob = self.storage / f"{entry_id}.blob"
            reservation.blob.replace(blob)
            del self._pending[ident]
            now = self.clock.now()
            entry = CacheEntry(entry_id, reservation.key, reservation.version, reservation.scope,
                               actual, now, now, blob, seq=entry_id)
            self._entries.append(entry)
            self.log.append(f"saved {entry.key} ({entry.scope}, {entry.size} B)")
            self._evict_over_limit()
            return entry

    def commit(self, reservation: Reservation, archive: Path) -> CacheEntry:
        """Upload the archive and FinalizeCacheEntryUpload, in one call."""
        with self._lock:
            ident = (reservation.key.casefold(), reservation.version, reservation.scope)
            if self._pending.get(ident) is not reservation:
                raise CacheServiceError("no such reservation")
        assert reservation.blob is not None
        shutil.copyfile(archive, reservation.blob)
        return self.finalize(reservation.key, reservation.version, reservation.scope)

    def release(self, reservation: Reservation) -> None:
        """Drop a reservation that was never finalized, and its partial upload."""
        with self._lock:
            ident = (reservation.key.casefold(), reservation.version, reservation.scope)
            if self._pending.get(ident) is reservation:
                del self._pending[ident]
                if reservation.blob is not None:
                    reservation.blob.unlink(missing_ok=True)

    # -- eviction ------------------------------------------------------------------------

    def _remove(self, entry: CacheEntry, why: str) -> None:
        self._entries.remove(entry)
        entry.blob.unlink(missing_ok=True)
        self.log.append(f"{why} {entry.key} ({entry.scope})")

    def _evict_expired(self) -> None:
        now = self.clock.now()
        for e in [e for e in self._entries if now - e.last_accessed_at > self.retention]:
            self._remove(e, "expired")

    def _evict_over_limit(self) -> None:
        by_access = sorted(self._entries, key=lambda e: (e.last_accessed_at, e.created_at, e.seq))
        total = sum(e.size for e in self._entries)
        for e in by_access:
            if total <= self.size_limit:
                break
            total -= e.size
            self._remove(e, "evicted")
