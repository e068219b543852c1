"""A local stand-in for GitHub's Actions cache service v2, for the real ``@actions/cache`` client.

The stand-in (:class:`CacheServer`) serves, on loopback, the twirp API the client calls and the
Azure blob storage behind its signed URLs, over the rules of
:class:`tests.ghrunner.cache.CacheService` (scopes, key and version matching, immutability,
visibility only once finalized, rate limit, eviction, the emulated clock), and injects the real
service's faults when a test asks. The client is npm's ``@actions/cache`` 5.0.5, the version
actions/cache v5.0.5 bundles, run through ``driver.js`` as the action calls it; the runner
emulator's ``actions/cache`` steps run it inside the job's machine, and :class:`HostClient` runs
it on this host.

Usage::

    from tests.ghcache import CacheServer, HostClient
    from tests.ghrunner import CacheService

    with CacheServer(CacheService(tmp_path / "svc")) as server:
        main = HostClient(server, tmp_path / "main", read_scopes=["refs/heads/main"],
                          write_scope="refs/heads/main")
        (main.workspace / "deps").mkdir()
        assert main.save(["deps"], "deps-1").cache_id > 0
        server.fail("CreateCacheEntry", 429, retry_after=60)       # the next one is refused
        assert main.save(["deps"], "deps-2").cache_id == -1
        assert len(server.attempts("CreateCacheEntry", "deps-2")) == 1
"""

from .client import (
    ACTIONS_CACHE_VERSION,
    ENV_VAR,
    ClientMissing,
    DriverResult,
    HostClient,
    driver_args,
    install_into,
    missing_reason,
    require_client,
)
from .service import CacheServer, Call, Fault, Gate, Job

__all__ = [
    "ACTIONS_CACHE_VERSION",
    "ENV_VAR",
    "CacheServer",
    "Call",
    "ClientMissing",
    "DriverResult",
    "Fault",
    "Gate",
    "HostClient",
    "Job",
    "driver_args",
    "install_into",
    "missing_reason",
    "require_client",
]
