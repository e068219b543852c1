"""Action step: the body of the GitHub Actions `restore` and `save` steps of this repository.

`python -m incstore.actionstep restore|save` reads its inputs from `INCSTORE_*` environment
variables (the action passes every input through `env:`, never by expanding it into a script),
runs the library verbs, and writes step outputs to `$GITHUB_OUTPUT` and a Markdown table to
`$GITHUB_STEP_SUMMARY`. A missing manifest on restore is a cache miss, not an error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from incstore import manifest
from incstore.chunkstore import ChunkStore
from incstore.db import FLAVOURS, Flavour
from incstore.errors import IncstoreError
from incstore.gc import execute_gc, plan_gc
from incstore.restore import execute_restore, plan_restore
from incstore.save import execute_save, plan_save, previous_manifest
from incstore.store import Store


def _env(env: Mapping[str, str], name: str, default: str = "") -> str:
    return env.get(f"INCSTORE_{name}", "") or default


def _cache(env: Mapping[str, str]) -> str:
    return os.path.expanduser(_env(env, "CACHE", "~/.cache/incstore"))


def _write(env: Mapping[str, str], outputs: dict[str, str | int], summary: list[str]) -> None:
    if out := env.get("GITHUB_OUTPUT"):
        with open(out, "a") as f:
            f.writelines(f"{k}={v}\n" for k, v in outputs.items())
    if path := env.get("GITHUB_STEP_SUMMARY"):
        with open(path, "a") as f:
            f.write("\n".join(summary) + "\n\n")


def _table(title: str, rows: list[tuple[str, str | int]]) -> list[str]:
    return [f"### {title}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def restore(env: Mapping[str, str]) -> int:
    cache, name = _cache(env), _env(env, "NAME", "default")
    matched = _env(env, "MATCHED_KEY", "(none)")
    chunks = ChunkStore(cache)
    if not chunks.has_manifest(name):
        _write(env, {"restored": 0, "skipped": 0, "failed": 0, "bytes": 0, "hit": "false"},
               _table(f"incstore restore `{name}`: cache miss",
                      [("matched key", matched), ("manifest", "not in the chunk store")]))
        return 0
    loaded = manifest.from_bytes(chunks.read_manifest(name), name)
    prefix = Path(_env(env, "PREFIX", "/"))
    db_path = Path(_env(env, "DB")) if _env(env, "DB") else None
    plan = plan_restore(loaded, prefix, cache, db_path=db_path,
                        in_place=_env(env, "IN_PLACE", "false") == "true")
    result = execute_restore(plan, jobs=os.cpu_count() or 2)
    restored = set(result.extracted)
    nar_bytes = sum(loaded.nar_size(n) for n in plan.to_extract if loaded.paths[n] in restored)
    _write(env, {"restored": len(result.extracted), "skipped": len(plan.actions)
                 - len(plan.to_extract), "failed": len(result.failed), "bytes": nar_bytes,
                 "hit": "true"},
           _table(f"incstore restore `{name}`", [
               ("matched key", matched), ("items in manifest", len(plan.actions)),
               ("restored", len(result.extracted)),
               ("already present", len(plan.actions) - len(plan.to_extract)),
               ("failed", len(result.failed)), ("NAR bytes restored", f"{nar_bytes:,}")])
           + [f"- failed: `{e}`" for e in result.failed])
    error = result.error()
    if error:
        raise error
    return 0


def save(env: Mapping[str, str]) -> int:
    cache, name = _cache(env), _env(env, "NAME", "default")
    prefix = Path(_env(env, "PREFIX", "/"))
    store = Store(prefix, _flavour_of(env))
    db_path = Path(_env(env, "DB")) if _env(env, "DB") else store.default_db
    excludes = [Path(p) for p in _env(env, "EXCLUDE_DB").split() if p]
    plan = plan_save(db_path, prefix, cache, exclude_dbs=excludes,
                     previous=previous_manifest(cache, name))
    result = execute_save(plan, None, name=manifest.check_name(name), jobs=os.cpu_count() or 2)
    keep = _env(env, "KEEP_DAYS")
    max_bytes = _env(env, "MAX_BYTES")
    gc = execute_gc(plan_gc(cache, keep_days=float(keep) if keep else None,
                            max_bytes=int(max_bytes) if max_bytes else None))
    changed = "true" if gc.changed else "false"
    _write(env, {"items": len(result.manifest.items), "written": len(result.written),
                 "bytes": result.bytes_written, "changed": changed,
                 "store-bytes": gc.plan.bytes_after},
           _table(f"incstore save `{name}`", [
               ("items", len(result.manifest.items)), ("new chunks", len(result.written)),
               ("bytes written", f"{result.bytes_written:,}"),
               ("reused chunks", len(result.reused)), ("failed", len(result.failed)),
               ("manifests dropped by gc", len(gc.dropped)), ("chunks swept", len(gc.swept)),
               ("chunk store bytes", f"{gc.plan.bytes_after:,}"),
               ("changed (cache uploaded)", changed)])
           + [f"- failed: `{e}`" for e in result.failed])
    error = result.error()
    if error:
        raise error
    return 0


def _flavour_of(env: Mapping[str, str]) -> Flavour:
    return FLAVOURS[_env(env, "FLAVOUR", "guix")]


def main(argv: list[str], env: Mapping[str, str]) -> int:
    verbs = {"restore": restore, "save": save}
    if len(argv) != 1 or argv[0] not in verbs:
        print("usage: python -m incstore.actionstep restore|save", file=sys.stderr)
        return 2
    try:
        return verbs[argv[0]](env)
    except IncstoreError as e:
        print(f"::error title=incstore {argv[0]}::{e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))
