"""The GitHub Actions of this repository, driven as the Linux runner drives them: the example
workflows run unchanged on the runner emulator (tests/ghrunner: each step with bash as the
`runner` user with sudo, actions/cache with its real key, version, scope and immutability
rules), against fakes of the Guix installers (tests/ghfakes), through the situations a real
repository meets. After each job the test checks its outcome, outputs and annotations, the
cache entries, and the store the next job restores."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT, needs
from .ghfakes import ISOLATED, PYTHON, VENV, guix_install_action, install_fakes, make_mirror
from .ghrunner import Event, GitHub, JobResult, Machine
from .ghrunner.runner import IMAGE_ENV

ACTIONS = ROOT / ".github" / "actions"
WORKFLOWS = ROOT / ".github" / "workflows"
EXAMPLE = WORKFLOWS / "guix-example.yml"

pytestmark = needs(os.geteuid() == 0 and shutil.which("sudo") and Path(PYTHON).exists(),
                   "the runner emulator needs root, sudo and /usr/bin/python3")


def _deps() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    return re.findall(r'"([^"]+)"', block)


def _source_hash() -> str:
    h = hashlib.sha256()
    sources = [*ROOT.glob("incstore/*.py"), *ROOT.glob("schema/*"), ROOT / "pyproject.toml"]
    for path in sorted(sources):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def machine_venv() -> Path:
    """A venv the emulated machines can run (the host's pyenv lives under the isolated /root,
    and the checkout may be under the isolated /tmp), with incstore installed from this
    checkout: the actions' setup step uses it (INCSTORE_VENV) instead of building one per job;
    one test builds one the real way."""
    deps_stamp, source_stamp = VENV / ".deps", VENV / ".source"
    pip = [str(VENV / "bin/pip"), "install", "--quiet", "--disable-pip-version-check"]
    if not (deps_stamp.exists() and deps_stamp.read_text() == "\n".join(_deps())):
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([PYTHON, "-m", "venv", str(VENV)], check=True)
        subprocess.run([*pip, "setuptools>=68", "wheel", *_deps()], check=True)
        deps_stamp.write_text("\n".join(_deps()))
    source = _source_hash()
    if not (source_stamp.exists() and source_stamp.read_text() == source):
        with tempfile.TemporaryDirectory() as build:
            copy = Path(build) / "src"
            shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
                ".git", "bench", "tests", "*.egg-info", "build", "__pycache__"))
            subprocess.run([*pip, "--no-deps", "--no-build-isolation", "--force-reinstall",
                            str(copy)], check=True)
        source_stamp.write_text(source)
    return VENV


@dataclass
class World:
    """A repository on the emulated GitHub, the fake Guix download mirror, and helpers."""

    gh: GitHub
    mirror: Path
    tmp: Path
    runs: int = 0
    extra_setup: list[Callable[[Machine], None]] = field(default_factory=list)

    def setup(self, machine: Machine) -> None:
        install_fakes(machine, self.mirror)
        for hook in self.extra_setup:
            hook(machine)

    def run(self, workflow: Path | dict[str, Any] = EXAMPLE, *, event: Event | None = None,
            setup: Callable[[Machine], None] | None = None, **kw: Any) -> JobResult:
        self.runs += 1

        def both(m: Machine) -> None:
            self.setup(m)
            if setup:
                setup(m)

        result = self.gh.run(workflow, "guix", event=event or Event.push("main"), setup=both,
                             run_id=1000 + self.runs, **kw)
        return result.job

    def cache_keys(self) -> list[str]:
        return sorted(e.key for e in self.gh.cache.entries if "incstore-wheels" not in e.key)

    def entry_sizes(self) -> dict[str, int]:
        return {e.key: e.size for e in self.gh.cache.entries}


@pytest.fixture(scope="session")
def mirror() -> Iterator[Path]:
    """What the workflows download (outside /tmp, which each machine has its own of)."""
    from .ghfakes import build_tarball

    where = Path(tempfile.mkdtemp(prefix="incstore-mirror-", dir="/var/tmp"))
    where.chmod(0o755)  # the runner user downloads from it
    make_mirror(where, "1.4.0")
    build_tarball(where, "1.5.0", seed=8)
    yield where
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def world(tmp_path: Path, machine_venv: Path, mirror: Path) -> Iterator[World]:
    env = {**IMAGE_ENV, "INCSTORE_VENV": str(machine_venv)}
    with GitHub(tmp_path / "github", repository="octo-org/guix-project", default_branch="main",
                source=ROOT, isolated=ISOLATED, image_env=env) as gh:
        gh.actions["PromyLOPh/guix-install-action"] = guix_install_action(tmp_path / "gia")
        yield World(gh, mirror, tmp_path)


def kind(key: str) -> str:
    """An incstore cache key's kind: c (content) or i (index)."""
    return key.removeprefix("incstore-x2-linux-x64-guix-")[0]


def store_items(job: JobResult) -> set[str]:
    assert job.machine is not None
    out = job.machine.run(["ls", "/gnu/store"]).stdout.split()
    return {n for n in out if not n.startswith(".") and not n.endswith(".lock")}


def valid_paths(job: JobResult) -> set[str]:
    assert job.machine is not None
    script = ("import sqlite3; c = sqlite3.connect('file:/var/guix/db/db.sqlite?mode=ro', "
              "uri=True); print('\\n'.join(r[0] for r in c.execute("
              "'select path from ValidPaths')))")
    return set(job.machine.run([PYTHON, "-c", script]).stdout.split())


def outputs(job: JobResult, step: str) -> dict[str, str]:
    return job.step(step).outputs


def annotations(job: JobResult, level: str) -> list[str]:
    return job.annotations_of(level)


def test_first_run_then_a_second_that_uploads_nothing(world: World) -> None:
    first = world.run()
    assert first.success, first.log
    assert outputs(first, "restore")["hit"] == "false"
    assert outputs(first, "save")["changed"] == "true", first.log
    keys = world.cache_keys()
    # one content entry (the first is a base) and the index that names it
    assert [kind(k) for k in keys] == ["c", "i"], keys
    assert all(k.startswith("incstore-x2-linux-x64-guix-") for k in keys), keys
    built = valid_paths(first)
    second = world.run()
    assert second.success, second.log
    restore = outputs(second, "restore")
    assert restore["hit"] == "true" and int(restore["restored"]) > 0, second.log
    assert valid_paths(second) >= {p for p in built if "hello" in p}
    assert outputs(second, "save")["changed"] == "false", second.log
    assert world.cache_keys() == keys  # nothing uploaded


# workflows ----------------------------------------------------------------------------


def workflow(base: Path = EXAMPLE, *, build: str = "hello", restore: dict[str, Any] | None = None,
             save: dict[str, Any] | None = None, env: dict[str, str] | None = None,
             name: str | None = None) -> dict[str, Any]:
    """An example workflow with its build step building `build` (fake guix: 3 items a name)
    and extra inputs for the restore and save steps."""
    doc = yaml.safe_load(base.read_text())
    job = doc["jobs"]["guix"]
    if name:
        doc["name"] = name
    if env:
        job.setdefault("env", {}).update(env)
    for step in job["steps"]:
        if step.get("name", "").startswith("Build"):
            prefix = 'sudo "$GUIX"' if "sudo" in step["run"] else "guix"
            step["run"] = f"{prefix} build {build}"
        if step.get("id") == "restore" and restore:
            step["with"].update(restore)
        if step.get("id") == "save" and save:
            step["with"].update(save)
    return doc


def manifest_paths(job: JobResult, name: str = "guix-interop") -> set[str]:
    assert job.machine is not None
    text = job.machine.run(["cat", f"/home/runner/.cache/incstore/manifests/{name}.json"]).stdout
    return {item[0] for item in json.loads(text)["items"]} if text else set()


def test_pull_requests_cache_in_their_own_scope(world: World) -> None:
    """A PR's first run starts from the default branch's cache and saves into the PR's own
    scope; its re-run and its next push start warm; nothing of it reaches the default
    branch. A fork's PR (no secrets, so no signing key) does the same. `save-on:
    default-branch` still keeps PRs and branches from saving."""
    assert world.run().success
    on_main = world.cache_keys()
    pr = Event.pull_request(7, base="main")
    first = world.run(workflow(build="hello pr-only"), event=pr)
    assert first.success, first.log
    assert outputs(first, "restore")["hit"] == "true"
    assert outputs(first, "save")["changed"] == "true", first.log
    scopes = {e.key: e.scope for e in world.gh.cache.entries}
    assert {scopes[k] for k in world.cache_keys() if k not in on_main} == {"refs/pull/7/merge"}
    pr_items = {p for p in valid_paths(first) if "pr-only" in p}
    for again in (pr, Event.pull_request(7, base="main", sha="f" * 40)):  # re-run, new push
        warm = world.run(workflow(build="hello pr-only"), event=again)
        assert warm.success, warm.log
        assert int(outputs(warm, "restore")["restored"]) >= len(pr_items), warm.log
        assert outputs(warm, "save")["changed"] == "false", warm.log
    main = world.run(workflow(build="hello"))
    assert not {p for p in valid_paths(main) if "pr-only" in p}  # the PR's scope stays its own
    fork = world.run(workflow(build="hello fork-only",
                              save={"signing-key": "${{ secrets.INCSTORE_SIGNING_KEY }}"}),
                     event=Event.pull_request(8, base="main"))
    assert fork.success and outputs(fork, "save")["changed"] == "true", fork.log
    assert "a pull request from a fork gets no secrets" in fork.summary
    before = world.cache_keys()
    for event in (Event.pull_request(9, base="main"), Event.push("feature")):
        held = world.run(workflow(build="hello x", save={"save-on": "default-branch"}),
                         event=event)
        assert held.success and outputs(held, "save")["changed"] == "false", held.log
    assert world.cache_keys() == before


def test_a_corrupt_chunk_is_a_warning_and_the_next_run_heals_it(world: World) -> None:
    first = world.run()
    assert first.success, first.log
    victim = next(p for p in manifest_paths(first) if "hello" in p)
    key = victim.split("/")[-1][:32]
    _plant(world, {f"nar/{key}.nar.zst": b"\x28\xb5\x2f\xfd" + b"junk" * 100}, [])
    hurt = world.run()
    assert hurt.success, hurt.log  # the job goes on
    assert any(key in w or victim in w for w in annotations(hurt, "warning")), hurt.log
    assert int(outputs(hurt, "restore")["failed"]) >= 1
    assert victim in valid_paths(hurt)  # the daemon (fake guix build) made it again
    assert outputs(hurt, "save")["changed"] == "true"  # the chunk written anew
    healed = world.run()
    assert healed.success and not annotations(healed, "warning"), healed.log
    assert outputs(healed, "restore")["failed"] == "0"
    assert victim in valid_paths(healed)


def test_a_missing_chunk_is_a_warning_and_the_next_run_heals_it(world: World) -> None:
    first = world.run()
    victim = next(p for p in manifest_paths(first) if "hello" in p)
    key = victim.split("/")[-1][:32]
    _plant(world, {}, [f"nar/{key}.nar.zst"])
    hurt = world.run()
    assert hurt.success, hurt.log
    assert int(outputs(hurt, "restore")["failed"]) >= 1
    assert any("missing" in w for w in annotations(hurt, "warning")), hurt.log
    healed = world.run()
    assert healed.success and outputs(healed, "restore")["failed"] == "0", healed.log


def newest_index(world: World, scope: str = "refs/heads/main") -> tuple[str, list[str]]:
    """The newest cache index of a scope, read from the service's own archive."""
    entry = max((e for e in world.gh.cache.entries if kind(e.key) == "i" and e.scope == scope),
                key=lambda e: (e.created_at, e.seq))
    text = subprocess.run(["tar", "--zstd", "-xOf", str(entry.blob), "--wildcards",
                           "*/index.json"], capture_output=True, text=True, check=True).stdout
    return entry.key, json.loads(text)["chain"]


def _plant(world: World, files: dict[str, bytes], deleted: list[str]) -> None:
    """What a job with write access to the cache could do: save a content entry of its
    choosing (junk under a chunk's name, or a deletion) and an index naming it last."""
    family = "incstore-x2-linux-x64-guix"
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() + 5))
    content, index = (f"{family}-{k}-incstore-{stamp}-{'a' * 11}{n}" for n, k in enumerate("ci"))
    _, chain = newest_index(world)
    record = {"format": "incstore-cache-entry", "version": 2, "key": content, "kind": "delta",
              "parents": chain, "files": sorted(files), "deleted": deleted}
    index_record = {"format": "incstore-cache-index", "version": 2, "key": index,
                    "chain": [*chain, content]}
    x = f'"$GITHUB_WORKSPACE/.incstore-xfer/{content}"'
    script = ["set -e", f"mkdir -p {x}/nar",
              f"printf '%s' {shlex_quote(json.dumps(record))} > {x}/record.json"]
    for name, data in files.items():
        script.append(f"printf '%s' {shlex_quote(data.decode('latin-1'))} > {x}/{name}")
    save = "actions/cache/save@27d5ce7f107fe9357f9df03efb73ab90386fccae"
    job = world.gh.run_steps([
        {"run": "\n".join(script)},
        {"uses": save, "with": {"path": ".incstore-xfer", "key": content}},
        {"run": f'rm -rf .incstore-xfer && mkdir -p .incstore-xfer/{index} && printf "%s" '
                f'{shlex_quote(json.dumps(index_record))} > .incstore-xfer/{index}/index.json'},
        {"uses": save, "with": {"path": ".incstore-xfer", "key": index}}],
        event=Event.push("main"), run_id=9000 + world.runs)
    assert job.success, job.log
    assert {content, index} <= set(world.cache_keys())


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def test_guix_install_script_daemon_running_and_store_read_only(world: World) -> None:
    wf = WORKFLOWS / "guix-install-script.yml"
    first = world.run(wf)
    assert first.success, first.log
    assert first.machine is not None
    assert "ro," in first.machine.run("grep ' /gnu/store ' /proc/self/mountinfo").stdout
    session = world.run(wf, setup=_daemon_session)  # a client session holds big-lock
    assert session.success, session.log
    restore = outputs(session, "restore")
    assert restore["hit"] == "true" and int(restore["restored"]) > 0, session.log
    assert "in-place mode" in session.summary
    assert {p for p in manifest_paths(first)} <= valid_paths(session)
    # restored items belong to root, whoever owned the store directory
    owners = session.machine.run("stat -c %u /gnu/store/*hello-part0").stdout.split()  # type: ignore[union-attr]
    assert owners and set(owners) == {"0"}


def _daemon_session(machine: Machine) -> None:
    """A guix-daemon session: holds big-lock shared for as long as the job runs."""
    machine.spawn(f"mkdir -p /var/guix/db && exec {PYTHON} -c \"import fcntl, os, time; "
                  "fd = os.open('/var/guix/db/big-lock', os.O_RDWR | os.O_CREAT); "
                  "fcntl.lockf(fd, fcntl.LOCK_SH); time.sleep(600)\"")


def test_guix_install_action_read_only_store(world: World) -> None:
    wf = WORKFLOWS / "guix-install-action.yml"
    first = world.run(wf)
    assert first.success, first.log
    second = world.run(wf)
    assert second.success, second.log
    assert int(outputs(second, "restore")["restored"]) > 0
    assert outputs(second, "save")["changed"] == "false"


def test_an_installer_upgrade_does_not_shrink_the_cache(world: World) -> None:
    """Same key prefix across a Guix upgrade (nothing about the Guix version belongs in a
    key): the items that referenced the old installer's items cannot be registered any
    more; the restore says so and the save keeps them."""
    old = workflow(build="hello", restore={"key-prefix": "guix"}, save={"key-prefix": "guix"})
    first = world.run(old)
    assert first.success, first.log
    kept = manifest_paths(first)
    new = workflow(build="other", restore={"key-prefix": "guix"}, save={"key-prefix": "guix"},
                   env={"GUIX_VERSION": "1.5.0"})
    upgraded = world.run(new)
    assert upgraded.success, upgraded.log
    # hello's first item references an item of the 1.4.0 tarball, gone in 1.5.0
    assert any("leaves to the target store" in w for w in annotations(upgraded, "warning"))
    assert not any("hello" in p for p in valid_paths(upgraded))
    assert kept <= manifest_paths(upgraded), upgraded.log  # nothing forgotten
    # a namespace with no entries yet starts from the newest index of another
    fresh = world.run(workflow(restore={"key-prefix": "new"}, save={"key-prefix": "new"}))
    assert fresh.success and outputs(fresh, "restore")["hit"] == "true", fresh.log
    assert int(outputs(fresh, "restore")["entries"]) >= 1


def test_two_matrix_jobs_in_one_run_keep_both(world: World) -> None:
    doc = workflow(build="pkg-${{ matrix.part }}")
    doc["jobs"]["guix"]["strategy"] = {"matrix": {"part": ["a", "b"]}}
    run = world.gh.run(doc, "guix", event=Event.push("main"), setup=world.setup, run_id=5000)
    assert all(j.success for j in run.jobs), [j.log for j in run.jobs if not j.success]
    # both saved, one slot each, under one manifest name: the union
    after = world.run(workflow(build="nothing-new"))
    assert after.success, after.log
    names = " ".join(manifest_paths(after))
    assert "pkg-a-part0" in names and "pkg-b-part0" in names
    assert {"pkg-a-part2", "pkg-b-part2"} <= {p.split("-", 1)[1] for p in valid_paths(after)}


def test_two_workflows_alternating_for_five_rounds_lose_nothing(world: World) -> None:
    wanted: dict[str, set[str]] = {"a": set(), "b": set()}
    for round_ in range(5):
        for flow in ("a", "b"):
            doc = workflow(build=f"{flow}-round{round_}", name=f"workflow {flow}",
                           restore={"name": flow}, save={"name": flow})
            job = world.run(doc)
            assert job.success, job.log
            wanted[flow] |= {p for p in valid_paths(job) if f"{flow}-round" in p}
    last = world.run(workflow(build="check", restore={"name": "a"}, save={"save": "false"}))
    assert manifest_paths(last, "a") >= wanted["a"]
    assert manifest_paths(last, "b") >= wanted["b"]


def test_ten_warm_saves_upload_only_what_is_new(world: World) -> None:
    packages = " ".join(f"base{i}" for i in range(30))
    first = world.run(workflow(build=f"--item-bytes=20000 {packages}"))
    assert first.success, first.log
    uploads = []
    for n in range(10):
        sizes = world.entry_sizes()
        job = world.run(workflow(build=f"--item-bytes=20000 {packages} new{n}"))
        assert job.success, job.log
        new = {k: v for k, v in world.entry_sizes().items() if k not in sizes}
        assert sorted(kind(k) for k in new) == ["c", "i"], new  # one delta, one index
        uploads.append(sum(new.values()))
    store = int(outputs(job, "save")["store-bytes"])
    assert max(uploads) < 0.05 * store, (uploads, store)
    total = sum(v for k, v in world.entry_sizes().items() if "wheels" not in k)
    assert total < 1.5 * store, (total, store)


def test_a_budget_smaller_than_the_store_keeps_the_newest_manifest(world: World) -> None:
    for flow in ("old", "new"):
        job = world.run(workflow(build=f"{flow}pkg", restore={"name": flow},
                                 save={"name": flow, "max-bytes": "1KB"}))
        assert job.success, job.log
    check = world.run(workflow(build="x", restore={"name": "new"}, save={"save": "false"}))
    assert outputs(check, "restore")["hit"] == "true", check.log
    assert manifest_paths(check, "new") and not manifest_paths(check, "old")


def test_lookup_only_and_invalid_inputs(world: World) -> None:
    assert world.run().success
    look = world.run(workflow(restore={"lookup-only": "true"}, save={"save": "false"}))
    assert look.success and outputs(look, "restore")["hit"] == "true"
    assert outputs(look, "restore")["restored"] == ""  # nothing was downloaded or restored
    bad = world.run(workflow(restore={"fail-on": "sometimes"}))
    assert not bad.success
    errors = annotations(bad, "error")
    assert any("fail-on" in e and "sometimes" in e for e in errors), bad.log
    bad = world.run(workflow(save={"max-bytes": "lots"}))
    assert any("max-bytes" in e for e in annotations(bad, "error")), bad.log


def test_fail_on_corrupt_fails_the_job_when_asked(world: World) -> None:
    first = world.run()
    victim = next(p for p in manifest_paths(first) if "hello" in p)
    _plant(world, {f"nar/{victim.split('/')[-1][:32]}.nar.zst": b"junk" * 50}, [])
    strict = world.run(workflow(restore={"fail-on": "corrupt"}))
    assert not strict.success
    assert any(victim in e for e in annotations(strict, "error")), strict.log


def test_signed_saves_and_trusted_restores(world: World, tmp_path: Path) -> None:
    sec, pub = tmp_path / "k.sec", tmp_path / "k.pub"
    from .conftest import run

    assert run("keygen", "ci-1", sec, pub).code == 0
    signed = workflow(save={"signing-key": "${{ secrets.INCSTORE_SIGNING_KEY }}"},
                      restore={"trusted-keys": pub.read_text()})
    first = world.run(signed, secrets={"INCSTORE_SIGNING_KEY": sec.read_text()})
    assert first.success, first.log
    assert sec.read_text().split(":")[1] not in first.log  # masked, never printed
    second = world.run(signed, secrets={"INCSTORE_SIGNING_KEY": sec.read_text()})
    assert second.success and outputs(second, "restore")["trusted"] == "true", second.log
    other = workflow(restore={"trusted-keys": "other-1:" + "A" * 43 + "="},
                     save={"save": "false"})
    refused = world.run(other)
    assert refused.success, refused.log  # a cache problem is a warning...
    assert outputs(refused, "restore")["restored"] == "0"  # ...and nothing untrusted is used
    assert any("not trusted" in w for w in annotations(refused, "warning"))


def test_setup_builds_its_venv_caches_the_wheels_and_never_reuses_a_broken_one(
        world: World) -> None:
    world.gh.image_env.pop("INCSTORE_VENV", None)
    first = world.run()
    assert first.success, first.log
    assert any("incstore-wheels" in k for k in (e.key for e in world.gh.cache.entries))
    # the next job installs from the cached wheels alone: PyPI unreachable does not matter;
    # and a half-built venv left in its place is not taken for a working one
    offline = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "1"}
    world.gh.image_env.update(offline)

    def broken_venv(machine: Machine) -> None:
        machine.run("mkdir -p /home/runner/work/_temp && chown -R runner /home/runner/work")

    second = world.run(setup=broken_venv)
    assert second.success, second.log
    assert outputs(second, "restore")["hit"] == "true"


def test_an_s3_chunk_store_through_the_actions(world: World, tmp_path: Path) -> None:
    """`cache: s3://…`, the way past 10 GB: the setup step builds its venv the real way with
    the s3 extra (obstore), the save writes the chunk store to the bucket (a server on
    loopback), the next job restores from it, and actions/cache holds only the wheels."""
    from .s3server import S3Server, available

    if not available("localbucket"):
        pytest.skip("localbucket is not installed")
    server = S3Server("localbucket", data=tmp_path / "bucket").start()
    try:
        server.create_bucket("guix-ci")
        world.gh.image_env.pop("INCSTORE_VENV", None)
        s3 = {"cache": "s3://guix-ci/store"}
        doc = workflow(restore=s3, save=s3, env=server.env)
        first = world.run(doc)
        assert first.success, first.log
        assert int(outputs(first, "save")["written"]) > 0, first.log
        assert world.cache_keys() == []  # the chunk store is in the bucket, not in actions/cache
        assert list((tmp_path / "bucket").rglob("*.narinfo")), "nothing reached the bucket"
        second = world.run(doc)
        assert second.success, second.log
        restore = outputs(second, "restore")
        assert restore["hit"] == "true" and int(restore["restored"]) > 0, second.log
        assert outputs(second, "save")["changed"] == "false", second.log
    finally:
        server.stop()


def test_setup_refuses_other_operating_systems(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("")
    proc = subprocess.run([str(ACTIONS / "setup.sh"), "check"], capture_output=True, text=True,
                          env={**os.environ, "ACTION_PATH": str(ACTIONS / "restore"),
                               "RUNNER_OS_NAME": "macOS", "GITHUB_OUTPUT": str(out)})
    assert proc.returncode == 1
    assert "::error title=incstore::incstore runs on Linux runners only" in proc.stdout


# the real cache service's behaviour --------------------------------------------------------


def _items(job: JobResult, word: str) -> set[str]:
    return {p for p in valid_paths(job) if word in p}


def test_a_refused_reservation_costs_only_that_saves_upload(world: World) -> None:
    """A 429 on CreateCacheEntry is reported by the client exactly as a key another job
    holds; nothing names the entry that was never made, so later restores lose nothing a
    finished save uploaded, and the next save uploads the refused save's items again."""
    server = world.gh.cache_server
    server.fail("CreateCacheEntry", 429, key="incstore-x2-*-c-*", retry_after=0)
    refused = world.run(workflow(build="first"))
    assert refused.success, refused.log
    assert "Unable to reserve cache with key" in refused.log
    assert any("did not take this save's entry" in w for w in annotations(refused, "warning"))
    assert world.cache_keys() == []  # not even an index: nothing was finished
    cold = world.run(workflow(build="first"))
    assert cold.success and outputs(cold, "restore")["hit"] == "false", cold.log
    assert outputs(cold, "save")["changed"] == "true", cold.log
    first = _items(cold, "first-part")
    # now a refusal after a good save
    server.fail("CreateCacheEntry", 429, key="incstore-x2-*-c-*", retry_after=0)
    second = world.run(workflow(build="first second"))
    assert second.success and outputs(second, "save")["changed"] == "false", second.log
    third = world.run(workflow(build="first second"))
    assert third.success, third.log
    assert int(outputs(third, "restore")["restored"]) >= len(first)  # all the finished save had
    assert outputs(third, "save")["changed"] == "true"  # second's items, uploaded again
    fourth = world.run(workflow(build="first second"))
    assert _items(fourth, "second-part") and outputs(fourth, "restore")["complete"] == "true"
    assert outputs(fourth, "save")["changed"] == "false", fourth.log


def test_an_upload_that_never_finalizes_holds_only_its_own_key(world: World) -> None:
    """The blob upload fails through the SDK's retries, as when a job is cancelled mid-upload:
    the reservation stays held (for up to a day on GitHub) and invisible. The next run
    restores everything the last finished save had and saves the lost items again."""
    assert world.run(workflow(build="base")).success
    server = world.gh.cache_server
    server.fail("PutBlob", 500, times=None)
    cancelled = world.run(workflow(build="base extra"))
    assert cancelled.success, cancelled.log
    server.clear_faults()
    assert world.gh.cache.pending, "the reservation of the failed upload is held"
    after = world.run(workflow(build="base extra"))
    assert after.success, after.log
    assert outputs(after, "restore")["complete"] == "true"
    assert int(outputs(after, "restore")["restored"]) >= 3  # base's items
    assert outputs(after, "save")["changed"] == "true", after.log  # extra's, again
    check = world.run(workflow(build="base extra"))
    assert _items(check, "extra-part") and outputs(check, "save")["changed"] == "false"
    assert int(outputs(check, "restore")["restored"]) >= 6


def test_a_save_cut_off_between_its_content_and_its_index(world: World) -> None:
    """The content entry went up but no index naming it did (a cancel, refused indexes; one
    refused index alone is made good by the save's recheck): the content is named by
    nothing, and the next save uploads those items again."""
    assert world.run(workflow(build="one")).success
    server = world.gh.cache_server
    server.fail("CreateCacheEntry", 429, key="incstore-x2-*-i-*", retry_after=0, times=None)
    cut = world.run(workflow(build="one two"))
    assert cut.success, cut.log
    server.clear_faults()
    healed = world.run(workflow(build="one two"))
    assert healed.success and outputs(healed, "restore")["complete"] == "true", healed.log
    assert outputs(healed, "save")["changed"] == "true"
    last = world.run(workflow(build="one two"))
    assert _items(last, "two-part") and int(outputs(last, "restore")["restored"]) >= 6


def test_two_saves_of_one_name_while_one_is_still_uploading(world: World) -> None:
    """Matrix jobs a and b save the same manifest name; a's content upload waits to be
    finalized until b's whole save is done. Each save reads the newest index before and
    after writing its own, so the last index names both entries, and the next restore
    merges them as siblings: the manifest is the union."""
    import threading

    assert world.run(workflow(build="common")).success
    indexes = sum(1 for k in world.cache_keys() if kind(k) == "i")
    gate = world.gh.cache_server.pause("FinalizeCacheEntryUpload", key="incstore-x2-*-c-*")
    doc = workflow(build="common pkg-${{ matrix.part }}")
    doc["jobs"]["guix"]["strategy"] = {"matrix": {"part": ["a", "b"]}}
    done: list[Any] = []
    runner = threading.Thread(target=lambda: done.append(world.gh.run(
        doc, "guix", event=Event.push("main"), setup=world.setup, run_id=7000)))
    runner.start()
    assert gate.wait_reached(120), "no content upload reached its finalize"
    deadline = time.monotonic() + 240
    while sum(1 for k in world.cache_keys() if kind(k) == "i") < indexes + 1:
        assert time.monotonic() < deadline, "the other job's save never finished"
        time.sleep(0.5)
    gate.release()
    runner.join(300)
    assert done and all(j.success for j in done[0].jobs), [j.log for j in done[0].jobs]
    after = world.run(workflow(build="nothing-new"))
    assert after.success, after.log
    names = " ".join(manifest_paths(after))
    assert "pkg-a-part0" in names and "pkg-b-part0" in names, after.log
    assert _items(after, "pkg-a-part2") and _items(after, "pkg-b-part2")


def test_a_save_whose_restore_did_not_run_adds_to_the_cache(world: World) -> None:
    """The restore's install failed (or the step was left out): the save reads what the
    cache holds first, then adds to it; with nothing in the cache it saves what it has."""
    def without_restore(doc: dict[str, Any]) -> dict[str, Any]:
        steps = doc["jobs"]["guix"]["steps"]
        doc["jobs"]["guix"]["steps"] = [s for s in steps if s.get("id") != "restore"]
        return doc

    empty = world.run(without_restore(workflow(build="alone")))
    assert empty.success and outputs(empty, "save")["changed"] == "true", empty.log
    second = world.run(without_restore(workflow(build="other")))
    assert second.success and outputs(second, "save")["changed"] == "true", second.log
    both = world.run(workflow(build="nothing"))
    assert both.success, both.log
    assert _items(both, "alone-part2") and _items(both, "other-part2"), both.log
    names = " ".join(manifest_paths(both))
    assert "alone-part0" in names and "other-part0" in names


def test_the_interop_workflow_from_a_cold_cache_to_a_warm_pr_rerun(world: World) -> None:
    wf = WORKFLOWS / "guix-interop.yml"
    cold = world.run(wf, event=Event.schedule("main"))
    assert cold.success, cold.log
    assert outputs(cold, "restore")["hit"] == "false"
    assert "did not hold the whole closure" in cold.summary
    assert outputs(cold, "save")["changed"] == "true", cold.log
    pr = Event.pull_request(12, base="main")
    first = world.run(wf, event=pr)  # warm from the scheduled run's cache
    assert first.success, first.log
    assert outputs(first, "restore")["complete"] == "true", first.log
    assert "held every item" in first.summary
    assert outputs(first, "save")["changed"] == "false", first.log
    rerun = world.run(wf, event=pr)
    assert rerun.success and outputs(rerun, "restore")["complete"] == "true", rerun.log
