"""Writes restore/action.yml and save/action.yml. Both actions restore a chain of up to
transfer.MAX_CHAIN content entries, one actions/cache step each, and pass the same
environment to every incstore step: written out by hand that is some 900 lines of YAML in
which one wrong step id loses a cache entry. tests/test_workflows.py checks that the
committed files are what this script writes.

    python3 .github/actions/generate.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from incstore.transfer import MAX_CHAIN  # noqa: E402 (the checkout's own package)

CACHE = "actions/cache@27d5ce7f107fe9357f9df03efb73ab90386fccae  # v5.0.5"
CACHE_RESTORE = "actions/cache/restore@27d5ce7f107fe9357f9df03efb73ab90386fccae  # v5.0.5"
CACHE_SAVE = "actions/cache/save@27d5ce7f107fe9357f9df03efb73ab90386fccae  # v5.0.5"
# as written, the same string on every runner: the cache version is a hash of the path as
# the inputs spell it, and a workspace-relative path lands in the same place everywhere
XFER_PATH = ".incstore-xfer"

COMMON_INPUTS = """\
  name:
    description: "Manifest name; workflows that should restore alike use the same one."
    default: "default"
  cache:
    description: "The chunk store: a directory on the runner, kept with actions/cache (the default), or s3://BUCKET/PREFIX (AWS_* variables in the environment), the way past GitHub's 10 GB."
    default: "~/.cache/incstore"
  key-prefix:
    description: "A namespace for this cache's entries (letters, digits, . _ + -). Nothing that invalidates needs to go here: the entry format, OS, CPU architecture and store flavour are in every key already, and the chunk store is content-addressed. A namespace with no entries yet starts from the newest of another."
    default: "incstore"
  flavour:
    description: "guix or nix."
    default: "guix"
  prefix:
    description: "Physical root of the store (items under PREFIX/gnu/store)."
    default: "/"
  db:
    description: "The daemon DB (default PREFIX/var/guix/db/db.sqlite)."
    default: ""
  sudo:
    description: "Run incstore as root through sudo when the runner user is not root (auto or false)."
    default: "auto"
  fsync:
    description: "true to make every file durable before it is named (a self-hosted runner that may lose power); by default, as the daemons: kill-safe, DB and manifests synced, files left to the page cache."
    default: "false"
"""

RESTORE_OUTPUTS = [
    ("hit", "Whether a manifest of that name was found.",
     "steps.run.outputs.hit || (steps.index.outputs.cache-matched-key != '' && 'true') || 'false'"),
    ("matched-key", "The cache index restored (empty on a miss).",
     "steps.index.outputs.cache-matched-key"),
    ("restored", "Items extracted, verified and registered.",
     "steps.run.outputs.restored"),
    ("skipped", "Items already present in the store.",
     "steps.run.outputs.skipped"),
    ("failed", "Items that could not be restored (or were refused).",
     "steps.run.outputs.failed"),
    ("bytes", "NAR bytes restored.",
     "steps.run.outputs.bytes"),
    ("trusted", "Whether every restored item was vouched for by a trusted key.",
     "steps.run.outputs.trusted"),
    ("complete", "Whether every item of the manifest is valid in the store after the restore (its closure is complete).",
     "steps.run.outputs.complete"),
    ("entries", "Content entries of the cache restored.",
     "steps.run.outputs.entries"),
]

RESTORE_HEAD = """\
name: incstore restore
description: >-
  Restore a Guix (or Nix) store from an incstore chunk store kept with actions/cache:
  only the missing items are extracted, each verified against its NAR sha256 (and,
  with trusted keys, its signature), and registered in the daemon DB. A cache problem
  is a warning: the job goes on and the daemon substitutes or builds the rest.
inputs:
""" + COMMON_INPUTS + """\
  db-mode:
    description: "auto (swap the DB if no daemon session runs, else register in the live DB), swap, or in-place."
    default: "auto"
  fail-on:
    description: "never (a cache problem is a warning and the job goes on), corrupt (fail when the cache holds something wrong or untrusted), or any."
    default: "never"
  lookup-only:
    description: "Only check whether a cache index exists (outputs hit, matched-key)."
    default: "false"
  trusted-keys:
    description: "Public keys to trust, space- or newline-separated (NAME:base64, or paths of key files). With any, only what they signed is restored."
    default: ""
  trust-guix-acl:
    description: "true to trust the keys in /etc/guix/acl, or the path of an ACL file."
    default: "false"
  max-age:
    description: "Refuse a signed manifest older than this (e.g. 30d)."
    default: ""
  require-signed-manifest:
    description: "Refuse unless the manifest itself is signed by a trusted key."
    default: "false"
"""

SAVE_OUTPUTS = [
    ("changed", "Whether anything was uploaded.",
     "steps.report.outputs.changed"),
    ("items", "Items in the manifest.",
     "steps.run.outputs.items"),
    ("written", "New chunks written.",
     "steps.run.outputs.written"),
    ("bytes", "Compressed bytes of new chunks.",
     "steps.run.outputs.bytes"),
    ("upload-bytes", "Bytes uploaded to the cache.",
     "steps.report.outputs.upload-bytes"),
    ("store-bytes", "Bytes of chunks the chunk store holds after gc.",
     "steps.run.outputs.store-bytes"),
    ("failed", "Items that could not be saved.",
     "steps.run.outputs.failed"),
    ("entries", "Content entries the cache index names after this save.",
     "steps.report.outputs.entries"),
]

SAVE_HEAD = """\
name: incstore save
description: >-
  Save the store into the incstore chunk store (only new items are compressed),
  record the manifest under its name, collect garbage, and upload to actions/cache
  only what changed since the restore, as an entry of its own. Use it after the last
  step that creates store items, with `if: always()`.
inputs:
""" + COMMON_INPUTS + """\
  exclude-db:
    description: "Daemon DBs whose valid paths are left out (e.g. the installer's), one per line."
    default: ""
  keep-days:
    description: "Keep a manifest not saved for this long (days, or e.g. 30d); items a failed restore could not bring back are kept as long. An unchanged manifest is rewritten at least four times within it."
    default: "30"
  max-bytes:
    description: "gc then drops the oldest manifests while the chunks take more than this (e.g. 8GB)."
    default: "8GB"
  save:
    description: "false to only restore in this job."
    default: "true"
  save-on:
    description: "any (every run saves in its own scope: a pull request into the pull request's, which only it reads) or default-branch."
    default: "any"
  signing-key:
    description: "A secret key (the key file's content, from a secret) to sign narinfos and the manifest with."
    default: ""
"""

SETUP = """\
runs:
  using: composite
  steps:
    - id: env
      shell: bash
      env:
        ACTION_PATH: ${{ github.action_path }}
        RUNNER_OS_NAME: ${{ runner.os }}
        INCSTORE_CACHE: ${{ inputs.cache }}
      run: '"$ACTION_PATH/../setup.sh" check'
    - id: wheels
      if: steps.env.outputs.ready != 'true'
      uses: CACHE_ACTION
      with:
        path: ~/.cache/incstore-wheels
        key: incstore-wheels-${{ runner.os }}-${{ runner.arch }}-${{ steps.env.outputs.tag }}
    - id: setup
      shell: bash
      env:
        ACTION_PATH: ${{ github.action_path }}
        INCSTORE_CACHE: ${{ inputs.cache }}
      run: '"$ACTION_PATH/../setup.sh" install'
""".replace("CACHE_ACTION", CACHE)

ENV = {
    "ACTION_PATH": "${{ github.action_path }}",
    "INCSTORE_PYTHON": "${{ steps.setup.outputs.python }}",
    "INCSTORE_NAME": "${{ inputs.name }}",
    "INCSTORE_CACHE": "${{ inputs.cache }}",
    "INCSTORE_KEY_PREFIX": "${{ inputs.key-prefix }}",
    "INCSTORE_FLAVOUR": "${{ inputs.flavour }}",
    "INCSTORE_RUNNER_OS": "${{ runner.os }}",
    "INCSTORE_RUNNER_ARCH": "${{ runner.arch }}",
    "INCSTORE_XFER": "${{ github.workspace }}/" + XFER_PATH,
    "INCSTORE_STATE": "${{ runner.temp }}/incstore-state",
    "INCSTORE_SUDO": "${{ inputs.sudo }}",
    "INCSTORE_PREFIX": "${{ inputs.prefix }}",
    "INCSTORE_DB": "${{ inputs.db }}",
    "INCSTORE_FSYNC": "${{ inputs.fsync }}",
}
RESTORE_ENV = {
    "INCSTORE_DB_MODE": "${{ inputs.db-mode }}",
    "INCSTORE_FAIL_ON": "${{ inputs.fail-on }}",
    "INCSTORE_LOOKUP_ONLY": "${{ inputs.lookup-only }}",
    "INCSTORE_TRUSTED_KEYS": "${{ inputs.trusted-keys }}",
    "INCSTORE_TRUST_GUIX_ACL": "${{ inputs.trust-guix-acl }}",
    "INCSTORE_MAX_AGE": "${{ inputs.max-age }}",
    "INCSTORE_REQUIRE_SIGNED_MANIFEST": "${{ inputs.require-signed-manifest }}",
}
SAVE_ENV = {
    "INCSTORE_EXCLUDE_DB": "${{ inputs.exclude-db }}",
    "INCSTORE_KEEP_DAYS": "${{ inputs.keep-days }}",
    "INCSTORE_MAX_BYTES": "${{ inputs.max-bytes }}",
    "INCSTORE_SAVE": "${{ inputs.save }}",
    "INCSTORE_SAVE_ON": "${{ inputs.save-on }}",
}


def outputs(rows: list[tuple[str, str, str]]) -> str:
    return "outputs:\n" + "".join(f"  {name}:\n    description: \"{text}\"\n"
                                   f"    value: ${{{{ {value} }}}}\n"
                                   for name, text, value in rows)


def incstore_step(step_id: str, verb: str, condition: str | None, env: dict[str, str]) -> str:
    lines = [f"    - id: {step_id}"]
    if condition:
        lines.append(f"      if: {condition}")
    lines += ["      shell: bash", "      env:"]
    lines += [f"        {k}: {v}" for k, v in {**ENV, **env}.items()]
    lines.append(f"      run: '\"$ACTION_PATH/../run.sh\" {verb}'")
    return "\n".join(lines) + "\n"


def cache_step(step_id: str, uses: str, condition: str, **with_: str) -> str:
    lines = [f"    - id: {step_id}", f"      if: {condition}", f"      uses: {uses}",
             "      with:", f"        path: {XFER_PATH}"]
    lines += [f"        {k.replace('_', '-')}: {v}" for k, v in with_.items()]
    return "\n".join(lines) + "\n"


def chain(prefix: str, plan: str) -> str:
    """One restore step per content entry the plan names."""
    return "".join(
        cache_step(f"{prefix}{n:02d}", CACHE_RESTORE,
                   f"steps.{plan}.outputs.c{n:02d} != ''",
                   key=f"${{{{ steps.{plan}.outputs.c{n:02d} }}}}")
        for n in range(1, MAX_CHAIN + 1))


def restore_action() -> str:
    found = "${{ steps.index.outputs.cache-matched-key }}"
    return (RESTORE_HEAD + outputs(RESTORE_OUTPUTS) + SETUP
            + incstore_step("prepare", "restore-prepare", None, RESTORE_ENV)
            + cache_step("index", CACHE_RESTORE, "steps.prepare.outputs.index-key != ''",
                         key="${{ steps.prepare.outputs.index-key }}",
                         restore_keys="${{ steps.prepare.outputs.index-fallback }}",
                         lookup_only="${{ inputs.lookup-only }}")
            + incstore_step("plan", "restore-plan",
                            "steps.index.outputs.cache-matched-key != '' && "
                            "inputs.lookup-only != 'true'",
                            {**RESTORE_ENV, "INCSTORE_MATCHED_KEY": found})
            + chain("c", "plan")
            + incstore_step("run", "restore", "inputs.lookup-only != 'true'",
                            {**RESTORE_ENV, "INCSTORE_MATCHED_KEY": found}))


def save_action() -> str:
    saving = "steps.prepare.outputs.save == 'true'"
    catching = "steps.prepare.outputs.catch-up == 'true'"
    caught = "${{ steps.catch-index.outputs.cache-matched-key }}"
    content = "steps.run.outputs.content-key != ''"
    staged = "steps.stage.outputs.index != ''"
    signing = {**SAVE_ENV, "INCSTORE_SIGNING_KEY": "${{ inputs.signing-key }}"}
    return (SAVE_HEAD + outputs(SAVE_OUTPUTS) + SETUP
            + incstore_step("prepare", "save-prepare", None, SAVE_ENV)
            # the restore did not run in this job: read what the cache holds first
            + cache_step("catch-index", CACHE_RESTORE, catching,
                         key="${{ steps.prepare.outputs.index-key }}",
                         restore_keys="${{ steps.prepare.outputs.index-fallback }}")
            + incstore_step("catch-plan", "restore-plan",
                            f"{catching} && steps.catch-index.outputs.cache-matched-key != ''",
                            {**SAVE_ENV, "INCSTORE_MATCHED_KEY": caught})
            + chain("k", "catch-plan")
            + incstore_step("catch-up", "save-catch-up", catching,
                            {**SAVE_ENV, "INCSTORE_MATCHED_KEY": caught})
            + incstore_step("run", "save", saving, signing)
            + cache_step("upload", CACHE_SAVE, content,
                         key="${{ steps.run.outputs.content-key }}")
            # visible only once finalized: a refused, failed or held upload is not there
            + cache_step("verify", CACHE_RESTORE, content,
                         key="${{ steps.run.outputs.content-key }}", lookup_only="true")
            + incstore_step("index", "save-index", content,
                            {**SAVE_ENV,
                             "INCSTORE_FOUND": "${{ steps.verify.outputs.cache-matched-key }}"})
            + cache_step("newest", CACHE_RESTORE, "steps.index.outputs.index-key != ''",
                         key="${{ steps.index.outputs.index-key }}",
                         restore_keys="${{ steps.index.outputs.index-fallback }}")
            + incstore_step("stage", "save-stage-index", "steps.index.outputs.index-key != ''",
                            {**SAVE_ENV,
                             "INCSTORE_NEWEST": "${{ steps.newest.outputs.cache-matched-key }}"})
            + cache_step("upload-index", CACHE_SAVE, staged,
                         key="${{ steps.stage.outputs.index }}")
            # another save's index may have come in while ours went up
            + cache_step("recheck", CACHE_RESTORE, staged,
                         key="${{ steps.index.outputs.index-key }}",
                         restore_keys="${{ steps.index.outputs.index-fallback }}")
            + incstore_step("restage", "save-recheck", staged,
                            {**SAVE_ENV,
                             "INCSTORE_NEWEST": "${{ steps.recheck.outputs.cache-matched-key }}"})
            + cache_step("upload-index2", CACHE_SAVE, "steps.restage.outputs.index != ''",
                         key="${{ steps.restage.outputs.index }}")
            + incstore_step("report", "save-report", "always()",
                            {**SAVE_ENV,
                             "INCSTORE_SAVING": "${{ steps.prepare.outputs.save }}"}))


def main() -> None:
    out = Path(os.environ.get("INCSTORE_ACTIONS_OUT", HERE))
    (out / "restore" / "action.yml").write_text(restore_action())
    (out / "save" / "action.yml").write_text(save_action())


if __name__ == "__main__":
    main()
