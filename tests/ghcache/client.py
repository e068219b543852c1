"""The real ``@actions/cache`` client: where it is installed, and a way to run it.

The client is npm's ``@actions/cache`` at the version actions/cache v5.0.5 bundles (5.0.5, with
the rest of that release's package-lock.json), installed by ``.ci/run`` under
``${XDG_CACHE_HOME:-$HOME/.cache}/incstore-ci/actions-cache``; ``INCSTORE_ACTIONS_CACHE_DIR``
names its ``node_modules``. ``driver.js`` beside this file calls it as the action does, and
``preload.js`` points the blob host names of :mod:`.service`'s signed URLs at loopback.

- :func:`require_client`: the ``node_modules`` directory, or a skip with the reason (outside
  CI), or :class:`ClientMissing` (under ``CI=true``, where a missing install is a failure).
- :func:`install_into`: the driver and the package under a job machine's directory, as the
  runner downloads an action into ``_actions`` (hard links where the file system allows).
- :class:`HostClient`: one job's client run on this host (its own workspace, temp directory and
  runtime token), for tests of the client against the service without a runner machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .service import CacheServer

ACTIONS_CACHE_VERSION = "5.0.5"
ENV_VAR = "INCSTORE_ACTIONS_CACHE_DIR"
HERE = Path(__file__).resolve().parent
DRIVER = HERE / "driver.js"
PRELOAD = HERE / "preload.js"


class ClientMissing(Exception):
    """The @actions/cache client is not installed (or not at the pinned version)."""


def default_modules() -> Path:
    """Where ``.ci/run`` installs the client's node_modules."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "incstore-ci" / "actions-cache" / "node_modules"


def modules_dir() -> Path:
    configured = os.environ.get(ENV_VAR)
    return Path(configured) if configured else default_modules()


def node() -> str | None:
    return shutil.which("node")


def missing_reason() -> str | None:
    """Why the client cannot run here, or None when it can."""
    if node() is None:
        return "node is not installed (apt-get install nodejs npm; see .ci/run)"
    manifest = modules_dir() / "@actions" / "cache" / "package.json"
    try:
        version = json.loads(manifest.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return (f"@actions/cache@{ACTIONS_CACHE_VERSION} is not installed in {modules_dir()} "
                f"(.ci/run installs it; or set {ENV_VAR} to a node_modules holding it)")
    if version != ACTIONS_CACHE_VERSION:
        return (f"{modules_dir()} holds @actions/cache {version}, not {ACTIONS_CACHE_VERSION} "
                f"(the version actions/cache v5.0.5 bundles): rerun .ci/run")
    return None


def require_client() -> Path:
    """The client's node_modules; skips the calling test when it is missing, unless under CI,
    where it raises :class:`ClientMissing`."""
    reason = missing_reason()
    if reason is None:
        return modules_dir()
    if os.environ.get("CI") != "true" and "pytest" in sys.modules:
        import pytest
        pytest.skip(f"the real @actions/cache client is unavailable: {reason}")
    raise ClientMissing(reason)


def driver_args(op: str, paths: Sequence[str], key: str, *, restore_keys: Sequence[str] = (),
                lookup_only: bool = False, cross_os: bool = False,
                upload_chunk_size: int | None = None) -> list[str]:
    """driver.js's arguments for one restoreCache or saveCache call."""
    args = [op]
    for p in paths:
        args += ["--path", p]
    args += ["--key", key]
    for r in restore_keys:
        args += ["--restore-key", r]
    if lookup_only:
        args.append("--lookup-only")
    if cross_os:
        args.append("--enable-cross-os-archive")
    if upload_chunk_size is not None:
        args += ["--upload-chunk-size", str(upload_chunk_size)]
    return args


def install_into(target: Path, modules: Path) -> None:
    """driver.js, preload.js and the package's node_modules under ``target`` (a host path),
    hard-linked from the install where one file system holds both (0.05 s, where copying the
    5,700 files takes 0.75 s a job). The links are the install's own inodes, root's and
    read-only to others: the emulator also mounts them read-only inside the job, so that a
    step's ``chown -R`` or ``chmod -R`` cannot change the install through them."""
    target.mkdir(parents=True, exist_ok=True)
    for script in (DRIVER, PRELOAD):
        shutil.copyfile(script, target / script.name)
        (target / script.name).chmod(0o644)
    dest = target / "node_modules"
    if dest.exists():
        return

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    partial = target / ".node_modules.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(modules, partial, symlinks=True, copy_function=link)
    partial.rename(dest)


@dataclass
class DriverResult:
    """What one driver run printed: the client's log lines and its result."""

    returncode: int
    lines: list[str]
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def matched_key(self) -> str | None:
        return self.result.get("matchedKey")

    @property
    def cache_id(self) -> int | None:
        return self.result.get("cacheId")

    @property
    def error(self) -> tuple[str, str] | None:
        error = self.result.get("error")
        return (error["name"], error["message"]) if error else None

    def has(self, line: str) -> bool:
        return line in self.lines

    @property
    def warnings(self) -> list[str]:
        """The ``::warning::`` commands the client printed (what becomes annotations)."""
        return [line.split("::", 2)[2] for line in self.lines if line.startswith("::warning::")]

    @property
    def debug(self) -> list[str]:
        return [line[len("::debug::"):] for line in self.lines if line.startswith("::debug::")]


def parse_driver_output(stdout: str, returncode: int) -> DriverResult:
    lines = stdout.splitlines()
    result: dict[str, Any] = {}
    if lines and lines[-1].startswith("{"):
        try:
            result = json.loads(lines[-1])
            lines = lines[:-1]
        except ValueError:
            pass
    return DriverResult(returncode, lines, result)


class HostClient:
    """One job's @actions/cache client, run on this host against a :class:`CacheServer`.

    ``workspace`` is GITHUB_WORKSPACE (relative paths and tar's ``-C``), ``home`` is HOME (``~``
    in paths), ``temp`` is RUNNER_TEMP; the token reads ``read_scopes`` in order and writes
    ``write_scope``.
    """

    def __init__(self, server: CacheServer, root: Path, *, read_scopes: Iterable[str],
                 write_scope: str | None, name: str = "job",
                 env: Mapping[str, str] | None = None) -> None:
        self.server = server
        self.root = Path(root)
        self.workspace = self.root / "workspace"
        self.home = self.root / "home"
        self.temp = self.root / "temp"
        for d in (self.workspace, self.home, self.temp):
            d.mkdir(parents=True, exist_ok=True)
        self.token = server.token(list(read_scopes), write_scope, name)
        self.extra_env = dict(env or {})
        self.modules = require_client()

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home),
                "LANG": "C.UTF-8", "GITHUB_WORKSPACE": str(self.workspace),
                "RUNNER_TEMP": str(self.temp), "GITHUB_SERVER_URL": "https://github.com",
                "GITHUB_ACTIONS": "true", "CI": "true", ENV_VAR: str(self.modules),
                **self.server.env(self.token), **self.extra_env}

    def command(self, args: Sequence[str]) -> list[str]:
        return [node() or "node", "--require", str(PRELOAD), str(DRIVER), *args]

    def spawn(self, args: Sequence[str]) -> subprocess.Popen[str]:
        """Start the driver (its own process group, so a test can kill the client whole)."""
        return subprocess.Popen(self.command(args), cwd=self.workspace, env=self.env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    @staticmethod
    def wait(proc: subprocess.Popen[str], timeout: float = 120.0) -> DriverResult:
        stdout, _ = proc.communicate(timeout=timeout)
        return parse_driver_output(stdout, proc.returncode)

    def run(self, args: Sequence[str], timeout: float = 120.0) -> DriverResult:
        return self.wait(self.spawn(args), timeout)

    def save(self, paths: Sequence[str], key: str, **kw: Any) -> DriverResult:
        return self.run(driver_args("save", paths, key, **kw))

    def restore(self, paths: Sequence[str], key: str, restore_keys: Sequence[str] = (),
                **kw: Any) -> DriverResult:
        return self.run(driver_args("restore", paths, key, restore_keys=restore_keys, **kw))
