"""Shared fixtures: generated sample stores with real daemon DBs, and a runner for the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest

from incstore import db, sample
from incstore.backend import open_backend
from incstore.store import Store

from .s3server import S3Server
from .s3server import available as s3_available

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "schema" / "manifest.schema.json").read_text())

# .ci/run installs every tool the suite uses: there a missing one is a failure, not a skip
IN_CI = os.environ.get("CI") == "true"

# Nix is run as a chroot-store peer here, never as a daemon with build users: whether this
# machine happens to have the `nixbld` group (nix-bin alone does not create it) must not add
# a warning to the stderr the tests read
os.environ["NIX_CONFIG"] = "build-users-group =\n" + os.environ.get("NIX_CONFIG", "")


def tool(name: str) -> str | None:
    """A console script installed beside this interpreter's packages (a venv need not be
    activated for its tools to count), else one on PATH."""
    own = Path(sysconfig.get_path("scripts")) / name
    if own.is_file() and os.access(own, os.X_OK):
        return str(own)
    return shutil.which(name)


def needs(available: object, reason: str) -> pytest.MarkDecorator:
    """Skip a test whose tool is missing, except in CI, where the test fails saying so."""
    return pytest.mark.needs(bool(available), reason)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(available, reason): a tool the test runs")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        available, reason = mark.args
        if not available:
            if IN_CI:
                pytest.fail(f"{reason}: .ci/run must install it", pytrace=False)
            pytest.skip(reason)


needs_nix = needs(shutil.which("nix-store"), "nix-bin not installed")


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.out)


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    """Run the real CLI as a separate process, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "incstore", *map(str, args)],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def validate_manifest(path: Path) -> dict:  # type: ignore[type-arg]
    """Check a manifest file against the JSON Schema; return it with one dict per item."""
    from .manifests import to_dicts

    doc = json.loads(path.read_text())
    jsonschema.validate(doc, SCHEMA)
    return to_dicts(doc)


@dataclass
class SampleStore:
    prefix: Path
    flavour: db.Flavour
    infos: list[db.PathInfo]

    @property
    def store(self) -> Store:
        return Store(self.prefix, self.flavour)

    @property
    def db_path(self) -> Path:
        return self.store.default_db


def make_sample(prefix: Path, flavour: db.Flavour = db.GUIX, items: int = 16,
                seed: int = 1) -> SampleStore:
    spec = sample.SampleSpec(items=items, blob_bytes=16 << 10, modules=6, seed=seed)
    return SampleStore(prefix, flavour, sample.build(prefix, flavour, spec))


@pytest.fixture(autouse=True, scope="session")
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """What incstore records about the chunks it checked (`incstore.verified`) goes to a
    directory of the test run's own, not the home of whoever runs the tests."""
    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if old is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = old


@pytest.fixture
def guix_store(tmp_path: Path) -> SampleStore:
    return make_sample(tmp_path / "src")


@pytest.fixture
def saved(tmp_path: Path, guix_store: SampleStore) -> tuple[SampleStore, Path, Path]:
    """A sample store already saved: (store, cache dir, manifest path)."""
    cache, manifest = tmp_path / "cache", tmp_path / "m.json"
    r = run("save", "--db", guix_store.db_path, "--prefix", guix_store.prefix,
            "--cache", cache, "--manifest", manifest)
    assert r.code == 0, r.err
    return guix_store, cache, manifest


@pytest.fixture(scope="session")
def moto() -> Iterator[S3Server]:
    if not s3_available("moto"):
        pytest.skip("moto not installed (pip install -e '.[test]')")
    server = S3Server("moto").start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Location:
    """A chunk store location for the conformance suite, and how to reach its raw blobs."""

    kind: str
    url: str
    server: S3Server | None = None
    bucket: str = ""
    prefix: str = ""

    def damage(self, name: str, data: bytes) -> None:
        """Overwrite a blob behind the chunk store's back (a plain write, no create-only)."""
        open_backend(self.url).write(name, data)

    def remove(self, name: str) -> None:
        open_backend(self.url).delete(name)


_buckets = iter(range(1, 1_000_000))


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Location:
    if request.param == "local":
        return Location("local", str(tmp_path / "chunks"))
    server: S3Server = request.getfixturevalue("moto")
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    bucket = server.create_bucket(f"incstore-{os.getpid()}-{next(_buckets)}")
    return Location("s3", f"s3://{bucket}/cache", server, bucket, "cache")
