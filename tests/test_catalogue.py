"""The catalogue: an SQLite database of a chunk store, built with sqlite-utils. The README's three
questions are run exactly as written (only the output format is changed to JSON) and their
answers checked against `incstore stats` and `incstore diff`."""

from __future__ import annotations

import json
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from incstore.chunkstore import ChunkStore
from incstore.manifest import from_bytes

from .conftest import ROOT, SampleStore, make_sample, run

pytest.importorskip("sqlite_utils")


def _readme_commands() -> list[list[str]]:
    """The sqlite-utils commands of the README's catalogue section, as argument lists."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Asking the cache questions", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    commands, current = [], []
    for line in block.group(1).splitlines():
        if line.startswith("#") or not line.strip():
            if current:
                commands.append(shlex.split("\n".join(current)))
                current = []
            continue
        current.append(line)
    if current:
        commands.append(shlex.split("\n".join(current)))
    return commands


def _sqlite_utils(args: list[str], db: Path) -> list[dict]:  # type: ignore[type-arg]
    assert args[0] == "sqlite-utils" and args[1] == "catalogue.db"
    rest = [a for a in args[2:] if a not in ("--table", "--csv")]
    p = subprocess.run([sys.executable, "-m", "sqlite_utils", str(db), *rest],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.fixture
def catalogued(tmp_path: Path) -> tuple[SampleStore, Path, Path]:
    src = make_sample(tmp_path / "src", items=18)
    # items nothing references: each is in no closure but its own
    referenced = {r for i in src.infos for r in i.references if r != i.path}
    tops = sorted(i.path for i in src.infos if i.path not in referenced)
    assert len(tops) >= 4
    cache = tmp_path / "cache"
    for name, roots in (("ci-monday", tops[:-1]), ("ci-tuesday", tops[1:]),
                        ("docs", tops[1:2])):
        closure = [a for p in roots for a in ("--closure-of", p)]
        r = run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", cache,
                "--name", name, *closure)
        assert r.code == 0, r.err
    out = tmp_path / "catalogue.db"
    r = run("catalogue", "--cache", cache, out, "--json")
    assert r.code == 0, r.err
    assert r.json()["manifests"] == 3
    return src, cache, out


def test_readme_questions_agree_with_stats_and_diff(
        catalogued: tuple[SampleStore, Path, Path]) -> None:
    _, cache, db = catalogued
    largest, shared, changed = _readme_commands()
    stats = run("stats", "--cache", cache, "--json").json()["manifests"]
    chunks = ChunkStore(cache)
    manifests = {n: from_bytes(chunks.read_manifest(n), n) for n in stats}

    # 1. largest unique items: the top five of each manifest's chunks nobody else names, whose
    # sizes add up to what stats calls unique
    users: dict[str, int] = {}
    for m in manifests.values():
        for n in range(len(m)):
            users[m.chunk_key(n)] = users.get(m.chunk_key(n), 0) + 1
    rows = _sqlite_utils(largest, db)
    for name, m in manifests.items():
        unique = [(m.chunk(n).size, m.paths[n]) for n in range(len(m))
                  if users[m.chunk_key(n)] == 1]
        assert sum(size for size, _ in unique) == stats[name]["unique_bytes"]
        top = sorted((size for size, _ in unique), reverse=True)[:5]
        got = [r for r in rows if r["manifest"] == name]
        assert [r["chunk_size"] for r in got] == top
        assert {(r["chunk_size"], r["path"]) for r in got} <= set(unique)
    assert rows  # the three workflows do hold items of their own

    # 2. items every workflow shares: what diff finds common to each pair
    def diff(a: str, b: str) -> dict:  # type: ignore[type-arg]
        return run("diff", "--cache", cache, a, b, "--json").json()

    common = set(diff("ci-monday", "ci-tuesday")["common"]) & set(
        diff("ci-monday", "docs")["common"])
    got_shared = [r["path"] for r in _sqlite_utils(shared, db)]
    assert got_shared == sorted(common) and common

    # 3. what changed between two saves: diff's only-in-b and only-in-a
    rows = _sqlite_utils(changed, db)
    d = diff("ci-monday", "ci-tuesday")
    assert [r["path"] for r in rows if r["change"] == "added"] == d["only_b"]
    assert [r["path"] for r in rows if r["change"] == "removed"] == d["only_a"]
    assert d["only_a"] and d["only_b"]


def test_catalogue_tables_hold_the_chunk_store(catalogued: tuple[SampleStore, Path, Path]
                                              ) -> None:
    src, cache, db = catalogued
    con = sqlite3.connect(db)
    chunks = ChunkStore(cache)
    files = chunks.chunk_files()
    assert {k: e.size for k, e in files.items()} == dict(
        con.execute("select key, size from chunks where quarantined = 0"))
    infos = {i.path: i for i in src.infos}
    for path, nar_hash, nar_size, deriver in con.execute(
            "select path, nar_hash, nar_size, deriver from items"):
        assert (nar_hash, nar_size, deriver) == (infos[path].hash, infos[path].nar_size,
                                                 infos[path].deriver)
    for path, refs in {p: set(i.references) for p, i in infos.items()}.items():
        got = {r for (r,) in con.execute("select reference from refs where referrer = ?",
                                         (path,))}
        if con.execute("select 1 from items where path = ?", (path,)).fetchone():
            assert got == refs
    created = dict(con.execute("select name, created from manifests"))
    for name, when in created.items():
        assert when == from_bytes(chunks.read_manifest(name), name).created
    # full-text search on names, as the README shows
    word = infos[sorted(infos)[0]].path.split("-", 1)[1].split("-")[0]
    p = subprocess.run([sys.executable, "-m", "sqlite_utils", "search", str(db), "items", word],
                       capture_output=True, text=True, check=True)
    found = json.loads(p.stdout)
    assert found and all(word in r["name"] for r in found)
    indexes = {r[1] for r in con.execute("select * from sqlite_master where type = 'index'")}
    assert {"idx_manifest_items_path", "idx_refs_reference"} <= indexes


def test_unreadable_manifests_are_listed_not_fatal(catalogued: tuple[SampleStore, Path, Path],
                                                   tmp_path: Path) -> None:
    _, cache, _ = catalogued
    (cache / "manifests" / "broken.json").write_text("{not json")
    out = tmp_path / "again.db"
    r = run("catalogue", "--cache", cache, out)
    assert r.code == 0, r.err
    assert "broken" in r.err
    con = sqlite3.connect(out)
    assert [n for (n,) in con.execute("select name from unreadable_manifests")] == ["broken"]
    assert con.execute("select count(*) from manifests").fetchone() == (3,)


def test_without_sqlite_utils_the_command_says_what_to_install(
        catalogued: tuple[SampleStore, Path, Path], tmp_path: Path) -> None:
    _, cache, _ = catalogued
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sqlite_utils.py").write_text("raise ImportError('not installed')\n")
    p = subprocess.run([sys.executable, "-m", "incstore", "catalogue", "--cache", str(cache),
                        str(tmp_path / "x.db")], capture_output=True, text=True, check=False,
                       env={"PYTHONPATH": f"{blocker}:{ROOT}", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 16, p.stderr
    assert "pip install 'incstore[catalogue]'" in p.stderr
    assert not (tmp_path / "x.db").exists()


def test_no_other_command_imports_sqlite_utils(catalogued: tuple[SampleStore, Path, Path],
                                               tmp_path: Path) -> None:
    src, cache, _ = catalogued
    for args in (["save", "--db", str(src.db_path), "--prefix", str(src.prefix), "--cache",
                  str(cache), "--name", "ci-monday"],
                 ["restore", "--name", "docs", "--cache", str(cache), "--prefix",
                  str(tmp_path / "dst")],
                 ["stats", "--cache", str(cache)], ["check", "--cache", str(cache)],
                 ["gc", "--cache", str(cache), "--dry-run"]):
        code = ("import sys\nfrom incstore.cli import main\n"
                f"sys.argv = ['incstore', *{args!r}]\n"
                "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
                "print('sqlite_utils' in sys.modules, 'sqlite3' in sys.modules)")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=False)
        assert p.returncode == 0, p.stderr
        assert p.stdout.split()[-2] == "False", args


def test_a_far_future_seen_time_is_catalogued_not_fatal(tmp_path: Path) -> None:
    """FORMAT.md allows any signed 64-bit `seen`; one such manifest once made the whole
    catalogue exit 11."""
    from . import manifests

    src = make_sample(tmp_path / "src", items=5, seed=5)
    cache = tmp_path / "cache"
    for name in ("far", "plain"):
        r = run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", cache,
                "--name", name)
        assert r.code == 0, r.err
    path = cache / "manifests" / "far.json"
    doc = manifests.load(path)
    doc["items"][0]["seen"] = 2**63 - 1
    doc["items"][1]["seen"] = 0
    manifests.dump(path, doc)
    out = tmp_path / "catalogue.db"
    r = run("catalogue", "--cache", cache, out, "--json")
    assert r.code == 0, r.err
    assert r.json()["manifests"] == 2
    seen = dict(sqlite3.connect(out).execute(
        "select path, seen from manifest_items where manifest = 'far'"))
    assert seen[doc["items"][0]["path"]] == "+292277026596-12-04T15:30:07Z"
    assert seen[doc["items"][1]["path"]] == "1970-01-01T00:00:00Z"
