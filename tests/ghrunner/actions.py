"""Actions implemented in Python: the built-in ``actions/checkout`` and ``actions/cache``
(``/restore``, ``/save``), and the interface a test uses to plug in its own.

A Python action receives an :class:`ActionContext`, the emulator's view of what a JavaScript
action sees through @actions/core: ``INPUT_*`` inputs, outputs and state written to the step's
file-command files, annotations, ``exportVariable``/``addPath``, and processes run inside the
job's machine as the ``runner`` user (as a node action's children are).

The cache action is actions/cache v5.0.5's ``src/restoreImpl.ts`` and ``src/saveImpl.ts`` in
Python around the real client: their ``restoreCache``/``saveCache`` calls run npm's
``@actions/cache`` 5.0.5 (through ``tests/ghcache/driver.js``, with node, tar and zstd of the
job's machine, as runner) against the GitHub object's cache service stand-in
(:class:`tests.ghcache.CacheServer`), its log lines and workflow commands going to the step's
log. What stays here is the action's own logic, message for message: ``cache-hit`` is left unset
on a miss; the combined action records the primary and matched key as state and its post step
(``post-if: success()``) skips saving when the primary key was hit; ``lookup-only``;
``fail-on-cache-miss``; a failed save is the client's info or warning and the step still
succeeds (``actions/cache/save`` adds the warning ``Cache save failed.``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..ghcache.client import ClientMissing, driver_args, install_into, require_client
from .cache import CacheService
from .commands import format_command
from .machine import RUNNER_USER

if TYPE_CHECKING:
    from .machine import Machine
    from .runner import JobRun, StepResult


class ActionFailed(Exception):
    """Raise from a Python action to fail its step with this message (core.setFailed)."""


@dataclass
class PythonAction:
    """An action implemented in Python: ``main`` (and an optional ``post`` run at the end of the
    job when ``post_if`` holds). ``inputs`` maps input names to defaults (None: no default), like
    an action.yml's inputs; None accepts any input without warnings."""

    main: Callable[[ActionContext], None]
    post: Callable[[ActionContext], None] | None = None
    post_if: str = "always()"
    inputs: Mapping[str, str | None] | None = None
    deprecated: Mapping[str, str] = field(default_factory=dict)

    def run(self, ctx: ActionContext, stage: str) -> None:
        for name, message in self.deprecated.items():
            if stage == "main" and ctx.given(name):
                ctx.warning(f"Input '{name}' has been deprecated with message: {message}")
        fn = self.main if stage == "main" else self.post
        assert fn is not None
        fn(ctx)


def as_python_action(impl: Any) -> PythonAction:
    if isinstance(impl, PythonAction):
        return impl
    if callable(impl):
        return PythonAction(main=impl)
    raise TypeError(f"not an action implementation: {impl!r}")


class ActionContext:
    """What a Python action can do (the @actions/core and @actions/exec subset)."""

    def __init__(self, job: JobRun, result: StepResult, inputs: dict[str, str],
                 env: dict[str, str], state: dict[str, str], stage: str, uses: str,
                 files: Mapping[str, str], given: set[str] | None = None) -> None:
        self.job = job
        self.given_inputs = {g.lower() for g in (given or set())}
        self.result = result
        self.inputs = inputs
        self.env = env
        self.state = state
        self.stage = stage
        self.uses = uses
        self.files = files
        self.failed = False

    # -- where ---------------------------------------------------------------------------------

    @property
    def machine(self) -> Machine:
        assert self.job.machine is not None
        return self.job.machine

    @property
    def workspace(self) -> str:
        return self.env["GITHUB_WORKSPACE"]

    @property
    def temp(self) -> str:
        return self.env["RUNNER_TEMP"]

    @property
    def actions_dir(self) -> str:
        """Where the runner downloads actions (``_actions``)."""
        from .runner import ACTIONS_DIR
        return ACTIONS_DIR

    @property
    def github(self) -> dict[str, Any]:
        return self.job.github_ctx

    @property
    def cache(self) -> CacheService:
        return self.job.gh.cache

    @property
    def cache_scopes(self) -> list[str]:
        """The scopes this run may restore from, in lookup order."""
        return self.job.spec.cache_scopes

    @property
    def cache_scope(self) -> str:
        """The scope this run's saves go to: its GITHUB_REF (refs/pull/N/merge for a PR)."""
        return self.job.spec.event.ref

    def path(self, machine_path: str) -> Path:
        return self.machine.path(machine_path)

    def mkdtemp(self) -> str:
        """@actions/cache's createTempDirectory: $RUNNER_TEMP/<uuid>, owned by runner."""
        path = f"{self.temp}/{uuid.uuid4()}"
        host = self.path(path)
        host.mkdir(parents=True)
        self.machine.chown_runner(path)
        return path

    # -- inputs, outputs, state ----------------------------------------------------------------

    def given(self, name: str) -> bool:
        """Whether the step's ``with:`` set this input."""
        return name.lower() in self.given_inputs

    def get_input(self, name: str, required: bool = False, trim: bool = True) -> str:
        value = self.env.get(f"INPUT_{name.replace(' ', '_').upper()}", "")
        if required and not value:
            raise ActionFailed(f"Input required and not supplied: {name}")
        return value.strip() if trim else value

    def get_input_list(self, name: str, required: bool = False) -> list[str]:
        """actions/cache's getInputAsArray: lines, ``! x`` made ``!x``, trimmed, non-empty."""
        lines = self.get_input(name, required).split("\n")
        out = []
        for line in lines:
            s = line
            if s.startswith("!"):
                s = "!" + s[1:].lstrip()
            s = s.strip()
            if s:
                out.append(s)
        return out

    def get_bool(self, name: str) -> bool:
        return self.get_input(name).lower() == "true"

    def _append_file(self, which: str, name: str, value: str) -> None:
        delimiter = f"ghadelimiter_{uuid.uuid4()}"
        host = self.path(self.files[which])
        with open(host, "a") as f:
            f.write(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")

    def set_output(self, name: str, value: str) -> None:
        self._append_file("output", name, str(value))

    def save_state(self, name: str, value: str) -> None:
        self._append_file("state", name, str(value))

    def get_state(self, name: str) -> str:
        return self.env.get(f"STATE_{name}", "")

    def export_variable(self, name: str, value: str) -> None:
        self.env[name] = value
        self._append_file("env", name, value)

    def add_path(self, directory: str) -> None:
        with open(self.path(self.files["path"]), "a") as f:
            f.write(directory + "\n")
        self.env["PATH"] = f"{directory}:{self.env.get('PATH', '')}"

    def add_mask(self, value: str) -> None:
        self.job.masker.add(value)

    def summary(self, markdown: str) -> None:
        with open(self.path(self.files["step_summary"]), "a") as f:
            f.write(markdown)

    # -- logging -------------------------------------------------------------------------------

    def info(self, message: str) -> None:
        for line in str(message).split("\n"):
            self.job.write(self.result, line)

    def debug(self, message: str) -> None:
        if self.job.gh.debug:
            self.job.write(self.result, f"##[debug]{message}")

    def warning(self, message: str, **props: Any) -> None:
        self.job.annotate(self.result, "warning", message, **props)

    def error(self, message: str, **props: Any) -> None:
        self.job.annotate(self.result, "error", message, **props)

    def notice(self, message: str, **props: Any) -> None:
        self.job.annotate(self.result, "notice", message, **props)

    def set_failed(self, message: str) -> None:
        self.failed = True
        self.error(message)

    def command(self, name: str, message: str = "", **props: str) -> str:
        return format_command(name, message, **props)

    # -- processes -----------------------------------------------------------------------------

    def which(self, tool: str) -> str | None:
        return self.machine.which(tool, self.env.get("PATH", ""))

    def exec(self, argv: list[str], *, cwd: str | None = None, user: str = RUNNER_USER,
             env: Mapping[str, str] | None = None) -> int:
        """@actions/exec: echo ``[command]...``, stream the output to the log, return the exit
        code (the process runs inside the job's machine, as runner by default)."""
        self.info(f"[command]{' '.join(argv)}")
        code, _ = self.job.execute_process(argv, dict(env or self.env), cwd or self.workspace,
                                           self.result, self.job.gh.step_timeout, user=user)
        return -1 if code is None else code

    def capture(self, argv: list[str], *, cwd: str | None = None, user: str = RUNNER_USER,
                input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run quietly inside the machine and return its output."""
        return self.machine.run(argv, user=user, cwd=cwd or self.workspace, env=self.env,
                                input=input)


# --- actions/checkout ---------------------------------------------------------------------------

CHECKOUT_INPUTS: dict[str, str | None] = {
    "repository": "${{ github.repository }}", "ref": None, "token": "${{ github.token }}",
    "ssh-key": None, "ssh-known-hosts": None, "ssh-strict": "true", "ssh-user": "git",
    "persist-credentials": "true", "path": None, "clean": "true", "filter": None,
    "sparse-checkout": None, "sparse-checkout-cone-mode": "true", "fetch-depth": "1",
    "fetch-tags": "false", "show-progress": "true", "lfs": "false", "submodules": "false",
    "set-safe-directory": "true", "github-server-url": None,
}


def checkout_main(ctx: ActionContext) -> None:
    """Copy the registered source tree into the workspace (or ``path`` under it)."""
    from .runner import copy_tree

    repository = ctx.get_input("repository") or ctx.github["repository"]
    job = ctx.job
    source = job.gh.sources.get(repository)
    if source is None and repository.lower() == job.gh.repository.lower():
        source = job.spec.source
    if source is None:
        raise ActionFailed(f"The emulator has no source tree for {repository}: pass source= to "
                           f"GitHub.run or set GitHub.sources[{repository!r}]")
    workspace_parent = os.path.dirname(ctx.workspace)
    target = os.path.normpath(os.path.join(ctx.workspace, ctx.get_input("path")))
    if not (target + "/").startswith(workspace_parent + "/"):
        raise ActionFailed(f"Repository path '{target}' is not under '{workspace_parent}'")
    ctx.info(f"Syncing repository: {repository}")
    host = ctx.path(target)
    if ctx.get_bool("clean") and host.exists():
        for child in host.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    copy_tree(Path(source), host)
    ctx.machine.chown_runner(target)
    if shutil.which("git"):
        branch = job.spec.event.ref_name if job.spec.event.ref_type == "branch" else "main"
        env = dict(ctx.env, GIT_AUTHOR_NAME="GitHub", GIT_AUTHOR_EMAIL="noreply@github.com",
                   GIT_COMMITTER_NAME="GitHub", GIT_COMMITTER_EMAIL="noreply@github.com")
        script = ("git init -q && git checkout -q -b \"$BRANCH\" && git add -A && "
                  "git commit -q --allow-empty -m checkout && "
                  "git remote add origin \"https://github.com/$REPOSITORY\"")
        ctx.machine.run(["/bin/sh", "-c", script], user=RUNNER_USER, cwd=target,
                        env=dict(env, BRANCH=branch.replace("/", "-"), REPOSITORY=repository))
        if ctx.get_bool("persist-credentials"):
            header = "AUTHORIZATION: basic " + _basic_token(ctx.get_input("token"))
            ctx.add_mask(header.split(" ", 2)[2])
            ctx.machine.run(["git", "config", "--local", "http.https://github.com/.extraheader",
                             header], user=RUNNER_USER, cwd=target, env=env)
    ctx.info(f"Checked out {repository} into {target}")


def _basic_token(token: str) -> str:
    import base64
    return base64.b64encode(f"x-access-token:{token}".encode()).decode()


# --- actions/cache ----------------------------------------------------------------------------

CACHE_INPUTS: dict[str, str | None] = {
    "path": None, "key": None, "restore-keys": None, "upload-chunk-size": None,
    "enableCrossOsArchive": "false", "fail-on-cache-miss": "false", "lookup-only": "false",
    "save-always": "false",
}
RESTORE_INPUTS: dict[str, str | None] = {
    "path": None, "key": None, "restore-keys": None, "enableCrossOsArchive": "false",
    "fail-on-cache-miss": "false", "lookup-only": "false",
}
SAVE_INPUTS: dict[str, str | None] = {
    "path": None, "key": None, "upload-chunk-size": None, "enableCrossOsArchive": "false",
}
SAVE_ALWAYS_DEPRECATION = (
    "save-always does not work as intended and will be removed in a future release.\n"
    "A separate `actions/cache/restore` step should be used instead.\n"
    "See https://github.com/actions/cache/tree/main/save#always-save-cache for more details.\n")
STATE_PRIMARY_KEY = "CACHE_KEY"
STATE_MATCHED_KEY = "CACHE_RESULT"


class ClientError(Exception):
    """What @actions/cache's restoreCache or saveCache threw (ValidationError, a path error...);
    the action handles it as the TypeScript does (setFailed on restore, a warning on save)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def is_exact_key_match(key: str, cache_key: str | None) -> bool:
    """localeCompare(..., {sensitivity: 'accent'}) == 0: equal but for case."""
    return bool(cache_key) and cache_key is not None and cache_key.casefold() == key.casefold()


def log_warning(ctx: ActionContext, message: str) -> None:
    """actions/cache's utils.logWarning: an info line, not an annotation."""
    ctx.info(f"[warning]{message}")


def get_input_as_int(ctx: ActionContext, name: str) -> int | None:
    """actions/cache's getInputAsInt: parseInt, undefined when NaN or negative."""
    match = re.match(r"\s*([+-]?\d+)", ctx.get_input(name))
    if match is None or int(match.group(1)) < 0:
        return None
    return int(match.group(1))


def _client_in_machine(ctx: ActionContext) -> tuple[str, str, str]:
    """(node, preload.js, driver.js) as paths inside the job's machine, the client put under
    ``_actions/actions/cache/<ref>/`` on first use, where the runner downloads the action."""
    modules = require_client()
    node = shutil.which("node")
    if node is None or ctx.machine.path(node) != Path(node):
        raise ActionFailed(f"node ({node}) is not visible inside the job's machine: the "
                           f"emulator runs the host's node there, as the runner runs its own")
    ref = ctx.uses.partition("@")[2] or "main"
    base = f"{ctx.actions_dir}/actions/cache/{ref}"
    host = ctx.path(base)
    if not (host / "node_modules").is_dir():
        install_into(host, modules)
        # the files are hard links to the install: read-only inside the job, a step's
        # `sudo chown -R runner ~` cannot reach the install through them
        ctx.machine.bind_readonly(f"{base}/node_modules")
    return node, f"{base}/preload.js", f"{base}/driver.js"


def run_client(ctx: ActionContext, args: list[str]) -> dict[str, Any]:
    """Run @actions/cache (driver.js) in the job's machine as runner, with the action's
    environment, its output going to the step's log through the workflow-command processor as
    a node action's does; returns the call's result."""
    node, preload, driver = _client_in_machine(ctx)
    result_file = f"{ctx.temp}/{uuid.uuid4()}.ghcache.json"
    argv = [node, "--require", preload, driver, *args, "--result-file", result_file]
    code, _ = ctx.job.execute_process(argv, ctx.env, ctx.workspace, ctx.result,
                                      ctx.job.gh.step_timeout, user=RUNNER_USER)
    host = ctx.path(result_file)
    try:
        if code is None:
            raise ActionFailed("The action has timed out.")
        if code != 0 or not host.is_file():
            raise ActionFailed(f"The @actions/cache client (node) exited with code {code}")
        return dict(json.loads(host.read_text()))
    finally:
        host.unlink(missing_ok=True)


def _raise_client_error(result: dict[str, Any]) -> None:
    error = result.get("error")
    if error:
        raise ClientError(str(error.get("name")), str(error.get("message")))


def restore_cache(ctx: ActionContext, paths: list[str], primary_key: str,
                  restore_keys: list[str], lookup_only: bool, cross_os: bool) -> str | None:
    """@actions/cache's restoreCache(paths, key, restoreKeys, {lookupOnly}, crossOs)."""
    result = run_client(ctx, driver_args("restore", paths, primary_key,
                                         restore_keys=restore_keys, lookup_only=lookup_only,
                                         cross_os=cross_os))
    _raise_client_error(result)
    return result.get("matchedKey") or None


def save_cache(ctx: ActionContext, paths: list[str], key: str, cross_os: bool) -> int:
    """@actions/cache's saveCache(paths, key, {uploadChunkSize}, crossOs)."""
    result = run_client(ctx, driver_args("save", paths, key, cross_os=cross_os,
                                         upload_chunk_size=get_input_as_int(
                                             ctx, "upload-chunk-size")))
    _raise_client_error(result)
    return int(result.get("cacheId", -1))


def restore_impl(ctx: ActionContext, restore_only: bool) -> None:
    """restoreImpl.ts with StateProvider (combined action) or NullStateProvider (restore)."""

    def set_state(key: str, value: str) -> None:
        if restore_only:
            output = {STATE_PRIMARY_KEY: "cache-primary-key",
                      STATE_MATCHED_KEY: "cache-matched-key"}[key]
            ctx.set_output(output, value)
        else:
            ctx.save_state(key, value)

    try:
        if not ctx.env.get("GITHUB_REF"):
            log_warning(ctx, f"Event Validation Error: The event type "
                             f"{ctx.env.get('GITHUB_EVENT_NAME')} is not supported because it's "
                             f"not tied to a branch or tag ref.")
            return
        primary_key = ctx.get_input("key", required=True)
        set_state(STATE_PRIMARY_KEY, primary_key)
        restore_keys = ctx.get_input_list("restore-keys")
        paths = ctx.get_input_list("path", required=True)
        cross_os = ctx.get_bool("enableCrossOsArchive")
        fail_on_miss = ctx.get_bool("fail-on-cache-miss")
        lookup_only = ctx.get_bool("lookup-only")
        cache_key = restore_cache(ctx, paths, primary_key, restore_keys, lookup_only, cross_os)
        if not cache_key:
            # cache-hit is intentionally not set to false here (actions/cache#1466)
            if fail_on_miss:
                raise ActionFailed(f"Failed to restore cache entry. Exiting as fail-on-cache-miss "
                                   f"is set. Input key: {primary_key}")
            ctx.info(f"Cache not found for input keys: {', '.join([primary_key, *restore_keys])}")
            return
        set_state(STATE_MATCHED_KEY, cache_key)
        exact = is_exact_key_match(ctx.get_input("key", required=True), cache_key)
        ctx.set_output("cache-hit", "true" if exact else "false")
        if lookup_only:
            ctx.info(f"Cache found and can be restored from key: {cache_key}")
        else:
            ctx.info(f"Cache restored from key: {cache_key}")
    except Exception as e:
        ctx.set_failed(str(e))


def save_impl(ctx: ActionContext, save_only: bool) -> int | None:
    """saveImpl.ts; None where it returns early (void)."""
    cache_id = -1
    try:
        if not ctx.env.get("GITHUB_REF"):
            log_warning(ctx, f"Event Validation Error: The event type "
                             f"{ctx.env.get('GITHUB_EVENT_NAME')} is not supported because it's "
                             f"not tied to a branch or tag ref.")
            return None
        primary_key = ("" if save_only else ctx.get_state(STATE_PRIMARY_KEY)) \
            or ctx.get_input("key")
        if not primary_key:
            log_warning(ctx, "Key is not specified.")
            return None
        restored_key = None if save_only else (ctx.get_state(STATE_MATCHED_KEY) or None)
        if is_exact_key_match(primary_key, restored_key):
            ctx.info(f"Cache hit occurred on the primary key {primary_key}, not saving cache.")
            return None
        paths = ctx.get_input_list("path", required=True)
        cross_os = ctx.get_bool("enableCrossOsArchive")
        cache_id = save_cache(ctx, paths, primary_key, cross_os)
        if cache_id != -1:
            ctx.info(f"Cache saved with key: {primary_key}")
    except (ActionFailed, ClientMissing):
        raise  # the client could not run at all: the node action itself would have failed
    except Exception as e:
        log_warning(ctx, str(e))
    return cache_id


def save_only_run(ctx: ActionContext) -> None:
    if save_impl(ctx, save_only=True) == -1:
        ctx.warning("Cache save failed.")


def _ignore(_: object) -> None:
    return None


CACHE = PythonAction(main=lambda ctx: restore_impl(ctx, restore_only=False),
                     post=lambda ctx: _ignore(save_impl(ctx, save_only=False)),
                     post_if="success()", inputs=CACHE_INPUTS,
                     deprecated={"save-always": SAVE_ALWAYS_DEPRECATION})
CACHE_RESTORE = PythonAction(main=lambda ctx: restore_impl(ctx, restore_only=True),
                             inputs=RESTORE_INPUTS)
CACHE_SAVE = PythonAction(main=save_only_run, inputs=SAVE_INPUTS)
CHECKOUT = PythonAction(main=checkout_main, inputs=CHECKOUT_INPUTS)

BUILTINS: dict[str, PythonAction] = {
    "actions/cache": CACHE,
    "actions/cache/restore": CACHE_RESTORE,
    "actions/cache/save": CACHE_SAVE,
    "actions/checkout": CHECKOUT,
}


def builtin(name: str) -> PythonAction | None:
    """The built-in implementation for a ``uses:`` name (without @ref), if any."""
    return BUILTINS.get(name.lower())
