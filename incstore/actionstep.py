"""Action step: what the `run:` steps of the composite actions in `.github/actions/` do, a thin
front end over `transfer` (which cache entries exist and what goes up), `restore` and `save`.

Each verb reads its inputs from `INCSTORE_*` environment variables (never from expressions
expanded into a script), writes step outputs to `$GITHUB_OUTPUT`, a table to
`$GITHUB_STEP_SUMMARY`, and problems as workflow commands (`::warning::`, `::error::`), with
everything quoted from input escaped. A cache problem is a cache miss: unless the user asked
for `fail-on`, a verb warns and exits 0, so the job goes on and the daemon substitutes or
builds what the cache could not give. No input and no cache state ends in a traceback.

Verbs, in the order the actions run them (see `transfer` for the entries):
- `restore-prepare`: validate the inputs; name the index lookup.
- `restore-plan`: after the newest index is restored, name its chain's content entries.
- `restore`: merge the chain into the chunk store, restore the manifest into the store, and
  record the state a later save in the job starts from.
- `save-prepare`: whether this run saves; when no restore ran in this job, the same index
  lookup, so that the save can read what the cache holds before it adds to it.
- `save-catch-up`: after that lookup and its chain: merge, and record the state.
- `save`: save the store and gc; stage what changed since the state (or a base).
- `save-index`: after the content entry went up and was looked up: stage nothing when it is
  not there (refused or held), else name the newest-index lookup.
- `save-stage-index`: stage the index naming this save's chain and what the newest index
  names that this save did not see.
- `save-recheck`: after the index went up, the newest index again: if another save's index
  came in meanwhile and does not name ours, stage one that names both.
- `save-report`: the save's outputs and summary.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from incstore import atomicfile, manifest, transfer, trust, units
from incstore.db import FLAVOURS
from incstore.errors import IncstoreError, InputError
from incstore.gc import execute_gc, plan_gc
from incstore.restore import execute_restore, load_manifest, plan_restore
from incstore.save import execute_save, plan_save, previous_manifest
from incstore.store import Store

FAIL_ON = ("never", "corrupt", "any")
SAVE_ON = ("any", "any-branch", "default-branch")  # any-branch: the name before PRs saved
# exit codes that mean the cache holds something wrong (not merely something missing)
CORRUPT_CODES = {3, 7, 8, 12, 14}
CHAIN_OUTPUTS = [f"c{n:02d}" for n in range(1, transfer.MAX_CHAIN + 1)]


def parse_days(text: str) -> float:
    """`30`, `30d`, `12h` (a duration; a bare number counts days) to days."""
    try:
        return units.parse_duration(text, default_unit="d") / 86400
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
    def name(self) -> str:
        return manifest.check_name(self.get("NAME", "default"))

    @property
    def flavour(self) -> str:
        return self.choice("FLAVOUR", tuple(FLAVOURS), "guix")

    @property
    def family(self) -> str:
        try:
            return transfer.family(self.get("RUNNER_OS", "Linux"),
                                   self.get("RUNNER_ARCH", "X64"), self.flavour)
        except ValueError as e:
            raise InputError(str(e)) from None

    @property
    def namespace(self) -> str:
        try:
            return transfer.check_namespace(self.get("KEY_PREFIX", "incstore"))
        except ValueError as e:
            raise InputError(str(e)) from None

    def unique(self) -> str:
        e = self.env
        return transfer.unique(f"{e.get('GITHUB_RUN_ID')}-{e.get('GITHUB_RUN_ATTEMPT')}-"
                               f"{e.get('GITHUB_JOB')}-{self.name}")

    def index_lookup(self) -> None:
        key, fallback = transfer.index_lookup(self.family, self.namespace)
        self.outputs.update({"index-key": key, "index-fallback": fallback})

    # the state one job's steps pass on (the restore's, then the save's) ---------------------
    def state_file(self) -> Path:
        return self.path("STATE") / f"{self.name}.json"

    def snapshot_file(self) -> Path:
        return self.path("STATE") / f"{self.name}.snapshot"

    def read_state(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.state_file().read_bytes()))
        except (OSError, ValueError, TypeError):
            return None

    def write_state(self, state: dict[str, Any]) -> None:
        atomicfile.write_bytes(self.state_file(), json.dumps(state).encode())

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


def _hand_back(step: Step) -> None:
    if (user := _user(step.env)) is not None:
        transfer.give_to(step.xfer, *user)


def _warn_refused(step: Step, problems: list[str]) -> None:
    """What the transfer directory held that the format does not allow: a warning each (the
    first ten), and those blobs or entries are a cache miss."""
    for problem in problems[:10]:
        step.annotate("warning", f"refused from the cache entry: {problem}")
    if len(problems) > 10:
        step.annotate("warning", f"... and {len(problems) - 10} more refused")


# restore ------------------------------------------------------------------------------


def restore_prepare(step: Step) -> int:
    step.name  # noqa: B018 (validation)
    step.choice("FAIL_ON", FAIL_ON, "never")
    step.choice("DB_MODE", ("auto", "swap", "in-place"), "auto")
    step.flag("LOOKUP_ONLY")
    if max_age := step.get("MAX_AGE"):
        try:
            units.parse_duration(max_age)
        except ValueError as e:
            raise InputError(f"max-age: {e}") from None
    if step.s3:
        step.outputs.update({"index-key": "", "index-fallback": ""})
        return 0
    step.index_lookup()
    transfer.clear(step.xfer)
    return 0


def _chain_of(step: Step) -> tuple[str, list[str]]:
    """The index restored into the transfer directory (its key from `MATCHED_KEY`) and its
    chain; ("", []) on a miss or an index that does not hold to the format (warned)."""
    key = step.get("MATCHED_KEY")
    if not key:
        return "", []
    try:
        return key, transfer.read_index(step.xfer, key).chain
    except IncstoreError as e:
        step.annotate("warning", f"the cache index is not usable (a cache miss): {e}")
        return "", []


def restore_plan(step: Step) -> int:
    """After the index entry is restored: the content entries of its chain, one output each."""
    _, chain = _chain_of(step)
    padded = chain + [""] * (len(CHAIN_OUTPUTS) - len(chain))
    step.outputs.update(dict(zip(CHAIN_OUTPUTS, padded, strict=True)))
    return 0


def _merge(step: Step) -> dict[str, Any]:
    """Merge the restored chain into the chunk store; the state a save starts from."""
    index, chain = _chain_of(step)
    merged = transfer.merge_chain(step.xfer, Path(step.cache), chain)
    _warn_refused(step, merged.problems)
    for name in merged.unions:
        step.annotate("notice", f"{name}: two saves that did not see each other wrote it; "
                      "restored as the union of their items")
    _hand_back(step)
    transfer.Snapshot.take(Path(step.cache)).write(step.snapshot_file())
    return {"index": index, "chain": merged.applied, "missing": merged.missing,
            "failed": [], "restored": False}


def restore(step: Step) -> int:
    fail_on = step.choice("FAIL_ON", FAIL_ON, "never")
    cache, name = step.cache, step.name
    step.path("STATE").mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"index": "", "chain": [], "missing": [], "failed": [],
                             "restored": False}
    if not step.s3:
        state = _merge(step)
    rows: list[tuple[str, Any]] = [
        ("cache index", state["index"] or "(none)"),
        ("content entries", f"{len(state['chain'])} restored" +
         (f", {len(state['missing'])} missing (evicted?)" if state["missing"] else ""))]
    step.outputs.update({"hit": "false", "restored": "0", "skipped": "0", "failed": "0",
                         "bytes": "0", "trusted": "false", "complete": "false",
                         "entries": str(len(state["chain"]))})
    roots = _roots(step)
    try:
        loaded, data, sig = load_manifest(cache, name=name, signed=roots.active)
    except IncstoreError as e:
        step.write_state(state)
        step.summary += _table(f"incstore restore `{name}`: cache miss",
                               [*rows, ("manifest", str(e))])
        return 0
    policy = trust.Policy(roots, expected_name=name,
                          max_age=units.parse_duration(a) if (a := step.get("MAX_AGE")) else None,
                          require_manifest=step.flag("REQUIRE_SIGNED_MANIFEST"))
    prefix = Path(step.get("PREFIX", "/"))
    db_path = Path(step.get("DB")) if step.get("DB") else None
    try:
        plan = plan_restore(loaded, prefix, cache, db_path=db_path,
                            db_mode=step.choice("DB_MODE", ("auto", "swap", "in-place"),
                                                "auto"),  # type: ignore[arg-type]
                            policy=policy, data=data, sig=sig)
        result = execute_restore(plan, jobs=os.cpu_count() or 2, fsync=step.flag("FSYNC"))
    except IncstoreError as e:
        step.write_state({**state, "failed": list(loaded.paths)})
        step.outputs.update({"hit": "true", "failed": str(len(loaded))})
        step.summary += _table(f"incstore restore `{name}`: not restored",
                               [*rows, ("error", str(e))])
        return _problem(step, e.exit_code, f"restore of {name} did not happen: {e}", fail_on)
    restored = set(result.extracted)
    failed = sorted({e.item for e in result.failed if e.item} | set(result.skipped))
    step.write_state({**state, "failed": failed, "restored": True})
    nar_bytes = sum(loaded.nar_size(n) for n in plan.to_extract if loaded.paths[n] in restored)
    present = len(plan.actions) - len(plan.to_extract)
    complete = present + len(result.registered) == len(plan.actions) and \
        not plan.missing_external
    step.outputs.update({
        "hit": "true", "restored": str(len(result.registered)), "skipped": str(present),
        "failed": str(len(failed)), "bytes": str(nar_bytes),
        "trusted": "true" if plan.trusted else "false",
        "complete": "true" if complete else "false"})
    for warning in result.warnings:
        step.annotate("warning", warning)
    step.summary += _table(f"incstore restore `{name}`", [
        *rows, ("items in manifest", len(plan.actions)),
        ("restored", len(result.registered)), ("already present", present),
        ("failed or skipped", len(failed)), ("NAR bytes restored", f"{nar_bytes:,}"),
        ("closure complete", "yes: every item of the manifest is valid in the store"
         if complete else "no: the daemon substitutes or builds what is missing"),
        ("registered in", f"{result.db_mode} mode"),
        ("trusted", "yes" if plan.trusted else "no" if plan.trust.active
         else "no (no trusted keys given)")])
    step.summary += [f"- `{e}`" for e in result.failed[:50]]
    error = result.error()
    if error is None:
        return 0
    for failure in result.failed[:10]:
        step.annotate("warning", str(failure), "incstore: not restored")
    more = f" (and {len(result.failed) - 10} more)" if len(result.failed) > 10 else ""
    return _problem(step, error.exit_code,
                    f"{len(failed)} item(s) of {name} were not restored{more}; the daemon "
                    f"substitutes or builds them: {error}", fail_on)


def _problem(step: Step, code: int, message: str, fail_on: str) -> int:
    """Report a problem; fail the step only if the user asked for it."""
    strict = fail_on == "any" or (fail_on == "corrupt" and code in CORRUPT_CODES)
    step.annotate("error" if strict else "warning", message)
    return code if strict else 0


def _roots(step: Step) -> trust.Roots:
    keys = [k for k in step.get("TRUSTED_KEYS").split() if k]
    acl = step.get("TRUST_GUIX_ACL", "false")
    acl_path = (trust.DEFAULT_GUIX_ACL if acl == "true" else None if acl == "false"
                else Path(acl))
    return trust.load_roots(keys, guix_acl=acl_path)


# save ---------------------------------------------------------------------------------


def _why_not_save(step: Step) -> str | None:
    """Why this job must not save, or None. Pull requests save by default: GitHub keeps
    what they write in the pull request's own scope, which nothing else reads."""
    if not step.flag("SAVE", True):
        return "save is false"
    save_on = step.choice("SAVE_ON", SAVE_ON, "any")
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


def save_prepare(step: Step) -> int:
    step.name, step.namespace, step.family  # noqa: B018 (validation)
    parse_days(step.get("KEEP_DAYS", "30"))
    _size(step)
    step.outputs.update({"save": "false", "catch-up": "false", "index-key": "",
                         "index-fallback": ""})
    why_not = _why_not_save(step)
    if why_not is not None:
        step.annotate("notice", f"not saving the cache: {why_not}")
        step.summary += _table(f"incstore save `{step.name}`: skipped", [("why", why_not)])
        return 0
    step.outputs["save"] = "true"
    if step.s3 or step.read_state() is not None:
        return 0
    # the restore did not run in this job (or failed before it recorded anything): read what
    # the cache holds first, so that this save adds to it and shrinks nothing
    step.outputs["catch-up"] = "true"
    step.index_lookup()
    transfer.clear(step.xfer)
    return 0


def save_catch_up(step: Step) -> int:
    step.path("STATE").mkdir(parents=True, exist_ok=True)
    step.write_state(_merge(step))
    return 0


def _size(step: Step) -> int:
    try:
        return units.parse_size(step.get("MAX_BYTES", "8GB"))
    except ValueError as e:
        raise InputError(f"max-bytes: {e}") from None


def save(step: Step) -> int:
    """Save the store and gc; stage the content entry (output `content-key`)."""
    from incstore import signature

    name, cache = step.name, step.cache
    keep = parse_days(step.get("KEEP_DAYS", "30"))
    flavour = FLAVOURS[step.flavour]
    excludes = [Path(p) for p in step.get("EXCLUDE_DB").splitlines() if p.strip()]
    step.outputs.update({"content-key": "", "items": "0", "written": "0", "bytes": "0",
                         "store-bytes": "0", "failed": "0"})
    state = step.read_state() if not step.s3 else {}
    if state is None:
        step.annotate("warning", "not saving the cache: what it holds could not be read "
                      "first (a save without it could replace it with a smaller one)")
        return 0
    prefix = Path(step.get("PREFIX", "/"))
    store = Store(prefix, flavour)
    db_path = Path(step.get("DB")) if step.get("DB") else store.default_db
    key_file = step.get("SIGN_KEY_FILE")
    secret = signature.read_secret_key(key_file) if key_file else None
    plan = plan_save(db_path, prefix, cache, exclude_dbs=excludes,
                     previous=previous_manifest(cache, name), carry_days=keep, keep_days=keep)
    result = execute_save(plan, None, name=name, jobs=os.cpu_count() or 2, sign_key=secret,
                          fsync=step.flag("FSYNC"))
    gc = execute_gc(plan_gc(cache, keep_days=keep, max_bytes=_size(step),
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
    if secret is None and step.env.get("GITHUB_EVENT_NAME", "").startswith("pull_request"):
        rows.append(("signed", "no (no signing key: a pull request from a fork gets no "
                     "secrets; restores that trust only your keys do not use these items)"))
    for e in result.failed[:50]:
        step.annotate("warning", f"not saved: {e}")
    if result.not_written is not None:
        step.annotate("warning", f"manifest {name} not written: {result.not_written}")
    if step.s3:
        step.summary += _table(f"incstore save `{name}`", rows)
        return 0
    root = Path(cache)
    restored = list(state.get("chain", []))
    base = transfer.is_base_due(restored)
    change = transfer.everything(root) if base else transfer.delta(
        root, transfer.Snapshot.read(step.snapshot_file()))
    state.update(rows=rows, content="", uploaded=0)
    if change:
        entry = transfer.Content(transfer.content_key(step.family, step.namespace,
                                                      step.unique()),
                                 "base" if base else "delta", restored, change.changed,
                                 change.deleted)
        state.update(content=entry.key, base=base,
                     staged=transfer.stage_content(root, step.xfer, entry))
        _hand_back(step)
        step.outputs["content-key"] = entry.key
    step.write_state(state)
    return 0


def save_index(step: Step) -> int:
    """After the content entry's upload and a lookup of its key (`FOUND`)."""
    state = step.read_state()
    step.outputs.update({"index-key": "", "index-fallback": ""})
    if not state or not state.get("content"):
        return 0
    if step.get("FOUND") != state["content"]:
        step.annotate("warning", "the cache did not take this save's entry (a refused or "
                      "held reservation, or a failed upload); the next save uploads its "
                      "items again")
        state["content"] = ""
        step.write_state(state)
        return 0
    state["uploaded"] = int(state.get("staged", 0))
    step.write_state(state)
    transfer.clear(step.xfer)
    step.index_lookup()
    return 0


def _newest(step: Step) -> transfer.Index | None:
    key = step.get("NEWEST")
    if not key:
        return None
    try:
        return transfer.read_index(step.xfer, key)
    except IncstoreError as e:
        step.annotate("warning", f"the newest cache index is not usable: {e}")
        return None


def _stage_index(step: Step, state: dict[str, Any], newest: transfer.Index | None) -> int:
    own = state["content"]
    restored = list(state.get("chain", []))
    chain = transfer.next_chain(restored, own, base=bool(state.get("base")),
                                newest=newest.chain if newest is not None else ())
    if chain is None:
        step.annotate("warning", "the cache index would name more entries than a restore "
                      "reads; this save's items are saved again by the next one")
        return 0
    index = transfer.Index(transfer.index_key(step.family, step.namespace, step.unique()),
                           chain)
    transfer.stage_index(step.xfer, index)
    _hand_back(step)
    state.setdefault("indexes", []).append(index.key)
    state["chain_now"] = chain
    step.write_state(state)
    step.outputs["index"] = index.key
    return 0


def save_stage_index(step: Step) -> int:
    """After the newest index (`NEWEST`) was restored: stage ours."""
    state = step.read_state()
    step.outputs["index"] = ""
    if not state or not state.get("content") or not state.get("uploaded"):
        return 0
    newest = _newest(step)
    if newest is not None and newest.key == state.get("index"):
        newest = None  # the index this save restored: nothing it did not see
    return _stage_index(step, state, newest)


def save_recheck(step: Step) -> int:
    """After our index went up, the newest index again (`NEWEST`): done if it is ours or
    names our entry, else one more index naming both."""
    state = step.read_state()
    step.outputs["index"] = ""
    if not state or not state.get("indexes"):
        return 0
    newest = _newest(step)
    if newest is None or newest.key in state["indexes"] or state["content"] in newest.chain:
        return 0
    step.annotate("notice", f"another save's index ({newest.key}) came in meanwhile; "
                  "writing one that names both")
    current = [k for k in state.get("chain_now", []) if k != state["content"]]
    return _stage_index(step, {**state, "base": False, "chain": current}, newest)


def save_report(step: Step) -> int:
    if step.get("SAVING") != "true":  # skipped (save-on, save: false) or stopped early
        step.outputs.update({"changed": "false", "upload-bytes": "0", "entries": ""})
        return 0
    state = step.read_state() or {}
    name = step.name
    uploaded = int(state.get("uploaded", 0))
    changed = bool(state.get("content")) and bool(uploaded)
    step.outputs.update({"changed": "true" if changed else "false",
                         "upload-bytes": str(uploaded if changed else 0),
                         "entries": str(len(state.get("chain_now", state.get("chain", []))))})
    rows = [tuple(r) for r in state.get("rows", [])]
    rows += [("uploaded", f"{uploaded:,} bytes ({'a base' if state.get('base') else 'a delta'})"
              if changed else "nothing"),
             ("cache index", (state.get("indexes") or ["(unchanged)"])[-1]),
             ("content entries named", len(state.get("chain_now", state.get("chain", []))))]
    step.summary += _table(f"incstore save `{name}`", rows)
    return 0


# entry point --------------------------------------------------------------------------

VERBS: dict[str, Callable[[Step], int]] = {
    "restore-prepare": restore_prepare, "restore-plan": restore_plan, "restore": restore,
    "save-prepare": save_prepare, "save-catch-up": save_catch_up, "save": save,
    "save-index": save_index, "save-stage-index": save_stage_index,
    "save-recheck": save_recheck, "save-report": save_report,
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
        code = e.exit_code
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
