"""Action step: what the `run:` steps of the composite actions in `.github/actions/` do.

Each verb reads its inputs from `INCSTORE_*` environment variables (never from expressions
expanded into a script), writes step outputs to `$GITHUB_OUTPUT`, a table to
`$GITHUB_STEP_SUMMARY`, and problems as workflow commands (`::warning::`, `::error::`), with
everything quoted from input escaped. A cache problem is a cache miss: unless the user asked
for `fail-on`, a verb warns and exits 0, so the job goes on and the daemon substitutes or
builds what the cache could not give. No input and no cache state ends in a traceback.

Verbs (see `transfer` for the cache-entry scheme):
- `restore-prepare`: validate the inputs; name the base key to look up.
- `restore-plan`: after the base entry is restored, name the slot keys to try.
- `restore`: merge the restored entries into the chunk store, restore the manifest, record
  the state a later save in the job starts from.
- `save`: save the store, gc, and stage what changed since the restore (or a new base first,
  when the generation's slots are full).
- `save-restage`: after a new base was uploaded, stage the save's own changes.
- `save-check`: after an upload and reading its key back: done, or merge the winner's entry
  and stage the next slot.
- `save-report`: the save's outputs and summary.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from incstore import manifest, trust
from incstore.errors import IncstoreError
from incstore.gc import execute_gc, plan_gc
from incstore.transfer import (
    SLOTS,
    Entry,
    Snapshot,
    base_key,
    clear,
    delta,
    entries_in,
    give_to,
    merge,
    mirror,
    new_nonce,
    owns,
    slot_key,
    slot_prefix,
    stage,
)
from incstore.xferdir import Refusal, TransferDir

FAIL_ON = ("never", "corrupt", "any")
# exit codes that mean the cache holds something wrong (not merely something missing)
CORRUPT_CODES = {3, 7, 8, 12, 14}
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?")
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class InputError(Exception):
    """An action input is invalid: the step fails with one line, before any work."""


def parse_size(text: str) -> int:
    """`8000000000`, `8GB`, `8G`, `7.5GiB`, `500 MB` to bytes."""
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise InputError(f"max-bytes: not a size: {text!r} (e.g. 8GB, 7.5GiB, 8000000000)")
    unit = (m.group(2) or "").lower().removesuffix("b")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_days(text: str) -> float:
    """`30`, `30d`, `12h` (a duration) to days."""
    try:
        return trust.parse_duration(text if text[-1:].isalpha() else text + "d") / 86400
    except ValueError:
        raise InputError(f"not a duration in days: {text!r} (e.g. 30, 30d, 12h)") from None


def escape(text: str, *, prop: bool = False) -> str:
    """Escape text for a workflow command, as the runner's own toolkit does."""
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


@dataclass
class Step:
    """One run of a verb: its inputs and where its results go."""

    env: Mapping[str, str]
    outputs: dict[str, str]
    summary: list[str]

    def get(self, name: str, default: str = "") -> str:
        return self.env.get(f"INCSTORE_{name}", "").strip() or default

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.get(name, "true" if default else "false").lower()
        if value not in ("true", "false"):
            raise InputError(f"{name.lower().replace('_', '-')}: expected true or false, "
                             f"not {value!r}")
        return value == "true"

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        value = self.get(name, default)
        if value not in options:
            raise InputError(f"{name.lower().replace('_', '-')}: expected one of "
                             f"{', '.join(options)}, not {value!r}")
        return value

    def annotate(self, level: str, message: str, title: str = "incstore") -> None:
        print(f"::{level} title={escape(title, prop=True)}::{escape(message)}", flush=True)

    def path(self, name: str, default: str = "") -> Path:
        return Path(os.path.expanduser(self.get(name, default)))

    @property
    def cache(self) -> str:
        return self.get("CACHE", "~/.cache/incstore") if self.s3 else str(
            self.path("CACHE", "~/.cache/incstore"))

    @property
    def s3(self) -> bool:
        return self.get("CACHE").startswith("s3://")

    @property
    def xfer(self) -> Path:
        return self.path("XFER")

    @property
    def state_dir(self) -> Path:
        return self.path("STATE")

    @property
    def name(self) -> str:
        return manifest.check_name(self.get("NAME", "default"))

    @property
    def key_prefix(self) -> str:
        prefix = self.get("KEY_PREFIX", "incstore")
        if not re.fullmatch(r"[A-Za-z0-9._+-]{1,200}", prefix):
            raise InputError(f"key-prefix: letters, digits and . _ + - only, not {prefix!r}")
        return prefix

    def state_file(self) -> Path:
        return self.state_dir / f"{self.name}.json"

    def finish(self) -> None:
        if out := self.env.get("GITHUB_OUTPUT"):
            with open(out, "a", encoding="utf-8") as f:
                for key, value in self.outputs.items():
                    f.write(f"{key}={value}\n" if "\n" not in value else
                            f"{key}<<INCSTORE_EOF\n{value}\nINCSTORE_EOF\n")
        if (path := self.env.get("GITHUB_STEP_SUMMARY")) and self.summary:
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n".join(self.summary) + "\n\n")


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(title: str, rows: list[tuple[str, Any]]) -> list[str]:
    return [f"### {title}", "", "| | |", "|---|---|",
            *(f"| {k} | {_cell(v)} |" for k, v in rows)]


def _user(env: Mapping[str, str]) -> tuple[int, int] | None:
    """The runner's user when this runs under sudo (it must own the transfer directory)."""
    try:
        return int(env["SUDO_UID"]), int(env["SUDO_GID"])
    except (KeyError, ValueError):
        return None


# restore ------------------------------------------------------------------------------


def restore_prepare(step: Step) -> int:
    step.name, step.key_prefix  # noqa: B018 (validation)
    step.choice("FAIL_ON", FAIL_ON, "never")
    step.choice("DB_MODE", ("auto", "swap", "in-place"), "auto")
    step.flag("LOOKUP_ONLY")
    if max_age := step.get("MAX_AGE"):
        try:
            trust.parse_duration(max_age)
        except ValueError as e:
            raise InputError(f"max-age: {e}") from None
    step.outputs["base-key"] = "" if step.s3 else f"{step.key_prefix}-base-"
    return 0


def restore_plan(step: Step) -> int:
    """After the base entry is restored: the slots of its generation."""
    bases = [e for e in entries_in(step.xfer) if e.kind == "base"]
    step.outputs["slot-prefix"] = (slot_prefix(step.key_prefix, bases[-1].generation)
                                   if bases else "")
    return 0


def restore(step: Step) -> int:
    from incstore.restore import execute_restore, plan_restore

    fail_on = step.choice("FAIL_ON", FAIL_ON, "never")
    cache, name = step.cache, step.name
    generation, slots = None, 0
    if not step.s3:
        merged = merge(step.xfer, Path(cache), generation=_base_generation(step.xfer))
        _warn_refused(step, merged.problems)
        applied = merged.entries
        bases = [e for e in applied if e.kind == "base"]
        generation = bases[-1].generation if bases else None
        slots = max((e.slot for e in applied if e.kind == "slot"), default=0)
        if (user := _user(step.env)) is not None:
            give_to(step.xfer, *user)
    step.state_dir.mkdir(parents=True, exist_ok=True)
    if not step.s3:
        Snapshot.take(Path(cache)).write(_snapshot_path(step))
        if slots >= SLOTS:
            # the save will start a new generation whose base is this content exactly:
            # keep it (hard links) before the restore and save change anything
            mirror(Path(cache), _mirror_path(step))
    state: dict[str, Any] = {"generation": generation, "slots": slots, "failed": [],
                             "restored": False}
    rows: list[tuple[str, Any]] = [("matched key", step.get("MATCHED_KEY", "(none)")),
                                   ("cache entries", f"base g{generation}, {slots} slot(s)"
                                    if generation is not None else "none")]
    step.outputs.update({"hit": "false", "restored": "0", "skipped": "0", "failed": "0",
                         "bytes": "0", "trusted": "false", "generation": str(generation or "")})
    try:
        loaded, data, sig = _load(cache, name)
    except IncstoreError as e:
        _write_state(step, state)
        step.summary += _table(f"incstore restore `{name}`: cache miss",
                               [*rows, ("manifest", str(e))])
        return 0
    policy = trust.Policy(_roots(step), expected_name=name,
                          max_age=trust.parse_duration(a) if (a := step.get("MAX_AGE")) else None,
                          require_manifest=step.flag("REQUIRE_SIGNED_MANIFEST"))
    prefix = Path(step.get("PREFIX", "/"))
    db_path = Path(step.get("DB")) if step.get("DB") else None
    code = 0
    try:
        plan = plan_restore(loaded, prefix, cache, db_path=db_path,
                            db_mode=step.choice("DB_MODE", ("auto", "swap", "in-place"),
                                                "auto"),  # type: ignore[arg-type]
                            policy=policy, data=data, sig=sig)
        result = execute_restore(plan, jobs=os.cpu_count() or 2)
    except IncstoreError as e:
        state["failed"] = list(loaded.paths)
        _write_state(step, state)
        step.outputs.update({"hit": "true", "failed": str(len(loaded))})
        step.summary += _table(f"incstore restore `{name}`: not restored",
                               [*rows, ("error", str(e))])
        return _problem(step, e.exit_code, f"restore of {name} did not happen: {e}", fail_on)
    restored = set(result.extracted)
    failed = sorted({e.item for e in result.failed if e.item} | set(result.skipped))
    state.update(failed=failed, restored=True)
    _write_state(step, state)
    nar_bytes = sum(loaded.nar_size(n) for n in plan.to_extract if loaded.paths[n] in restored)
    step.outputs.update({
        "hit": "true", "restored": str(len(result.registered)),
        "skipped": str(len(plan.actions) - len(plan.to_extract)), "failed": str(len(failed)),
        "bytes": str(nar_bytes), "trusted": "true" if plan.trusted else "false"})
    for warning in result.warnings:
        step.annotate("warning", warning)
    step.summary += _table(f"incstore restore `{name}`", [
        *rows, ("items in manifest", len(plan.actions)),
        ("restored", len(result.registered)),
        ("already present", len(plan.actions) - len(plan.to_extract)),
        ("failed or skipped", len(failed)), ("NAR bytes restored", f"{nar_bytes:,}"),
        ("registered in", f"{result.db_mode} mode"),
        ("trusted", "yes" if plan.trusted else "no" if plan.trust.active
         else "no (no trusted keys given)")])
    step.summary += [f"- `{e}`" for e in result.failed[:50]]
    error = result.error()
    if error is not None:
        for failure in result.failed[:10]:
            step.annotate("warning", str(failure), "incstore: not restored")
        more = f" (and {len(result.failed) - 10} more)" if len(result.failed) > 10 else ""
        code = _problem(step, error.exit_code,
                        f"{len(failed)} item(s) of {name} were not restored{more}; the daemon "
                        f"substitutes or builds them: {error}", fail_on)
    return code


def _warn_refused(step: Step, problems: list[str]) -> None:
    """What the transfer directory held that the format does not allow: a warning each (the
    first ten), and those blobs or entries are a cache miss."""
    for problem in problems[:10]:
        step.annotate("warning", f"refused from the cache entry: {problem}")
    if len(problems) > 10:
        step.annotate("warning", f"... and {len(problems) - 10} more refused")


def _base_generation(xfer: Path) -> int | None:
    bases = [e for e in entries_in(xfer) if e.kind == "base"]
    return bases[-1].generation if bases else None


def _problem(step: Step, code: int, message: str, fail_on: str) -> int:
    """Report a problem; fail the step only if the user asked for it."""
    strict = fail_on == "any" or (fail_on == "corrupt" and code in CORRUPT_CODES)
    step.annotate("error" if strict else "warning", message)
    return code if strict else 0


def _load(cache: str, name: str) -> tuple[manifest.Manifest, bytes, bytes | None]:
    from incstore.chunkstore import ChunkStore

    chunks = ChunkStore(cache)
    if not chunks.exists():
        raise IncstoreError("no chunk store restored")
    sig = chunks.read_manifest_sig(name)
    data = chunks.read_manifest(name)
    return manifest.from_bytes(data, name), data, sig


def _roots(step: Step) -> trust.Roots:
    keys = [k for k in re.split(r"[\s]+", step.get("TRUSTED_KEYS")) if k]
    acl = step.get("TRUST_GUIX_ACL", "false")
    acl_path = (trust.DEFAULT_GUIX_ACL if acl == "true" else None if acl == "false"
                else Path(acl))
    return trust.load_roots(keys, guix_acl=acl_path)


def _write_state(step: Step, state: dict[str, Any]) -> None:
    from incstore import atomicfile

    atomicfile.write_bytes(step.state_file(), json.dumps(state).encode())


# save ---------------------------------------------------------------------------------


def _save_allowed(step: Step) -> str | None:
    """Why this job must not save, or None."""
    if not step.flag("SAVE", True):
        return "save is false"
    event = step.env.get("GITHUB_EVENT_NAME", "")
    if event.startswith("pull_request"):
        return "pull requests read the cache and never write it"
    save_on = step.choice("SAVE_ON", ("default-branch", "any-branch"), "default-branch")
    default = _default_branch(step.env)
    ref = step.env.get("GITHUB_REF", "")
    if save_on == "default-branch" and default and ref != f"refs/heads/{default}":
        return f"save-on is default-branch and this run is on {ref or 'no branch'}"
    return None


def _default_branch(env: Mapping[str, str]) -> str:
    try:
        with open(env["GITHUB_EVENT_PATH"], encoding="utf-8") as f:
            return str(json.load(f)["repository"]["default_branch"])
    except (KeyError, OSError, ValueError, TypeError):
        return ""


def save(step: Step) -> int:
    """Save the store and gc; stage what goes up first (its key in outputs `key`, or
    `base-key` when the slots are full and a new base must go up first)."""
    from incstore import signature
    from incstore.db import FLAVOURS
    from incstore.save import execute_save, plan_save, previous_manifest
    from incstore.store import Store

    name, cache = step.name, step.cache
    keep = parse_days(step.get("KEEP_DAYS", "30"))
    budget = parse_size(step.get("MAX_BYTES", "8GB"))
    flavour = FLAVOURS.get(step.get("FLAVOUR", "guix"))
    if flavour is None:
        raise InputError(f"flavour: guix or nix, not {step.get('FLAVOUR')!r}")
    excludes = [Path(p) for p in step.get("EXCLUDE_DB").splitlines() if p.strip()]
    step.outputs.update({"key": "", "base-key": "", "changed": "false", "items": "0",
                         "written": "0", "bytes": "0", "upload-bytes": "0",
                         "store-bytes": "0", "failed": "0"})
    why_not = _save_allowed(step)
    if why_not is not None:
        step.annotate("notice", f"not saving the cache: {why_not}")
        step.summary += _table(f"incstore save `{name}`: skipped", [("why", why_not)])
        return 0
    state = _read_state(step)
    if state is None and not step.s3:
        step.annotate("warning", "not saving the cache: the restore action did not run in "
                      "this job before the save (a save without it would replace the cache "
                      "with a smaller one)")
        return 0
    prefix = Path(step.get("PREFIX", "/"))
    store = Store(prefix, flavour)
    db_path = Path(step.get("DB")) if step.get("DB") else store.default_db
    key_file = step.get("SIGN_KEY_FILE")
    secret = signature.read_secret_key(key_file) if key_file else None
    plan = plan_save(db_path, prefix, cache, exclude_dbs=excludes,
                     previous=previous_manifest(cache, name), carry_days=keep)
    result = execute_save(plan, None, name=name, jobs=os.cpu_count() or 2, sign_key=secret)
    gc = execute_gc(plan_gc(cache, keep_days=keep, max_bytes=budget,
                            grace_seconds=float(step.get("GRACE_SECONDS", "0"))))
    step.outputs.update({"items": str(len(result.manifest)), "written": str(len(result.written)),
                         "bytes": str(result.bytes_written), "failed": str(len(result.failed)),
                         "store-bytes": str(gc.plan.bytes_after)})
    rows: list[tuple[str, Any]] = [
        ("items", len(result.manifest)), ("new chunks", len(result.written)),
        ("bytes written", f"{result.bytes_written:,}"), ("reused chunks", len(result.reused)),
        ("kept from the last save (not in the store)", len(plan.carried)),
        ("failed", len(result.failed)), ("manifests dropped by gc", len(gc.dropped)),
        ("chunks swept", len(gc.swept)), ("chunk store bytes", f"{gc.plan.bytes_after:,}")]
    for e in result.failed[:50]:
        step.annotate("warning", f"not saved: {e}")
    if result.not_written is not None:
        step.annotate("warning", f"manifest {name} not written: {result.not_written}")
    if step.s3:
        step.outputs["changed"] = "true" if result.written or gc.changed else "false"
        step.summary += _table(f"incstore save `{name}`", rows)
        return 0
    assert state is not None
    _write_state(step, {**state, "rows": rows})
    return _stage_next(step, first=True)


def _read_state(step: Step) -> dict[str, Any] | None:
    try:
        return dict(json.loads(step.state_file().read_bytes()))
    except (OSError, ValueError):
        return None


def _snapshot_path(step: Step) -> Path:
    return step.state_dir / f"{step.name}.snapshot"


def _mirror_path(step: Step) -> Path:
    return step.state_dir / f"{step.name}.restored"


def _stage_next(step: Step, *, first: bool = False) -> int:
    """Stage the next upload: the new generation's base when the restored generation's slots
    are full (or there was none), else the next slot with what this save changed."""
    state = _read_state(step)
    assert state is not None
    root = Path(step.cache)
    change = delta(root, Snapshot.read(_snapshot_path(step)))
    user = _user(step.env)
    if not change:
        state.update(done=True, attempt_key="")
        _write_state(step, state)
        return 0
    generation, slots = state["generation"], int(state["slots"])
    if first and (generation is None or slots >= SLOTS):
        # a new generation. Its base is exactly the restored generation's content (nothing
        # for the first one), so any save compacting now writes the same base and either may
        # win; this save's own changes then go to the new generation's first slot
        new = 0 if generation is None else generation + 1
        mirror = _mirror_path(step)
        files = [] if generation is None else sorted(Snapshot.take(mirror).files)
        entry = Entry(base_key(step.key_prefix, new), "base", new, 0, new_nonce(), files, [])
        staged = stage(mirror, step.xfer, entry)
        if user:
            give_to(step.xfer, *user)
        state.update(generation=new, slots=0, base_key=entry.key,
                     uploaded=int(state.get("uploaded", 0)) + staged)
        _write_state(step, state)
        step.outputs["base-key"] = entry.key
        return 0
    entry = Entry(slot_key(step.key_prefix, generation, slots + 1), "slot", generation,
                  slots + 1, new_nonce(), change.changed, change.deleted)
    staged = stage(root, step.xfer, entry)
    if user:
        give_to(step.xfer, *user)
    state.update(attempt_key=entry.key, nonce=entry.nonce, attempt_bytes=staged)
    _write_state(step, state)
    step.outputs["key"] = entry.key
    return 0


def save_restage(step: Step) -> int:
    """After the new base went up (its key read back: output `found` of a lookup), stage this
    save's own changes for the new generation's first slot."""
    state = _read_state(step)
    if state is None or not state.get("base_key"):
        return 0
    if step.get("FOUND") != state["base_key"]:
        step.annotate("warning", "the cache did not take the new base entry; nothing of this "
                      "save is uploaded (the next run tries again)")
        state.update(done=True, attempt_key="")
        _write_state(step, state)
        return 0
    return _stage_next(step)


def save_check(step: Step) -> int:
    """After the attempt's key was read back into the transfer directory."""
    state = _read_state(step)
    if state is None or not state.get("attempt_key"):
        return 0
    key, nonce = state["attempt_key"], state["nonce"]
    root = Path(step.cache)
    if owns(step.xfer, key, nonce):
        clear(step.xfer)
        state.update(slots=int(state["slots"]) + 1, done=True, uploaded_ok=True,
                     uploaded=int(state.get("uploaded", 0)) + int(state["attempt_bytes"]),
                     attempt_key="")
        _write_state(step, state)
        return 0
    # another save took this slot (or our upload did not happen): take in what is there,
    # keep it out of our own changes, and try the next slot
    theirs = [e for e in entries_in(step.xfer) if e.key == key]
    if theirs:
        _merge_theirs(step, root, theirs[0])
    clear(step.xfer)
    state.update(slots=int(state["slots"]) + 1, attempt_key="")
    _write_state(step, state)
    if int(state["slots"]) >= SLOTS:
        step.annotate("warning", "the cache's slots filled up while saving; the new items stay "
                      "for the next run to save")
        return 0
    return _stage_next(step)


def _merge_theirs(step: Step, root: Path, entry: Entry) -> None:
    """Take another save's entry into the local chunk store: their files overlay ours, except
    a named manifest both changed, which becomes the union of the two; the snapshot learns
    their files, so that they are not uploaded again as ours."""
    snapshot = Snapshot.read(_snapshot_path(step))
    ours = set(delta(root, snapshot).changed)
    for name in entry.files:
        if name in ours and name.startswith("manifests/") and name.endswith(".json"):
            _union_manifest(root / name, step.xfer, name)
    _warn_refused(step, merge(step.xfer, root).problems)
    now = Snapshot.take(root)
    for name in entry.files:
        if name in now.files and name not in ours:
            snapshot.files[name] = now.files[name]
    for name in entry.deleted:
        snapshot.files.pop(name, None)
    snapshot.write(_snapshot_path(step))


def _union_manifest(ours_path: Path, xfer: Path, name: str) -> None:
    """Two jobs saved the same manifest name at once: keep every item of both (theirs then
    leaves the transfer directory, so that the merge does not overlay ours with it)."""
    from incstore.manifest import Manifest, from_bytes, now_utc

    source = TransferDir(xfer)
    try:
        theirs_data = source.read(name, manifest.MAX_BYTES)
    except (OSError, Refusal):
        return
    finally:
        source.remove(name)
    try:
        ours = from_bytes(ours_path.read_bytes(), ours_path.name)
        theirs = from_bytes(theirs_data, ours_path.name)
    except (OSError, IncstoreError):
        return
    items = {i.path: i for i in theirs.items}
    items.update({i.path: i for i in ours.items})
    union = Manifest.from_items(ours.flavour, items.values(), created=now_utc(), name=ours.name,
                                external=set(ours.external) | set(theirs.external))
    union.write(ours_path)


def save_report(step: Step) -> int:
    state = _read_state(step) or {}
    name = step.name
    uploaded = int(state.get("uploaded", 0))
    changed = bool(state.get("uploaded_ok"))
    step.outputs.update({"changed": "true" if changed else "false",
                         "upload-bytes": str(uploaded),
                         "generation": str(state.get("generation") or "")})
    rows = [tuple(r) for r in state.get("rows", [])]
    rows += [("uploaded", f"{uploaded:,} bytes" if changed else "nothing"),
             ("cache generation", state.get("generation")),
             ("slots used", state.get("slots"))]
    if state.get("attempt_key"):
        step.annotate("warning", "the cache did not take this save's entry (another job "
                      "kept the slot, or the upload failed); the next run saves again")
    step.summary += _table(f"incstore save `{name}`", rows)
    return 0


# entry point --------------------------------------------------------------------------

VERBS: dict[str, Callable[[Step], int]] = {
    "restore-prepare": restore_prepare, "restore-plan": restore_plan, "restore": restore,
    "save": save, "save-restage": save_restage, "save-check": save_check,
    "save-report": save_report,
}


def main(argv: list[str], env: Mapping[str, str]) -> int:
    if len(argv) != 1 or argv[0] not in VERBS:
        print(f"usage: python -m incstore.actionstep {'|'.join(VERBS)}", file=sys.stderr)
        return 2
    verb = argv[0]
    step = Step(env, {}, [])
    started = time.monotonic()
    code = 0
    try:
        code = VERBS[verb](step)
    except InputError as e:
        step.annotate("error", str(e), f"incstore {verb}: invalid input")
        code = 1
    except IncstoreError as e:
        fail_on = env.get("INCSTORE_FAIL_ON", "never")
        code = _problem(step, e.exit_code, f"{verb}: {e}",
                        fail_on if fail_on in FAIL_ON else "never")
    except Exception as e:
        if env.get("INCSTORE_DEBUG"):
            raise
        step.annotate("warning", f"{verb}: internal error {type(e).__name__}: {e} (a bug; "
                      "INCSTORE_DEBUG=1 shows the traceback)")
        code = 0
    step.outputs.setdefault("seconds", f"{time.monotonic() - started:.2f}")
    try:
        step.finish()
    except OSError as e:
        print(f"::warning::cannot write the step's outputs: {escape(str(e))}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))
