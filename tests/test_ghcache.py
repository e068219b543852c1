"""The real @actions/cache client (5.0.5, as actions/cache v5.0.5 bundles it) against the cache
service stand-in (tests/ghcache): what a save and a restore do over the real protocol, with the
service's rules (lookup order, scopes, immutability, visibility once finalized, rate limit,
eviction) and its faults (429, 500s past the client's retries, ok: false answers, a reservation
held forever, a slow finalize, a client killed mid-upload), asserting what the client logs and
returns in each. The client runs on this host as one job would (no runner machine, no root).

Needs node and the client installed by .ci/run (INCSTORE_ACTIONS_CACHE_DIR); skips without them
outside CI, fails under CI=true. test_500s_outlasting_the_retries takes ~30 s: the client's
backoff (3 s, then x1.5 with jitter, 5 attempts) has no option or variable to shorten it.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .ghcache import CacheServer, ClientMissing, DriverResult, HostClient, require_client
from .ghcache.service import (
    CREATE,
    FINALIZE,
    GET_BLOB,
    GET_PROPERTIES,
    LOOKUP,
    PUT_BLOB,
    PUT_BLOCK,
    PUT_BLOCK_LIST,
)
from .ghrunner import CacheService, cache_version

MAIN = "refs/heads/main"
PATHS = ["deps"]
RESERVE_FAILED = ("Failed to save: Unable to reserve cache with key {}, another job may be "
                  "creating this cache.")
CONFLICT = ("Failed to reserve cache: Error: Failed to CreateCacheEntry: Received non-retryable "
            "error: Failed request: (409) Conflict: cache entry with the same key, version, and "
            "scope already exists")


@pytest.fixture(autouse=True)
def _client() -> None:
    try:
        require_client()  # skips outside CI
    except ClientMissing as e:
        pytest.fail(f"{e}: .ci/run must install it", pytrace=False)


@pytest.fixture
def service(tmp_path: Path) -> CacheService:
    return CacheService(tmp_path / "service")


@pytest.fixture
def server(service: CacheService) -> Iterator[CacheServer]:
    with CacheServer(service) as running:
        yield running


def scopes(ref: str, base: str | None = None, default: str = "main") -> list[str]:
    """What a job reads, in order: its ref, a pull request's base branch, the default branch."""
    found = [ref, *([f"refs/heads/{base}"] if base else []), f"refs/heads/{default}"]
    return list(dict.fromkeys(found))


class Jobs:
    """Makes one HostClient per job, each in its own directory with its own token."""

    def __init__(self, server: CacheServer, root: Path) -> None:
        self.server = server
        self.root = root
        self.count = 0

    def __call__(self, ref: str = MAIN, base: str | None = None) -> HostClient:
        self.count += 1
        return HostClient(self.server, self.root / f"job{self.count}",
                          read_scopes=scopes(ref, base), write_scope=ref, name=f"job{self.count}")


@pytest.fixture
def jobs(server: CacheServer, tmp_path: Path) -> Jobs:
    return Jobs(server, tmp_path / "jobs")


def fill(job: HostClient, files: dict[str, str | bytes], rel: str = "deps") -> Path:
    root = job.workspace / rel
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
    return root


def tree(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = path.read_bytes()
    return out


def unescape(data: str) -> str:
    """@actions/core's escaping of workflow command data, undone."""
    return data.replace("%0D", "\r").replace("%0A", "\n").replace("%25", "%")


def warnings(run: DriverResult) -> list[str]:
    return [unescape(w) for w in run.warnings]


def debug(run: DriverResult) -> list[str]:
    return [unescape(d) for d in run.debug]


def saved(job: HostClient, key: str, content: str | bytes = "x") -> int:
    """Fill deps/ with one file and save it; the entry's id."""
    fill(job, {"file": content})
    run = job.save(PATHS, key)
    assert run.error is None and run.cache_id is not None and run.cache_id > 0, run.output
    return run.cache_id


def hit(job: HostClient, key: str, *restore_keys: str) -> str | None:
    """The key a lookup-only restore matches (nothing downloaded)."""
    run = job.restore(PATHS, key, restore_keys, lookup_only=True)
    assert run.error is None, run.output
    return run.matched_key


def methods(server: CacheServer, since: int = 0) -> list[tuple[str, int]]:
    return [(c.method, c.status) for c in server.calls[since:]]


# --- the protocol ------------------------------------------------------------------------------

def test_save_then_restore_round_trip_of_a_directory(jobs: Jobs, server: CacheServer,
                                                     service: CacheService) -> None:
    writer = jobs()
    source = fill(writer, {"a.txt": "alpha\n", "sub/b.bin": os.urandom(64 * 1024),
                           "sub/deeper/c": ""})
    (source / "empty").mkdir()
    (source / "link").symlink_to("a.txt")
    run = writer.save(PATHS, "deps-1")
    assert run.error is None, run.output
    [entry] = service.entries
    assert run.cache_id == entry.id
    assert (entry.key, entry.scope, entry.version) == ("deps-1", MAIN, cache_version(PATHS))
    assert f"Sent {entry.size} of {entry.size} (100.0%)" in run.output
    assert methods(server) == [(CREATE, 200), (PUT_BLOB, 201), (FINALIZE, 200)]
    # the signed URL's signature is masked, raw and URL-encoded
    assert sum(line.startswith("::add-mask::") for line in run.lines) == 2

    reader = jobs()
    before = len(server.calls)
    restored = reader.restore(PATHS, "deps-1")
    assert restored.matched_key == "deps-1", restored.output
    assert restored.has("Cache hit for: deps-1") and restored.has("Cache restored successfully")
    assert restored.has(f"Cache Size: ~0 MB ({entry.size} B)")
    assert tree(reader.workspace / "deps") == tree(source)
    # the Azure SDK's download: properties for the length, then ranged reads
    assert methods(server, before) == [(LOOKUP, 200), (GET_PROPERTIES, 200), (GET_BLOB, 206)]
    assert not list(reader.temp.rglob("cache.tzst"))  # the archive is deleted


def test_large_archives_go_up_in_blocks(jobs: Jobs, server: CacheServer,
                                        service: CacheService) -> None:
    """Past 128 MiB the SDK stages 64 MiB blocks (8 at once) and commits a block list."""
    writer = jobs()
    source = fill(writer, {"big": os.urandom(129 * 1024 * 1024)})
    run = writer.save(PATHS, "big-1")
    assert run.error is None and run.cache_id, run.output
    calls = methods(server)
    assert calls.count((PUT_BLOCK, 201)) == 3 and calls[-2:] == [(PUT_BLOCK_LIST, 201),
                                                                 (FINALIZE, 200)]
    assert (PUT_BLOB, 201) not in calls
    reader = jobs()
    restored = reader.restore(PATHS, "big-1")
    assert restored.matched_key == "big-1", restored.output
    assert (reader.workspace / "deps/big").read_bytes() == (source / "big").read_bytes()
    # 4 MiB ranges, several at a time
    assert sum(m == (GET_BLOB, 206) for m in methods(server)) == -(-service.entries[0].size
                                                                    // (4 * 1024 * 1024))


def test_restore_keys_newest_first_and_prefix_match(jobs: Jobs, service: CacheService) -> None:
    job = jobs()
    for key, content in (("os-a-1", "one"), ("os-a-2", "two"), ("os-b-1", "three")):
        saved(job, key, content)
        service.clock.advance(minutes=1)
    reader = jobs()
    run = reader.restore(PATHS, "os-a-9", ["os-x-", "os-a-"])
    assert run.matched_key == "os-a-2" and run.has("Cache hit for restore-key: os-a-2")
    assert (reader.workspace / "deps/file").read_text() == "two"
    assert hit(reader, "os-") == "os-b-1"  # the newest entry the primary key prefixes
    assert hit(reader, "os-a") == "os-a-2"
    assert hit(reader, "os-a-1", "os-") == "os-a-1"  # the exact primary key first
    assert hit(reader, "zzz", "os-a-1", "os-") == "os-a-1"  # an exact restore key before...
    assert hit(reader, "zzz", "nope", "os-") == "os-b-1"  # ...the newest prefix of the next
    # keys match whatever their case, and the stored spelling comes back (which the client
    # then logs as a restore-key hit: it compares case-sensitively)
    upper = reader.restore(PATHS, "OS-A-1", lookup_only=True)
    assert upper.matched_key == "os-a-1" and upper.has("Cache hit for restore-key: os-a-1")
    assert upper.has("Lookup only - skipping download")
    # another path set is another version: nothing matches
    other = reader.restore(["other"], "os-a-1", ["os-"])
    assert other.matched_key is None
    assert (f"Cache not found for version {cache_version(['other'])} of keys: os-a-1, os-"
            in debug(other))


def test_scopes_pull_requests_read_their_base_and_write_their_own(
        jobs: Jobs, service: CacheService) -> None:
    saved(jobs(), "k-main", "main")
    service.clock.advance(seconds=5)
    saved(jobs("refs/heads/feature"), "k-feature", "feature")
    service.clock.advance(seconds=5)
    saved(jobs("refs/heads/release"), "k-release", "release")
    service.clock.advance(seconds=5)
    pr = jobs("refs/pull/7/merge", base="release")
    assert hit(pr, "k-none", "k-") == "k-release"  # its base branch before the default
    assert hit(pr, "k-main") == "k-main"
    assert hit(pr, "k-feature") is None
    saved(pr, "k-pr", "pr")
    assert [e.scope for e in service.find("k-pr")] == ["refs/pull/7/merge"]
    assert hit(pr, "k-none", "k-") == "k-pr"  # its own scope first
    assert hit(jobs("refs/pull/8/merge", base="release"), "k-pr") is None
    main = jobs()
    assert hit(main, "k-none", "k-") == "k-main"  # not the newer entries of other scopes
    assert hit(main, "k-pr") is None
    other = jobs("refs/heads/other")
    assert hit(other, "k-feature") is None  # a branch does not read another branch
    assert hit(other, "k-none", "k-") == "k-main"  # but falls back to the default branch
    # the same key in its own scope is a new entry, not a conflict
    saved(jobs("refs/heads/feature"), "k-main", "feature's own")
    assert sorted(e.scope for e in service.find("k-main")) == ["refs/heads/feature", MAIN]


# --- immutability and reservations -------------------------------------------------------------

def test_an_existing_key_is_immutable(jobs: Jobs, server: CacheServer,
                                      service: CacheService) -> None:
    job = jobs()
    saved(job, "fixed", "first")
    fill(job, {"file": "second"})
    before = len(server.calls)
    again = job.save(PATHS, "fixed")
    assert again.cache_id == -1 and again.error is None
    assert again.has(RESERVE_FAILED.format("fixed"))  # an info line...
    assert warnings(again) == []  # ...no annotation
    assert CONFLICT in debug(again)
    assert methods(server, before) == [(CREATE, 409)]  # not retried, nothing uploaded
    reader = jobs()
    assert reader.restore(PATHS, "fixed").matched_key == "fixed"
    assert (reader.workspace / "deps/file").read_text() == "first"
    # another version of the key (other paths) is another entry
    fill(job, {"file": "other"}, rel="other")
    assert job.save(["other"], "fixed").cache_id not in (None, -1)
    assert len(service.find("fixed")) == 2


def test_a_held_reservation_blocks_its_key_and_stays_invisible(
        jobs: Jobs, server: CacheServer, service: CacheService) -> None:
    """A job cancelled mid-upload: CreateCacheEntry succeeded, nothing was ever finalized."""
    held = server.hold("held", cache_version(PATHS), MAIN)
    job = jobs()
    fill(job, {"file": "x"})
    refused = job.save(PATHS, "held")
    assert refused.cache_id == -1 and refused.has(RESERVE_FAILED.format("held"))
    assert CONFLICT in debug(refused)
    assert hit(job, "held") is None and hit(job, "zzz", "hel") is None
    assert service.entries == [] and [r.key for r in service.pending] == ["held"]
    saved(job, "held-not", "y")  # other keys are not affected, nor other scopes
    saved(jobs("refs/heads/feature"), "held", "feature")
    service.release(held)  # the emulator's way out; a workflow has none
    saved(job, "held", "z")
    assert hit(job, "held") == "held"


def test_an_entry_is_invisible_until_finalized(jobs: Jobs, server: CacheServer) -> None:
    gate = server.pause(FINALIZE, key="slow")
    writer, reader, rival = jobs(), jobs(), jobs()
    fill(writer, {"file": "slow"})
    fill(rival, {"file": "rival"})
    upload = writer.spawn(["save", "--path", "deps", "--key", "slow"])
    try:
        assert gate.wait_reached(60), "the save never reached FinalizeCacheEntryUpload"
        # uploaded, not finalized: lookups miss, and the key is taken
        assert hit(reader, "slow") is None and hit(reader, "zzz", "sl") is None
        assert rival.save(PATHS, "slow").has(RESERVE_FAILED.format("slow"))
    finally:
        gate.release()
    done = HostClient.wait(upload)
    assert done.cache_id not in (None, -1), done.output
    restored = reader.restore(PATHS, "slow")
    assert restored.matched_key == "slow"
    assert (reader.workspace / "deps/file").read_text() == "slow"


def test_a_save_killed_mid_upload_holds_its_key(jobs: Jobs, server: CacheServer,
                                                service: CacheService) -> None:
    # more than loopback's socket buffers hold, so that the kill leaves the body unfinished
    gate = server.pause(PUT_BLOB, key="killed", after_bytes=4096)
    writer = jobs()
    fill(writer, {"file": os.urandom(32 * 1024 * 1024)})
    upload = writer.spawn(["save", "--path", "deps", "--key", "killed"])
    try:
        assert gate.wait_reached(60), "the upload never started"
        os.killpg(upload.pid, signal.SIGKILL)
        upload.wait(30)
    finally:
        gate.release()
    deadline = time.monotonic() + 10
    while not server.attempts(PUT_BLOB, "killed"):  # the handler reads what was sent, then EOF
        assert time.monotonic() < deadline, "the server never finished with the upload"
        time.sleep(0.01)
    assert [(c.method, c.status) for c in server.calls] == [(CREATE, 200), (PUT_BLOB, 0)]
    assert service.entries == [] and [r.key for r in service.pending] == ["killed"]
    assert not list((service.storage / "uploads").iterdir())  # the partial blob is dropped
    # actions/cache#1612: the key stays reserved, and nothing can be restored from it
    retry = jobs()
    fill(retry, {"file": "again"})
    assert retry.save(PATHS, "killed").has(RESERVE_FAILED.format("killed"))
    assert hit(retry, "killed") is None


# --- the service's faults ----------------------------------------------------------------------

def test_429_on_create_cache_entry_is_not_retried(jobs: Jobs, server: CacheServer,
                                                  service: CacheService) -> None:
    job = jobs()
    fill(job, {"file": "x"})
    server.fail(CREATE, 429, retry_after=60)
    limited = job.save(PATHS, "k1")
    assert limited.cache_id == -1
    assert warnings(limited) == ["You've hit a rate limit, your rate limit will reset in 60 "
                                 "seconds"]
    assert limited.has(RESERVE_FAILED.format("k1"))
    assert ("Failed to reserve cache: Error: Failed to CreateCacheEntry: Rate limited: Failed "
            "request: (429) Too Many Requests: Too Many Requests") in debug(limited)
    assert methods(server) == [(CREATE, 429)]  # one attempt: the client gives up on a 429
    assert job.save(PATHS, "k1").cache_id not in (None, -1)  # that fault was for one call

    # for keys matching a pattern, every time; without Retry-After the client says nothing
    server.fail(CREATE, 429, times=None, key="big-*")
    refused = job.save(PATHS, "big-1")
    assert refused.cache_id == -1 and warnings(refused) == []
    assert job.save(PATHS, "small-1").cache_id not in (None, -1)

    # the service's own limit: new entries per minute on the emulated clock
    service.rate_limit = 3
    service.clock.advance(minutes=2)
    for key in ("r1", "r2", "r3"):
        assert job.save(PATHS, key).cache_id not in (None, -1)
    over = job.save(PATHS, "r4")
    assert over.cache_id == -1
    assert warnings(over) == ["You've hit a rate limit, your rate limit will reset in 60 seconds"]
    service.clock.advance(seconds=61)
    assert job.save(PATHS, "r4").cache_id not in (None, -1)


def test_429_on_a_lookup_is_a_warning_and_a_miss(jobs: Jobs, server: CacheServer) -> None:
    job = jobs()
    saved(job, "k1")
    server.fail(LOOKUP, 429, retry_after=30)
    run = job.restore(PATHS, "k1")
    assert run.matched_key is None and run.error is None
    assert warnings(run) == [
        "You've hit a rate limit, your rate limit will reset in 30 seconds",
        "Failed to restore: Failed to GetCacheEntryDownloadURL: Rate limited: Failed request: "
        "(429) Too Many Requests: Too Many Requests"]
    assert len(server.attempts(LOOKUP)) == 1


def test_a_500_is_retried_after_3_seconds(jobs: Jobs, server: CacheServer) -> None:
    job = jobs()
    fill(job, {"file": "x"})
    server.fail(CREATE, 500, message="boom")
    run = job.save(PATHS, "k1")
    assert run.cache_id not in (None, -1), run.output
    assert run.has("Attempt 1 of 5 failed with error: Failed request: (500) Internal Server "
                   "Error: boom. Retrying request in 3000 ms...")
    first, second = server.attempts(CREATE)
    assert (first.status, second.status) == (500, 200)
    assert 2.95 <= second.at - first.at < 4.0


def test_500s_outlasting_the_retries(jobs: Jobs, server: CacheServer,
                                     service: CacheService) -> None:
    """Five attempts 3 s, then 1.5x (with jitter up to another 1.5x) apart: ~24-35 s."""
    job = jobs()
    fill(job, {"file": "x"})
    server.fail(CREATE, 500, times=None, message="down")
    run = job.save(PATHS, "k1")
    assert run.cache_id == -1 and run.error is None
    assert run.has(RESERVE_FAILED.format("k1")) and warnings(run) == []
    assert ("Failed to reserve cache: Error: Failed to CreateCacheEntry: Failed to make request "
            "after 5 attempts: Failed request: (500) Internal Server Error: down") in debug(run)
    announced = [int(m.group(2)) / 1000 for line in run.lines
                 if (m := re.fullmatch(r"Attempt (\d) of 5 failed with error: Failed request: "
                                       r"\(500\) Internal Server Error: down\. Retrying request "
                                       r"in (\d+) ms\.\.\.", line))]
    attempts = server.attempts(CREATE)
    assert len(attempts) == 5 and len(announced) == 4
    assert announced[0] == 3.0
    for n, delay in enumerate(announced[1:], start=1):
        assert 3.0 * 1.5 ** n <= delay < 3.0 * 1.5 ** (n + 1)
    gaps = [b.at - a.at for a, b in itertools.pairwise(attempts)]
    for gap, delay in zip(gaps, announced, strict=True):
        assert delay - 0.05 <= gap < delay + 1.0
    assert service.pending == [] and service.entries == []


def test_ok_false_answers(jobs: Jobs, server: CacheServer, service: CacheService) -> None:
    job = jobs()
    fill(job, {"file": "x"})
    server.not_ok(CREATE, "Cache storage quota exceeded for repository")
    create = job.save(PATHS, "k1")
    assert create.cache_id == -1
    assert warnings(create) == ["Cache reservation failed: Cache storage quota exceeded for "
                                "repository"]
    assert create.has(RESERVE_FAILED.format("k1"))

    # a finalize refused with a message: that message is the warning (FinalizeCacheError)
    server.not_ok(FINALIZE, "the upload could not be verified")
    finalize = job.save(PATHS, "k2")
    assert finalize.cache_id == -1
    assert warnings(finalize) == ["the upload could not be verified"]
    # without one, the client's own words
    server.not_ok(FINALIZE)
    bare = job.save(PATHS, "k3")
    assert bare.cache_id == -1
    assert warnings(bare) == ["Failed to save: Unable to finalize cache with key k3, another job "
                              "may be finalizing this cache."]
    # the uploads were never finalized: invisible, their keys still taken
    assert service.entries == [] and [r.key for r in service.pending] == ["k2", "k3"]
    assert hit(job, "k2") is None
    # a lookup answered ok: false is a plain miss, no warning
    saved(job, "k4")
    server.not_ok(LOOKUP)
    miss = job.restore(PATHS, "k4")
    assert miss.matched_key is None and warnings(miss) == []


# --- eviction ----------------------------------------------------------------------------------

def test_entries_idle_for_7_days_are_evicted(jobs: Jobs, service: CacheService) -> None:
    job = jobs()
    saved(job, "idle")
    saved(job, "used")
    service.clock.advance(days=6)
    assert hit(job, "used") == "used"  # an access (a lookup) restarts its 7 days
    service.clock.advance(days=1, hours=1)
    assert hit(job, "idle") is None
    assert hit(job, "used") == "used"
    assert service.keys() == ["used"]


def test_over_the_size_limit_the_least_recently_accessed_go(jobs: Jobs,
                                                            service: CacheService) -> None:
    job = jobs()
    saved(job, "s1", os.urandom(8192))
    size = service.entries[0].size
    service.size_limit = size * 5 // 2  # room for two
    service.clock.advance(minutes=1)
    saved(job, "s2", os.urandom(8192))
    service.clock.advance(minutes=1)
    assert hit(job, "s1") == "s1"  # s1 is now the more recently accessed
    service.clock.advance(minutes=1)
    saved(job, "s3", os.urandom(8192))
    assert service.keys() == ["s1", "s3"]
    assert service.total_size <= service.size_limit
    assert hit(job, "s2") is None
