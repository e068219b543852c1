"""Runs a workflow's job (or a composite action) the way GitHub's hosted Linux runner does.

The pieces follow actions/runner: ``run:`` steps are written to ``$RUNNER_TEMP/<uuid>.sh`` and
started as the ``runner`` user with ``bash -e {0}`` (no ``shell:``, bash found on PATH) or
``bash --noprofile --norc -e -o pipefail {0}`` (``shell: bash``); the workspace is the working
directory; ``${{ }}`` in ``run:`` is substituted before the script is written; ``env:`` comes from
the workflow, the job and the step; each step gets fresh ``GITHUB_ENV``/``GITHUB_OUTPUT``/
``GITHUB_PATH``/``GITHUB_STATE``/``GITHUB_STEP_SUMMARY`` files, processed after it ends;
``if:`` without a status function means ``success() && (...)``; composite actions run their steps
in a child scope with their own ``steps`` context, ``inputs`` and ``github.action_path``, and
``success()`` inside them follows the action's own status; post steps (``actions/cache``) run
at the end in reverse order. Each job runs on its own :class:`~.machine.Machine`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import posixpath
import secrets as pysecrets
import shlex
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import actions as builtin_actions
from .cache import CacheService, Clock
from .commands import (
    Command,
    FileCommandError,
    SecretMasker,
    parse_command,
    parse_env_file,
)
from .expressions import (
    CaseSensitiveDict,
    Evaluator,
    ExpressionError,
    canonical,
    evaluate_condition,
    evaluate_template,
    evaluate_to_string,
    has_expression,
    is_truthy,
    to_number,
)
from .machine import DEFAULT_ISOLATED, RUNNER_HOME, RUNNER_USER, Machine, runner_ids
from .yamlload import load_yaml

WORK = f"{RUNNER_HOME}/work"
TEMP = f"{WORK}/_temp"
ACTIONS_DIR = f"{WORK}/_actions"
TOOL_CACHE = "/opt/hostedtoolcache"
IMAGE_PATH = ("/snap/bin:/home/runner/.local/bin:/opt/pipx_bin:/home/runner/.cargo/bin:"
              "/home/runner/.config/composer/vendor/bin:/usr/local/.ghcup/bin:"
              "/home/runner/.dotnet/tools:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
              "/sbin:/bin:/usr/games:/usr/local/games:/snap/bin")
# The environment the runner service starts steps with on ubuntu-24.04 (a representative subset
# of /etc/environment plus what systemd sets for the service).
IMAGE_ENV: dict[str, str] = {
    "PATH": IMAGE_PATH,
    "HOME": RUNNER_HOME,
    "USER": RUNNER_USER,
    "LOGNAME": RUNNER_USER,
    "SHELL": "/bin/bash",
    "LANG": "C.UTF-8",
    "ImageOS": "ubuntu24",
    "ImageVersion": "20250105.1.0",
    "AGENT_TOOLSDIRECTORY": TOOL_CACHE,
    "RUNNER_TOOL_CACHE": TOOL_CACHE,
    "ACCEPT_EULA": "Y",
    "XDG_CONFIG_HOME": f"{RUNNER_HOME}/.config",
    "XDG_RUNTIME_DIR": "/run/user/1001",
    "DEBIAN_FRONTEND": "noninteractive",
    "DOTNET_MULTILEVEL_LOOKUP": "0",
    "DOTNET_NOLOGO": "1",
    "DOTNET_SKIP_FIRST_TIME_EXPERIENCE": "1",
    "PIPX_BIN_DIR": "/opt/pipx_bin",
    "PIPX_HOME": "/opt/pipx",
    "SYSTEMD_EXEC_PID": "700",
}
BUILTIN_SHELLS: dict[str, tuple[str, str]] = {
    "bash": ("--noprofile --norc -e -o pipefail {0}", ".sh"),
    "sh": ("-e {0}", ".sh"),
    "python": ("{0}", ".py"),
    "pwsh": ("-command \". '{0}'\"", ".ps1"),
    "powershell": ("-command \". '{0}'\"", ".ps1"),
    "cmd": ("/D /E:ON /V:OFF /S /C \"CALL \"{0}\"\"", ".cmd"),
}
# GitHubContext's allow-list: these github context keys become GITHUB_* variables
GITHUB_ENV_CONTEXT_KEYS = (
    "action_path", "action_ref", "action_repository", "action", "actor", "actor_id", "api_url",
    "base_ref", "env", "event_name", "event_path", "graphql_url", "head_ref", "job", "output",
    "path", "ref_name", "ref_protected", "ref_type", "ref", "repository", "repository_id",
    "repository_owner", "repository_owner_id", "retention_days", "run_attempt", "run_id",
    "run_number", "server_url", "sha", "state", "step_summary", "triggering_actor", "workflow",
    "workflow_ref", "workflow_sha", "workspace",
)
FILE_COMMANDS = {"path": "add_path_", "env": "set_env_", "output": "set_output_",
                 "state": "save_state_", "step_summary": "step_summary_"}
SUMMARY_LIMIT = 1024 * 1024
DEPRECATED_COMMAND = ("The `{0}` command is deprecated and will be disabled soon. Please upgrade "
                      "to using Environment Files. For more information see: https://github.blog/"
                      "changelog/2022-10-11-github-actions-deprecating-save-state-and-set-output-"
                      "commands/")
DISABLED_COMMAND = ("The `{0}` command is disabled. Please upgrade to using Environment Files or "
                    "opt into unsecure command execution by setting the "
                    "`ACTIONS_ALLOW_UNSECURE_COMMANDS` environment variable to `true`. For more "
                    "information see: https://github.blog/changelog/2020-10-01-github-actions-"
                    "deprecating-set-env-and-add-path-commands/")


class WorkflowError(Exception):
    """The workflow or action file itself is invalid (raised to the test, not a step failure)."""


class StepError(Exception):
    """A step fails with this message as an error annotation."""


# --- public results ---------------------------------------------------------------------------

@dataclass
class Event:
    """What triggered the run. Build one with :meth:`push`, :meth:`pull_request`... ."""

    name: str = "push"
    ref: str = "refs/heads/main"
    sha: str = ""
    base_ref: str = ""
    head_ref: str = ""
    number: int | None = None
    actor: str = "octocat"
    inputs: dict[str, Any] = field(default_factory=dict)
    payload: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def push(cls, branch: str = "main", **kw: Any) -> Event:
        return cls("push", f"refs/heads/{branch}", **kw)

    @classmethod
    def tag(cls, tag: str, **kw: Any) -> Event:
        return cls("push", f"refs/tags/{tag}", **kw)

    @classmethod
    def pull_request(cls, number: int = 1, base: str = "main", head: str = "feature",
                     **kw: Any) -> Event:
        return cls("pull_request", f"refs/pull/{number}/merge", base_ref=base, head_ref=head,
                   number=number, **kw)

    @classmethod
    def workflow_dispatch(cls, branch: str = "main", inputs: dict[str, Any] | None = None,
                          **kw: Any) -> Event:
        return cls("workflow_dispatch", f"refs/heads/{branch}", inputs=inputs or {}, **kw)

    @classmethod
    def schedule(cls, branch: str = "main", **kw: Any) -> Event:
        return cls("schedule", f"refs/heads/{branch}", **kw)

    @property
    def ref_name(self) -> str:
        for prefix in ("refs/heads/", "refs/tags/", "refs/pull/"):
            if self.ref.startswith(prefix):
                return self.ref[len(prefix):]
        return self.ref

    @property
    def ref_type(self) -> str:
        return "tag" if self.ref.startswith("refs/tags/") else "branch"


@dataclass
class Annotation:
    level: str  # 'error' | 'warning' | 'notice'
    message: str
    title: str | None = None
    file: str | None = None
    line: int | None = None
    end_line: int | None = None
    col: int | None = None
    end_column: int | None = None
    step: str | None = None


@dataclass
class StepResult:
    """One executed (or skipped) step; embedded steps of composite actions are listed too."""

    qualified_id: str  # "restore" at top level, "restore.cache" inside that composite action
    id: str | None
    name: str
    stage: str = "main"  # 'main' | 'post'
    outcome: str = "success"
    conclusion: str = "success"
    outputs: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    summary: str = ""
    uses: str | None = None
    parent: str | None = None

    @property
    def text(self) -> str:
        return "\n".join(self.log)


@dataclass
class JobResult:
    """What a job did, and its machine (alive until :meth:`GitHub.close`)."""

    job_id: str
    name: str
    status: str  # 'success' | 'failure' | 'skipped'
    matrix: dict[str, Any]
    steps: list[StepResult]
    outputs: dict[str, str]
    annotations: list[Annotation]
    summaries: list[str]
    log_lines: list[str]
    env: dict[str, str]
    path: list[str]
    event: Event
    run_id: int
    run_attempt: int
    machine: Machine | None

    @property
    def success(self) -> bool:
        return self.status == "success"

    @property
    def log(self) -> str:
        return "\n".join(self.log_lines)

    @property
    def summary(self) -> str:
        return "".join(self.summaries)

    def step(self, qualified_id: str, stage: str = "main") -> StepResult:
        """A step by id ("restore", or "restore.cache" inside a composite) or by name."""
        for s in self.steps:
            if s.stage == stage and qualified_id in (s.qualified_id, s.name):
                return s
        known = ", ".join(f"{s.qualified_id} ({s.stage})" for s in self.steps)
        raise KeyError(f"no {stage} step {qualified_id!r}; steps: {known}")

    def annotations_of(self, level: str) -> list[str]:
        return [a.message for a in self.annotations if a.level == level]

    @property
    def warnings(self) -> list[str]:
        return self.annotations_of("warning")

    @property
    def errors(self) -> list[str]:
        return self.annotations_of("error")

    @property
    def notices(self) -> list[str]:
        return self.annotations_of("notice")


@dataclass
class Run:
    """A workflow run of one job id: one JobResult per matrix combination."""

    run_id: int
    run_attempt: int
    jobs: list[JobResult]

    @property
    def job(self) -> JobResult:
        if len(self.jobs) != 1:
            raise ValueError(f"the run has {len(self.jobs)} jobs; use .jobs")
        return self.jobs[0]


# --- the fake github.com ----------------------------------------------------------------------

SetupHook = Callable[[Machine], None]


class GitHub:
    """A repository on a fake github.com: its cache service, clock, actions and runs.

    ``cache`` is the cache service's model; ``cache_server`` serves it on loopback, from
    construction to :meth:`close`, to the real ``@actions/cache`` client that the
    ``actions/cache`` steps run (a :class:`tests.ghcache.CacheServer`).

    ``actions`` maps ``uses:`` names to implementations: ``"owner/repo"`` (or
    ``"owner/repo/path"``, optionally with ``@ref``) to a local directory holding the repository,
    to a :class:`~.actions.PythonAction`, or to a plain callable taking an
    :class:`~.actions.ActionContext`. ``actions/checkout`` and ``actions/cache`` (``/restore``,
    ``/save``) are built in.

    ``source`` is the tree ``actions/checkout`` copies (``sources`` maps other repositories);
    ``isolated`` lists the paths every job gets its own copy of (add e.g. ``/var/log/guix``; a
    host path under one of them, such as pytest's ``tmp_path`` under ``/tmp``, is not visible
    inside jobs: copy files in through :meth:`Machine.path`). A step still running after
    ``step_timeout`` seconds (or its ``timeout-minutes``) is killed and fails, as does one whose
    background process keeps its output open, which would hang a real runner.
    """

    def __init__(self, root: Path, *, repository: str = "octo-org/incstore",
                 default_branch: str = "main", clock: Clock | None = None,
                 cache: CacheService | None = None, isolated: Iterable[str] = DEFAULT_ISOLATED,
                 source: Path | None = None, step_timeout: float = 600.0,
                 image_env: Mapping[str, str] | None = None, debug: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.repository = repository
        self.default_branch = default_branch
        self.clock = clock or (cache.clock if cache else Clock())
        self.cache = cache or CacheService(self.root / "cache-service", clock=self.clock)
        # the cache service v2 on loopback, over self.cache, for the real @actions/cache client
        # of the actions/cache steps (imported here: tests.ghcache imports this package's model)
        from ..ghcache.service import CacheServer
        self.cache_server = CacheServer(self.cache).start()
        self.isolated = tuple(isolated)
        self.source = source
        self.sources: dict[str, Path] = {}
        self.actions: dict[str, Any] = {}
        self.secrets: dict[str, str] = {}
        self.vars: dict[str, str] = {}
        self.step_timeout = step_timeout
        self.image_env = dict(IMAGE_ENV if image_env is None else image_env)
        self.debug = debug
        self.machines: list[Machine] = []
        self._lock = threading.Lock()
        self._next_run_id = 10_000_000_001
        self._run_numbers: dict[str, int] = {}

    # -- runs -----------------------------------------------------------------------------

    def run(self, workflow: str | Path | Mapping[str, Any], job: str | None = None, *,
            event: Event | None = None, source: Path | None = None,
            matrix: Mapping[str, Any] | None = None, secrets: Mapping[str, str] | None = None,
            vars: Mapping[str, str] | None = None, run_id: int | None = None,
            run_attempt: int = 1, run_number: int | None = None,
            setup: SetupHook | None = None, isolated: Iterable[str] = (),
            needs: Mapping[str, Any] | None = None, parallel: bool = True) -> Run:
        """Run one job of a workflow (a file, YAML text or a dict); every matrix combination,
        concurrently unless parallel=False, or only the ones whose values include ``matrix``."""
        doc, workflow_name, workflow_path = self._load_workflow(workflow)
        jobs = doc.get("jobs") or {}
        if job is None:
            if len(jobs) != 1:
                raise WorkflowError(f"the workflow has jobs {sorted(jobs)}: name one")
            job = next(iter(jobs))
        if job not in jobs:
            raise WorkflowError(f"no job {job!r} in the workflow (jobs: {sorted(jobs)})")
        event = event or Event.push(self.default_branch)
        with self._lock:
            if run_id is None:
                run_id = self._next_run_id
                self._next_run_id += 1
            if run_number is None:
                run_number = self._run_numbers.get(workflow_name, 0) + 1
            self._run_numbers[workflow_name] = max(run_number,
                                                   self._run_numbers.get(workflow_name, 0))
        run_secrets = dict(self.secrets, **(secrets or {}))
        run_secrets.setdefault("GITHUB_TOKEN", "ghs_" + pysecrets.token_hex(18))
        spec = RunSpec(self, doc, workflow_name, workflow_path, job, event,
                       source or self.source, run_secrets,
                       dict(self.vars, **(vars or {})), run_id, run_attempt, run_number, setup,
                       tuple(isolated), dict(needs or {}))
        job_def = jobs[job] or {}
        combos = expand_matrix(job_def.get("strategy", {}).get("matrix"), spec.base_evaluator())
        if matrix is not None:
            combos = [c for c in combos if all(c.get(k) == canonical(v) or c.get(k) == v
                                               for k, v in matrix.items())]
            if not combos:
                raise WorkflowError(f"no matrix combination matches {dict(matrix)}")
        strategy = job_def.get("strategy") or {}
        max_parallel = strategy.get("max-parallel") or len(combos) or 1
        runs = [JobRun(spec, job_def, combo, i, len(combos)) for i, combo in enumerate(combos)]
        if parallel and len(runs) > 1:
            with ThreadPoolExecutor(max_workers=int(max_parallel)) as pool:
                results = list(pool.map(lambda r: r.execute(), runs))
        else:
            results = [r.execute() for r in runs]
        return Run(run_id, run_attempt, results)

    def run_steps(self, steps: Sequence[Mapping[str, Any]], *, env: Mapping[str, Any] | None = None,
                  defaults: Mapping[str, Any] | None = None, **kwargs: Any) -> JobResult:
        """Run a job made of these steps (the other arguments are those of :meth:`run`)."""
        job: dict[str, Any] = {"runs-on": "ubuntu-latest", "steps": list(steps)}
        if env:
            job["env"] = dict(env)
        if defaults:
            job["defaults"] = dict(defaults)
        workflow = {"name": "steps", "on": "push", "jobs": {"job": job}}
        return self.run(workflow, "job", **kwargs).job

    def run_action(self, uses: str, with_: Mapping[str, Any] | None = None, *,
                   before: Sequence[Mapping[str, Any]] = (),
                   after: Sequence[Mapping[str, Any]] = (),
                   step_env: Mapping[str, Any] | None = None,
                   checkout: bool = True, **kwargs: Any) -> JobResult:
        """Run one action (e.g. ``./.github/actions/restore``) as step ``action`` of a job that
        first checks the repository out (``source``), with ``before``/``after`` steps around."""
        step: dict[str, Any] = {"id": "action", "uses": uses}
        if with_:
            step["with"] = dict(with_)
        if step_env:
            step["env"] = dict(step_env)
        steps = [*([{"uses": "actions/checkout@v4"}] if checkout else []), *before, step, *after]
        return self.run_steps(steps, **kwargs)

    def _load_workflow(self, workflow: str | Path | Mapping[str, Any]
                       ) -> tuple[dict[str, Any], str, str]:
        path = ""
        if isinstance(workflow, Mapping):
            doc = copy.deepcopy(dict(workflow))
        elif isinstance(workflow, Path) or (isinstance(workflow, str) and "\n" not in workflow
                                            and workflow.endswith((".yml", ".yaml"))):
            p = Path(workflow)
            doc = load_yaml(p)
            path = f".github/workflows/{p.name}"
        else:
            doc = load_yaml(str(workflow))
        if not isinstance(doc, dict) or "jobs" not in doc:
            raise WorkflowError("not a workflow (no 'jobs')")
        name = str(doc.get("name") or path or "workflow")
        return doc, name, path or ".github/workflows/workflow.yml"

    def new_machine(self, name: str, extra: Iterable[str] = ()) -> Machine:
        with self._lock:
            index = len(self.machines)
        machine = Machine(self.root / "machines" / f"{index:03d}-{name}",
                          [*self.isolated, *extra], name=name)
        with self._lock:
            self.machines.append(machine)
        return machine.start()

    def close(self) -> None:
        """Kill every job machine's processes (their files stay under root) and stop the cache
        service."""
        for m in self.machines:
            m.close()
        self.cache_server.stop()

    def __enter__(self) -> GitHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RunSpec:
    """Everything a job of this run shares."""

    gh: GitHub
    doc: dict[str, Any]
    workflow_name: str
    workflow_path: str
    job_id: str
    event: Event
    source: Path | None
    secrets: dict[str, str]
    vars: dict[str, str]
    run_id: int
    run_attempt: int
    run_number: int
    setup: SetupHook | None
    isolated: tuple[str, ...]
    needs: dict[str, Any]

    @property
    def repo_name(self) -> str:
        return self.gh.repository.split("/", 1)[1]

    @property
    def workspace(self) -> str:
        return f"{WORK}/{self.repo_name}/{self.repo_name}"

    @property
    def sha(self) -> str:
        return self.event.sha or _fake_sha(self.event.ref)

    def event_payload(self) -> dict[str, Any]:
        gh, ev = self.gh, self.event
        owner = gh.repository.split("/", 1)[0]
        repository = {
            "id": 123456789, "name": self.repo_name, "full_name": gh.repository,
            "owner": {"login": owner, "id": 9919, "type": "Organization"},
            "default_branch": gh.default_branch, "private": False,
            "html_url": f"https://github.com/{gh.repository}",
        }
        sender = {"login": ev.actor, "id": 583231, "type": "User"}
        payload: dict[str, Any]
        if ev.name == "pull_request":
            number = ev.number or 1
            payload = {
                "action": "synchronize", "number": number,
                "pull_request": {
                    "number": number, "title": "A pull request", "state": "open",
                    "head": {"ref": ev.head_ref, "sha": _fake_sha(ev.head_ref),
                             "repo": {"full_name": gh.repository}},
                    "base": {"ref": ev.base_ref, "sha": _fake_sha(ev.base_ref),
                             "repo": {"full_name": gh.repository}},
                },
                "repository": repository, "sender": sender,
            }
        elif ev.name == "workflow_dispatch":
            payload = {"inputs": dict(ev.inputs), "ref": ev.ref, "repository": repository,
                       "sender": sender}
        elif ev.name == "schedule":
            payload = {"schedule": "0 0 * * *", "repository": repository}
        else:
            payload = {"ref": ev.ref, "before": "0" * 40, "after": self.sha, "created": False,
                       "deleted": False, "forced": False,
                       "head_commit": {"id": self.sha, "message": "A commit"},
                       "pusher": {"name": ev.actor}, "repository": repository, "sender": sender}
        return _deep_merge(payload, ev.payload)

    def base_evaluator(self) -> Evaluator:
        """The contexts available to strategy.matrix and job-level keys before a job starts."""
        return Evaluator({"github": self.github_context(), "vars": dict(self.vars),
                          "needs": self.needs, "inputs": dict(self.event.inputs)})

    def github_context(self) -> dict[str, Any]:
        gh, ev = self.gh, self.event
        owner = gh.repository.split("/", 1)[0]
        return {
            "action": "", "action_path": "", "action_ref": "", "action_repository": "",
            "actor": ev.actor, "actor_id": "583231", "api_url": "https://api.github.com",
            "base_ref": ev.base_ref, "event": self.event_payload(), "event_name": ev.name,
            "event_path": f"{TEMP}/_github_workflow/event.json",
            "graphql_url": "https://api.github.com/graphql", "head_ref": ev.head_ref,
            "job": self.job_id, "ref": ev.ref, "ref_name": ev.ref_name,
            "ref_protected": "false", "ref_type": ev.ref_type, "repository": gh.repository,
            "repository_id": "123456789", "repository_owner": owner,
            "repository_owner_id": "9919", "repositoryUrl": f"git://github.com/{gh.repository}.git",
            "retention_days": "90", "run_id": str(self.run_id), "run_number": str(self.run_number),
            "run_attempt": str(self.run_attempt), "secret_source": "Actions",
            "server_url": "https://github.com", "sha": self.sha,
            "token": self.secrets.get("GITHUB_TOKEN", ""), "triggering_actor": ev.actor,
            "workflow": self.workflow_name,
            "workflow_ref": f"{gh.repository}/{self.workflow_path}@{ev.ref}",
            "workflow_sha": self.sha, "workspace": self.workspace,
        }

    @property
    def cache_scopes(self) -> list[str]:
        """The scopes a job may restore from, in lookup order."""
        scopes = [self.event.ref]
        if self.event.name in ("pull_request", "pull_request_target") and self.event.base_ref:
            scopes.append(f"refs/heads/{self.event.base_ref}")
        scopes.append(f"refs/heads/{self.gh.default_branch}")
        return list(dict.fromkeys(scopes))


def _fake_sha(seed: str) -> str:
    return hashlib.sha1(seed.encode()).hexdigest()


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def expand_matrix(matrix: Any, ev: Evaluator) -> list[dict[str, Any]]:
    """strategy.matrix: the cartesian product of its keys, then exclude, then include."""
    if matrix is None:
        return [{}]
    if isinstance(matrix, str):
        matrix = evaluate_template(matrix, ev)
    if not isinstance(matrix, Mapping):
        raise WorkflowError("strategy.matrix must be a mapping")

    def value(v: Any) -> Any:
        if isinstance(v, str) and has_expression(v):
            return evaluate_template(v, ev)
        if isinstance(v, list):
            return [value(x) for x in v]
        if isinstance(v, dict):
            return {k: value(x) for k, x in v.items()}
        return canonical(v)

    axes = {k: value(v) for k, v in matrix.items() if k not in ("include", "exclude")}
    for k, v in axes.items():
        if not isinstance(v, list):
            raise WorkflowError(f"matrix {k} must be a list")
    keys = list(axes)
    combos: list[dict[str, Any]] = [dict(zip(keys, values, strict=True))
              for values in itertools.product(*(axes[k] for k in keys))] if keys else []
    for ex in value(matrix.get("exclude") or []):
        combos = [c for c in combos if not all(c.get(k) == v for k, v in ex.items())]
    originals = [dict(c) for c in combos]
    for inc in value(matrix.get("include") or []):
        added = False
        for c, orig in zip(combos, originals, strict=True):
            if all(orig[k] == v for k, v in inc.items() if k in orig):
                for k, v in inc.items():
                    if k not in orig:
                        c[k] = v
                added = True
        if not added:
            combos.append(dict(inc))
            originals.append(dict(inc))
    return combos or [{}]


# --- one job ---------------------------------------------------------------------------------

@dataclass
class Scope:
    """Where a step runs: the job itself, or inside a composite action."""

    steps: dict[str, Any]
    prefix: str = ""
    inputs: dict[str, str] | None = None
    action_path: str = ""
    action_repository: str = ""
    action_ref: str = ""
    env_overrides: dict[str, str] = field(default_factory=dict)
    embedded: bool = False
    result: str = "success"
    parent: str | None = None


@dataclass
class PostStep:
    name: str
    condition: str
    run: Callable[[StepResult], str]
    step: Mapping[str, Any]
    scope: Scope
    main: StepResult


class JobRun:
    """Executes one job (one matrix combination) on its own machine."""

    def __init__(self, spec: RunSpec, job_def: Mapping[str, Any], matrix: dict[str, Any],
                 index: int, total: int) -> None:
        self.spec = spec
        self.gh = spec.gh
        self.job_def = job_def
        self.matrix = matrix
        self.index = index
        self.total = total
        self.status = "success"
        self.env: dict[str, str] = {}
        self.prepend_path: list[str] = []
        self.steps_ctx: dict[str, Any] = {}
        self.results: list[StepResult] = []
        self.annotations: list[Annotation] = []
        self.summaries: list[str] = []
        self.log_lines: list[str] = []
        self.post_steps: list[PostStep] = []
        self.masker = SecretMasker()
        self.tracking_id = f"github_{uuid.uuid4()}"
        self.machine: Machine | None = None
        self._lock = threading.RLock()
        self._generated: dict[str, int] = {}
        self._downloaded: set[str] = set()
        strategy = job_def.get("strategy") or {}
        self.strategy_ctx = {"fail-fast": bool(strategy.get("fail-fast", True)),
                             "job-index": float(index), "job-total": float(total),
                             "max-parallel": float(strategy.get("max-parallel") or total)}
        self.display_name = spec.job_id
        if matrix:
            self.display_name += " (" + ", ".join(
                _display(v) for v in matrix.values()) + ")"
        self.github_ctx = spec.github_context()
        self.runner_ctx = {"name": f"GitHub Actions {1000000 + index}", "os": "Linux",
                           "arch": "X64", "temp": TEMP, "tool_cache": TOOL_CACHE,
                           "environment": "github-hosted",
                           "workspace": f"{WORK}/{spec.repo_name}"}
        if self.gh.debug:
            self.runner_ctx["debug"] = "1"
        for value in spec.secrets.values():
            self.masker.add(value)
        # the job's ACTIONS_RUNTIME_TOKEN: what the cache service knows the job's scopes by
        self.runtime_token = self.gh.cache_server.token(spec.cache_scopes, spec.event.ref,
                                                        self.display_name)
        self.masker.add(self.runtime_token)

    # -- helpers ------------------------------------------------------------------------------

    @property
    def workspace(self) -> str:
        return self.spec.workspace

    def host(self, path: str) -> Path:
        assert self.machine is not None
        return self.machine.path(path)

    def write(self, step: StepResult | None, line: str) -> None:
        line = self.masker.mask(line)
        with self._lock:
            self.log_lines.append(line)
            if step is not None:
                step.log.append(line)

    def annotate(self, step: StepResult | None, level: str, message: str, **props: Any) -> None:
        message = self.masker.mask(message)
        with self._lock:
            self.annotations.append(Annotation(level, message,
                                               step=step.qualified_id if step else None, **props))
        self.write(step, f"##[{level}]{message}")

    def evaluator(self, scope: Scope, stage: str = "main",
                  step_env: Mapping[str, str] | None = None,
                  github_extra: Mapping[str, Any] | None = None) -> Evaluator:
        env = CaseSensitiveDict(self.env)
        env.update(scope.env_overrides)
        if step_env:
            env.update(step_env)
        github = dict(self.github_ctx)
        github.update({"action_path": scope.action_path,
                       "action_repository": scope.action_repository,
                       "action_ref": scope.action_ref})
        if scope.embedded:
            github["action_status"] = scope.result
        if github_extra:
            github.update(github_extra)
        contexts: dict[str, Any] = {
            "github": github, "env": env, "vars": dict(self.spec.vars),
            "job": {"status": self.status, "container": {"network": "", "id": ""},
                    "services": {}},
            "steps": scope.steps, "runner": dict(self.runner_ctx),
            "secrets": dict(self.spec.secrets), "strategy": dict(self.strategy_ctx),
            "matrix": dict(self.matrix), "needs": self.spec.needs,
            "inputs": dict(scope.inputs) if scope.inputs is not None
            else dict(self.spec.event.inputs),
        }

        def status(name: str) -> bool:
            if name == "always":
                return True
            if name == "cancelled":
                return False
            current = scope.result if scope.embedded and stage == "main" else self.status
            return current == ("success" if name == "success" else "failure")

        return Evaluator(contexts, status, self.hash_files)

    def hash_files(self, patterns: list[str]) -> str:
        """hashFiles(): sha256 over the sha256 of each matched file under the workspace, in the
        order @actions/glob walks (depth first, names sorted)."""
        root = self.host(self.workspace)
        includes: list[str] = []
        excludes: list[str] = []
        for p in "\n".join(patterns).split("\n"):
            p = p.strip()
            if not p or p.startswith("#"):
                continue
            (excludes if p.startswith("!") else includes).append(p.lstrip("!").strip())
        matched: set[Path] = set()
        for pattern in includes:
            for hit in _glob(root, pattern):
                if hit.is_dir():
                    matched.update(f for f in hit.rglob("*") if f.is_file())
                elif hit.is_file():
                    matched.add(hit)
        for pattern in excludes:
            for hit in _glob(root, pattern):
                matched.discard(hit)
                if hit.is_dir():
                    matched.difference_update(set(hit.rglob("*")))
        files = sorted((f for f in matched if root in f.parents),
                       key=lambda f: [part.encode() for part in f.relative_to(root).parts])
        if not files:
            return ""
        total = hashlib.sha256()
        for f in files:
            total.update(hashlib.sha256(f.read_bytes()).digest())
        return total.hexdigest()

    def context_env(self, scope: Scope, step_name: str) -> dict[str, str]:
        """The GITHUB_*/RUNNER_* variables the runner exposes from its contexts."""
        github = dict(self.github_ctx)
        github.update({"action": step_name, "action_path": scope.action_path,
                       "action_repository": scope.action_repository,
                       "action_ref": scope.action_ref})
        allow = GITHUB_ENV_CONTEXT_KEYS
        env = {f"GITHUB_{k.upper()}": str(github[k]) for k in allow
               if isinstance(github.get(k), str)}
        env.update({f"RUNNER_{k.upper()}": str(v) for k, v in self.runner_ctx.items()})
        env.update({"CI": "true", "GITHUB_ACTIONS": "true",
                    "RUNNER_TRACKING_ID": self.tracking_id})
        return env

    def process_env(self, scope: Scope, step_env: Mapping[str, str], step_name: str,
                    files: Mapping[str, str]) -> dict[str, str]:
        """The environment of a step's process, built in the runner's order."""
        env = dict(self.gh.image_env)
        env.update(self.env)
        env.update(scope.env_overrides)
        env.update(step_env)
        if self.prepend_path:
            prepend = ":".join(reversed(self.prepend_path))
            env["PATH"] = prepend + (":" + env["PATH"] if env.get("PATH") else "")
        github_files = {f"GITHUB_{k.upper()}": v for k, v in files.items()}
        env.update(self.context_env(scope, step_name))
        env.update(github_files)
        return env

    def generated_id(self, base: str) -> str:
        with self._lock:
            n = self._generated.get(base, 0) + 1
            self._generated[base] = n
        return base if n == 1 else f"{base}_{n}"

    # -- the job ------------------------------------------------------------------------------

    def execute(self) -> JobResult:
        spec = self.spec
        ev = spec.base_evaluator()
        ev.contexts = dict(ev.contexts, matrix=self.matrix, strategy=self.strategy_ctx,
                           secrets=spec.secrets)
        if "if" in self.job_def and not evaluate_condition(self.job_def["if"], ev):
            return self._result("skipped")
        for unsupported in ("container", "services", "uses"):
            if unsupported in self.job_def:
                raise WorkflowError(f"jobs.{spec.job_id}.{unsupported} is not supported by the "
                                    f"emulator")
        self.machine = self.gh.new_machine(f"{spec.job_id}-{self.index}", spec.isolated)
        self.machine.matrix = dict(self.matrix)
        try:
            self._prepare_machine()
            if spec.setup is not None:
                spec.setup(self.machine)
            self._run_main()
        finally:
            self._complete()
        return self._result(self.status)

    def _result(self, status: str) -> JobResult:
        outputs: dict[str, str] = {}
        if status != "skipped":
            ev = self.evaluator(Scope(self.steps_ctx), stage="post")
            for name, expr in (self.job_def.get("outputs") or {}).items():
                try:
                    outputs[name] = evaluate_to_string(expr, ev)
                except ExpressionError as e:
                    self.annotate(None, "error", str(e))
        return JobResult(self.spec.job_id, self.display_name, status, self.matrix, self.results,
                         outputs, self.annotations, self.summaries, self.log_lines,
                         dict(self.env), list(self.prepend_path), self.spec.event,
                         self.spec.run_id, self.spec.run_attempt, self.machine)

    def _prepare_machine(self) -> None:
        assert self.machine is not None
        uid, gid = runner_ids()
        for d in (WORK, TEMP, f"{TEMP}/_runner_file_commands", f"{TEMP}/_github_workflow",
                  ACTIONS_DIR, f"{WORK}/{self.spec.repo_name}", self.workspace):
            host = self.host(d)
            host.mkdir(parents=True, exist_ok=True)
            os.chown(host, uid, gid)
        self.machine.write_file(f"{TEMP}/_github_workflow/event.json",
                                json.dumps(self.github_ctx["event"], indent=2), owner=RUNNER_USER)
        # workflow env, then job env (both may use expressions)
        ev = self.evaluator(Scope(self.steps_ctx))
        for source in (self.spec.doc.get("env") or {}, self.job_def.get("env") or {}):
            for k, v in source.items():
                self.env[str(k)] = evaluate_to_string(v, ev, f"env.{k}")
                ev = self.evaluator(Scope(self.steps_ctx))
        self.write(None, f"Job: {self.display_name}")

    def _run_main(self) -> None:
        scope = Scope(self.steps_ctx)
        for step in self.job_def.get("steps") or []:
            self.run_step(step, scope)

    def _complete(self) -> None:
        for post in reversed(self.post_steps):
            self._run_post(post)
        if self.machine is not None:
            self.write(None, "Cleaning up orphan processes")
            uid = runner_ids()[0]

            def orphan(pid: int, environ: dict[str, str]) -> bool:
                try:
                    owner = os.stat(f"/proc/{pid}").st_uid
                except OSError:
                    return False
                return owner == uid and environ.get("RUNNER_TRACKING_ID") == self.tracking_id

            for attempt in range(2):  # again shortly, for a process caught mid-exec
                for pid in self.machine.kill_where(orphan):
                    self.write(None, f"Terminate orphan process: pid ({pid})")
                if attempt == 0:
                    time.sleep(0.05)

    # -- steps --------------------------------------------------------------------------------

    def _default_name(self, step: Mapping[str, Any]) -> str:
        if "run" in step:
            first = str(step["run"]).strip().split("\n", 1)[0]
            return f"Run {first}"
        return f"Run {step.get('uses', '?')}"

    def run_step(self, step: Mapping[str, Any], scope: Scope) -> StepResult:
        step_id = step.get("id")
        if "run" in step:
            generated = self.generated_id("__run")
        else:
            uses = str(step.get("uses", ""))
            generated = self.generated_id("__" + uses.split("@")[0].replace("/", "_")
                                          .replace(".", "").replace("-", "_").strip("_"))
        context_name = str(step_id) if step_id else generated
        result = StepResult(scope.prefix + context_name, str(step_id) if step_id else None,
                            self._default_name(step), uses=step.get("uses"), parent=scope.parent)
        with self._lock:
            self.results.append(result)
        ev = self.evaluator(scope)
        if "name" in step:
            try:
                result.name = evaluate_to_string(step["name"], ev, "name")
            except ExpressionError:
                result.name = str(step["name"])
        try:
            run_it = evaluate_condition(step.get("if"), ev)
        except ExpressionError as e:
            self.annotate(result, "error", f"The step failed and an error occurred when "
                                           f"evaluating 'if': {e}")
            self._finish(result, scope, "failure", step)
            return result
        if not run_it:
            self.write(result, f"Skipping step '{result.name}' due to condition: "
                               f"{step.get('if')}")
            self._finish(result, scope, "skipped", step)
            return result
        self.write(result, f"##[group]{result.name}")
        outcome = "success"
        try:
            step_env = {str(k): evaluate_to_string(v, ev, f"env.{k}")
                        for k, v in (step.get("env") or {}).items()}
            timeout = self.gh.step_timeout
            if "timeout-minutes" in step:
                minutes = to_number(evaluate_template(str(step["timeout-minutes"]), ev))
                timeout = min(timeout, minutes * 60)
            if "run" in step:
                outcome = self._run_script(step, scope, result, step_env, context_name, timeout)
            else:
                outcome = self._run_uses(step, scope, result, step_env, context_name, timeout)
        except (ExpressionError, StepError, WorkflowError, FileCommandError) as e:
            self.annotate(result, "error", str(e))
            outcome = "failure"
        self._finish(result, scope, outcome, step)
        return result

    def _finish(self, result: StepResult, scope: Scope, outcome: str,
                step: Mapping[str, Any]) -> None:
        result.outcome = outcome
        conclusion = outcome
        if outcome == "failure" and "continue-on-error" in step:
            try:
                value = step["continue-on-error"]
                ev = self.evaluator(scope)
                if isinstance(value, str):
                    value = evaluate_template(value, ev)
                if is_truthy(value):
                    conclusion = "success"
            except ExpressionError as e:
                self.annotate(result, "error", str(e))
        result.conclusion = conclusion
        if result.id is not None:
            scope.steps[result.id] = {"outputs": dict(result.outputs), "outcome": outcome,
                                      "conclusion": conclusion}
        if conclusion == "failure":
            if scope.embedded:
                scope.result = "failure"
            else:
                self.status = "failure"

    def _file_commands(self) -> dict[str, str]:
        """Fresh file-command files for one step, owned by runner."""
        assert self.machine is not None
        suffix = str(uuid.uuid4())
        files = {}
        for ctx_name, prefix in FILE_COMMANDS.items():
            path = f"{TEMP}/_runner_file_commands/{prefix}{suffix}"
            self.machine.write_file(path, b"", owner=RUNNER_USER)
            files[ctx_name] = path
        return files

    def _process_file_commands(self, files: Mapping[str, str], result: StepResult,
                               state: dict[str, str] | None = None) -> bool:
        """Apply GITHUB_PATH/ENV/OUTPUT/STATE/STEP_SUMMARY; False when one was malformed."""
        ok = True
        for ctx_name in ("path", "env", "step_summary", "state", "output"):
            host = self.host(files[ctx_name])
            try:
                raw = host.read_bytes() if host.exists() else b""
                text = raw.decode("utf-8", errors="replace")
                if ctx_name == "path":
                    for line in text.splitlines():
                        if line:
                            with self._lock:
                                if line in self.prepend_path:
                                    self.prepend_path.remove(line)
                                self.prepend_path.append(line)
                elif ctx_name == "env":
                    for key, value in parse_env_file(text):
                        if key.upper() == "NODE_OPTIONS":
                            self.annotate(result, "error", "Can't store NODE_OPTIONS output "
                                                           "parameter using '$GITHUB_ENV' command.")
                            continue
                        self.env[key] = value
                elif ctx_name == "output":
                    for key, value in parse_env_file(text):
                        result.outputs[key] = value
                elif ctx_name == "state":
                    for key, value in parse_env_file(text):
                        if state is not None:
                            state[key] = value
                elif ctx_name == "step_summary" and raw:
                    if len(raw) > SUMMARY_LIMIT:
                        self.annotate(result, "error",
                                      f"$GITHUB_STEP_SUMMARY upload aborted, supports content up "
                                      f"to a size of {SUMMARY_LIMIT // 1024}k, got "
                                      f"{len(raw) // 1024}k. For more information see: https://"
                                      f"docs.github.com/actions/using-workflows/workflow-commands-"
                                      f"for-github-actions#adding-a-markdown-summary")
                    else:
                        masked = "".join(self.masker.mask(line) + "\n"
                                         for line in text.splitlines())
                        result.summary += masked
                        with self._lock:
                            self.summaries.append(masked)
            except FileCommandError as e:
                self.annotate(result, "error",
                              f"Unable to process file command '{ctx_name}' successfully.")
                self.annotate(result, "error", str(e))
                ok = False
            with contextlib.suppress(OSError):
                host.unlink()
        return ok

    # -- run: ---------------------------------------------------------------------------------

    def _resolve_shell(self, step: Mapping[str, Any], scope: Scope, ev: Evaluator,
                       search_path: str) -> tuple[str, str, str, str]:
        """(command path, argument format, script extension, display) for a run step."""
        assert self.machine is not None
        shell = step.get("shell")
        if shell is None and not scope.embedded:
            defaults = _run_defaults(self.spec.doc, self.job_def)
            shell = defaults.get("shell")
        if shell is not None:
            shell = evaluate_to_string(shell, ev, "shell").strip()
        if not shell:
            # No shell: bash (or sh) found on PATH, with sh's arguments
            path = self.machine.which("bash", search_path) or self.machine.which("sh", search_path)
            if path is None:
                raise StepError("File not found: 'sh'")
            fmt, ext = BUILTIN_SHELLS["sh"]
            return path, fmt, ext, f"{path} {fmt}"
        command, _, args = shell.partition(" ")
        args = args.strip()
        if not args:
            if command not in BUILTIN_SHELLS:
                raise StepError("Invalid shell option. Shell must be a valid built-in (bash, sh, "
                                "cmd, powershell, pwsh) or a format string containing '{0}'")
            args, ext = BUILTIN_SHELLS[command]
        else:
            ext = BUILTIN_SHELLS.get(command, ("", ""))[1]
        if "{0}" not in args:
            raise StepError("Invalid shell option. Shell must be a valid built-in (bash, sh, cmd, "
                            "powershell, pwsh) or a format string containing '{0}'")
        path = self.machine.which(command, search_path)
        if path is None:
            raise StepError(f"File not found: '{command}'")
        return path, args, ext, f"{path} {args}"

    def _run_script(self, step: Mapping[str, Any], scope: Scope, result: StepResult,
                    step_env: dict[str, str], context_name: str, timeout: float) -> str:
        assert self.machine is not None
        if scope.embedded and "shell" not in step:
            raise StepError("Required property is missing: shell")
        ev = self.evaluator(scope, step_env=step_env)
        script = evaluate_to_string(step["run"], ev, "run")
        files = self._file_commands()
        env = self.process_env(scope, step_env, context_name, files)
        command, fmt, ext, display = self._resolve_shell(step, scope, ev, env.get("PATH", ""))
        workdir = step.get("working-directory")
        if workdir is None and not scope.embedded:
            workdir = _run_defaults(self.spec.doc, self.job_def).get("working-directory")
        cwd = self.workspace
        if workdir is not None:
            cwd = posixpath.normpath(posixpath.join(self.workspace,
                                                    evaluate_to_string(workdir, ev)))
        script_path = f"{TEMP}/{uuid.uuid4()}{ext}"
        self.machine.write_file(script_path, script.encode(), owner=RUNNER_USER)
        for line in script.rstrip("\n").split("\n"):
            self.write(result, line)
        self.write(result, f"shell: {display}")
        shown_env = {**scope.env_overrides, **step_env}
        if self.env or shown_env:
            self.write(result, "env:")
            for k, v in {**self.env, **shown_env}.items():
                self.write(result, f"  {k}: {v}")
        self.write(result, "##[endgroup]")
        if not self.host(cwd).is_dir():
            self._process_file_commands(files, result)
            raise StepError(f"An error occurred trying to start process '{command}' with working "
                            f"directory '{cwd}'. No such file or directory")
        argv = [command, *shlex.split(fmt.replace("{0}", shlex.quote(script_path)))]
        code, state = self.execute_process(argv, env, cwd, result, timeout)
        ok = self._process_file_commands(files, result)
        with contextlib.suppress(OSError):
            self.host(script_path).unlink()
        if code is None:
            self.annotate(result, "error", "The action has timed out.")
            return "failure"
        if code != 0:
            self.annotate(result, "error", f"Process completed with exit code {code}.")
            return "failure"
        return "success" if ok and not state.failed else "failure"

    def execute_process(self, argv: Sequence[str], env: Mapping[str, str], cwd: str,
                        result: StepResult, timeout: float, user: str = RUNNER_USER,
                        echo_commands: bool = True) -> tuple[int | None, CommandState]:
        """Run a process in the job's machine, feeding its stdout and stderr lines through the
        workflow-command processor; None on timeout. Waits for both streams to close, as the
        runner does (a background process holding them keeps the step running)."""
        assert self.machine is not None
        proc = self.machine.popen(argv, user=user, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True)
        state = CommandState()

        def pump(stream: Any) -> None:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\n").rstrip("\r")
                self.output_line(result, line, state if echo_commands else None)
            stream.close()

        readers = [threading.Thread(target=pump, args=(s,), daemon=True)
                   for s in (proc.stdout, proc.stderr)]
        for t in readers:
            t.start()
        deadline = time.monotonic() + timeout
        timed_out = False
        for t in readers:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                timed_out = True
        try:
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            code = None
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
            for t in readers:
                t.join(5)
            return None, state
        return code, state

    # -- workflow commands --------------------------------------------------------------------

    def output_line(self, result: StepResult, line: str, state: CommandState | None) -> None:
        if state is None:
            self.write(result, line)
            return
        cmd = parse_command(line, state.registered())
        if cmd is None:
            self.write(result, line)
            return
        if state.stop_token is not None:
            if cmd.name == state.stop_token:
                self.write(result, line)
                state.stop_token = None
            else:
                self.write(result, line)
            return
        self.handle_command(result, cmd, line, state)

    def handle_command(self, result: StepResult, cmd: Command, line: str,
                       state: CommandState) -> None:
        name = cmd.name
        if state.echo and name not in ("add-mask", "warning", "error", "notice", "debug"):
            self.write(result, line)
        if name in ("warning", "error", "notice"):
            props: dict[str, Any] = {}
            for prop, attr, conv in (("title", "title", str), ("file", "file", str),
                                     ("line", "line", int), ("endLine", "end_line", int),
                                     ("col", "col", int), ("endColumn", "end_column", int)):
                value = cmd.prop(prop)
                if value is not None:
                    try:
                        props[attr] = conv(value)
                    except ValueError:
                        continue
            if props.get("file"):
                file = props["file"]
                if file.startswith(self.workspace + "/"):
                    props["file"] = file[len(self.workspace) + 1:]
            self.annotate(result, name, cmd.data, **props)
        elif name == "add-mask":
            if not cmd.data.strip():
                self.annotate(result, "warning",
                              "Can't add secret mask for empty string in ##[add-mask] command.")
            else:
                self.masker.add(cmd.data)
                if state.echo:
                    self.write(result, "::add-mask::***")
        elif name == "debug":
            if self.gh.debug:
                self.write(result, f"##[debug]{cmd.data}")
        elif name == "group":
            self.write(result, f"##[group]{cmd.data}")
        elif name == "endgroup":
            self.write(result, "##[endgroup]")
        elif name == "echo":
            value = cmd.data.strip().upper()
            if value in ("ON", "OFF"):
                state.echo = value == "ON"
            else:
                self._command_failed(result, line, f"Invalid echo command value. Possible values "
                                                   f"can be: 'on', 'off'. Current value is: "
                                                   f"'{cmd.data}'.", state)
        elif name == "stop-commands":
            token = cmd.data
            if not token or token in state.registered() or token.lower() == "pause-logging":
                self._command_failed(result, line, "Invoked ::stopCommand:: with an unsupported "
                                                   "token", state)
                return
            state.stop_token = token
            if len(token) > 6:
                self.masker.add(token)
            self.write(result, line)
        elif name == "set-output":
            out_name = cmd.prop("name")
            if not out_name:
                self._command_failed(result, line, "Required field 'name' is missing in "
                                                   "##[set-output] command.", state)
            else:
                result.outputs[out_name] = cmd.data
        elif name == "save-state":
            pass
        elif name in ("set-env", "add-path"):
            self._command_failed(result, line, DISABLED_COMMAND.format(name), state)

    def _command_failed(self, result: StepResult, line: str, message: str,
                        state: CommandState) -> None:
        self.annotate(result, "error", f"Unable to process command '{line}' successfully.")
        self.annotate(result, "error", message)
        state.failed = True

    # -- uses: --------------------------------------------------------------------------------

    def _run_uses(self, step: Mapping[str, Any], scope: Scope, result: StepResult,
                  step_env: dict[str, str], context_name: str, timeout: float) -> str:
        uses = str(step["uses"]).strip()
        if uses.startswith("docker://"):
            raise StepError(f"Container actions are not supported by the emulator: {uses}")
        if uses.startswith("./") or uses == ".":
            directory = posixpath.normpath(posixpath.join(self.workspace, uses))
            return self._run_directory_action(step, scope, result, step_env, context_name,
                                              directory, uses, "", "")
        name, _, ref = uses.partition("@")
        if not ref:
            raise StepError(f"Expected format {{org}}/{{repo}}[/path]@ref. Actual '{uses}'")
        impl, subpath = self._find_action(name, ref)
        repo = "/".join(name.split("/")[:2])
        if isinstance(impl, Path):
            directory = self._download_action(repo, ref, impl)
            if subpath:
                directory = f"{directory}/{subpath}"
            return self._run_directory_action(step, scope, result, step_env, context_name,
                                              directory, uses, repo, ref)
        plugin = builtin_actions.as_python_action(impl)
        return self._run_python_action(step, scope, result, step_env, context_name, plugin,
                                       uses, repo, ref)

    def _find_action(self, name: str, ref: str) -> tuple[Any, str]:
        """The registered implementation for owner/repo[/path]@ref (names ignore case, as on
        GitHub): an exact entry, else a repository directory holding path, else a built-in."""
        registry = {k.lower(): v for k, v in self.gh.actions.items()}
        lname, lref = name.lower(), ref.lower()
        for key in (f"{lname}@{lref}", lname):
            if key in registry:
                return registry[key], ""
        parts = name.split("/")
        for n in range(len(parts) - 1, 1, -1):
            prefix = "/".join(parts[:n]).lower()
            for key in (f"{prefix}@{lref}", prefix):
                if key in registry and isinstance(registry[key], str | Path):
                    return Path(registry[key]), "/".join(parts[n:])
        builtin = builtin_actions.builtin(name)
        if builtin is not None:
            return builtin, ""
        raise StepError(f"Unable to resolve action `{name}@{ref}`: the emulator has no "
                        f"implementation; register a local directory or a Python action in "
                        f"GitHub.actions[{name!r}]")

    def _download_action(self, repo: str, ref: str, source: Path) -> str:
        """Copy a repository registered for an action into _actions/owner/repo/ref."""
        assert self.machine is not None
        target = f"{ACTIONS_DIR}/{repo}/{ref}"
        if target not in self._downloaded:
            host = self.host(target)
            if host.exists():
                shutil.rmtree(host)
            copy_tree(Path(source), host)
            self.machine.chown_runner(target)
            self._downloaded.add(target)
            self.write(None, f"Download action repository '{repo}@{ref}'")
        return target

    def evaluate_inputs(self, step: Mapping[str, Any], scope: Scope, step_env: Mapping[str, str],
                        declared: Mapping[str, Any] | None, result: StepResult,
                        warn: bool = True) -> dict[str, str]:
        ev = self.evaluator(scope, step_env=step_env)
        inputs = {str(k): evaluate_to_string(v, ev, f"with.{k}")
                  for k, v in (step.get("with") or {}).items()}
        if declared is not None:
            for key, spec in declared.items():
                if not any(k.lower() == str(key).lower() for k in inputs):
                    default = spec.get("default") if isinstance(spec, Mapping) else spec
                    inputs[str(key)] = ("" if default is None
                                        else evaluate_to_string(default, ev, f"{key} default"))
            unexpected = [k for k in (step.get("with") or {})
                          if str(k).lower() not in {str(d).lower() for d in declared}]
            if unexpected and warn:
                sep = "', '"
                self.annotate(result, "warning",
                              f"Unexpected input(s) '{sep.join(map(str, unexpected))}', "
                              f"valid inputs are ['{sep.join(map(str, declared))}']")
        return inputs

    def _log_inputs(self, result: StepResult, inputs: Mapping[str, str],
                    env: Mapping[str, str]) -> None:
        for title, values in (("with", inputs), ("env", {**self.env, **env})):
            if values:
                self.write(result, f"{title}:")
                for k, v in values.items():
                    self.write(result, f"  {k}: {v}")
        self.write(result, "##[endgroup]")

    def _run_directory_action(self, step: Mapping[str, Any], scope: Scope, result: StepResult,
                              step_env: dict[str, str], context_name: str, directory: str,
                              uses: str, repo: str, ref: str) -> str:
        manifest = None
        for fname in ("action.yml", "action.yaml"):
            host = self.host(f"{directory}/{fname}")
            if host.is_file():
                manifest = load_yaml(host)
                break
        if manifest is None:
            raise StepError(f"Can't find 'action.yml', 'action.yaml' or 'Dockerfile' under "
                            f"'{directory}'. Did you forget to run actions/checkout before "
                            f"running your local action?")
        runs = manifest.get("runs") or {}
        using = str(runs.get("using", ""))
        if using != "composite":
            raise StepError(f"The emulator cannot run '{uses}' (runs.using: {using}); register a "
                            f"Python implementation in GitHub.actions")
        declared = manifest.get("inputs") or {}
        inputs = self.evaluate_inputs(step, scope, step_env, declared, result)
        for i, sub in enumerate(runs.get("steps") or []):
            if "run" in sub and "shell" not in sub:
                raise StepError(f"{directory}/action.yml (Line: {i}): Required property is "
                                f"missing: shell")
        child = Scope(steps={}, prefix=f"{result.qualified_id}.", inputs=inputs,
                      action_path=directory, action_repository=repo, action_ref=ref,
                      env_overrides={**scope.env_overrides, **step_env}, embedded=True,
                      parent=result.qualified_id)
        self._log_inputs(result, inputs, child.env_overrides)
        for sub in runs.get("steps") or []:
            self.run_step(sub, child)
        ev = self.evaluator(child)
        for name, spec in (manifest.get("outputs") or {}).items():
            value = spec.get("value") if isinstance(spec, Mapping) else None
            if value is not None:
                result.outputs[str(name)] = evaluate_to_string(value, ev, f"outputs.{name}")
        return child.result

    def _run_python_action(self, step: Mapping[str, Any], scope: Scope, result: StepResult,
                           step_env: dict[str, str], context_name: str,
                           plugin: builtin_actions.PythonAction, uses: str, repo: str,
                           ref: str) -> str:
        state: dict[str, str] = {}

        def run_post(post_result: StepResult) -> str:
            return self._invoke_python(step, scope, post_result, step_env, context_name, plugin,
                                       uses, repo, ref, state, "post")

        if plugin.post is not None:
            self.post_steps.append(PostStep(f"Post {result.name}", plugin.post_if, run_post,
                                            step, scope, result))
        return self._invoke_python(step, scope, result, step_env, context_name, plugin, uses,
                                   repo, ref, state, "main")

    def _invoke_python(self, step: Mapping[str, Any], scope: Scope, result: StepResult,
                       step_env: dict[str, str], context_name: str,
                       plugin: builtin_actions.PythonAction, uses: str, repo: str, ref: str,
                       state: dict[str, str], stage: str) -> str:
        inputs = self.evaluate_inputs(step, scope, step_env, plugin.inputs, result,
                                      warn=stage == "main")
        files = self._file_commands()
        # where the runner would have downloaded it: _actions/owner/repo/ref[/path]
        subpath = uses.partition("@")[0].split("/")[2:]
        action_path = "/".join([ACTIONS_DIR, repo, ref, *subpath])
        action_scope = Scope(scope.steps, scope.prefix, scope.inputs, action_path, repo, ref,
                             scope.env_overrides, scope.embedded, scope.result, scope.parent)
        env = self.process_env(action_scope, step_env, context_name, files)
        for key, value in inputs.items():
            env[f"INPUT_{key.replace(' ', '_').upper()}"] = value
        for key, value in state.items():
            env[f"STATE_{key}"] = value
        env.update({"ACTIONS_RUNTIME_URL": "https://pipelines.actions.githubusercontent.com/x/",
                    **self.gh.cache_server.env(self.runtime_token)})
        if stage == "main":
            self._log_inputs(result, inputs, {**scope.env_overrides, **step_env})
        ctx = builtin_actions.ActionContext(self, result, inputs, env, state, stage, uses,
                                            files, {str(k) for k in (step.get("with") or {})})
        try:
            plugin.run(ctx, stage)
        except builtin_actions.ActionFailed as e:
            ctx.set_failed(str(e))
        except Exception as e:  # a bug in a Python action: fail its step, loudly
            ctx.set_failed(f"{type(e).__name__}: {e}")
        ok = self._process_file_commands(files, result, state)
        return "failure" if ctx.failed or not ok else "success"

    def _run_post(self, post: PostStep) -> None:
        result = StepResult(post.main.qualified_id, post.main.id, post.name, stage="post",
                            uses=post.main.uses, parent=post.main.parent)
        with self._lock:
            self.results.append(result)
        ev = self.evaluator(post.scope, stage="post")
        try:
            run_it = evaluate_condition(post.condition, ev)
        except ExpressionError as e:
            self.annotate(result, "error", str(e))
            run_it = False
        if not run_it:
            result.outcome = result.conclusion = "skipped"
            self.write(result, f"Skipping step '{post.name}' due to condition: {post.condition}")
            return
        self.write(result, f"##[group]{post.name}")
        try:
            outcome = post.run(result)
        except (ExpressionError, StepError) as e:
            self.annotate(result, "error", str(e))
            outcome = "failure"
        result.outcome = result.conclusion = outcome or "success"
        if result.conclusion == "failure":
            self.status = "failure"


@dataclass
class CommandState:
    """Per-process workflow-command state: echo and stop-commands."""

    echo: bool = False
    stop_token: str | None = None
    failed: bool = False

    def registered(self) -> set[str]:
        from .commands import REGISTERED_COMMANDS
        names = set(REGISTERED_COMMANDS)
        if self.stop_token:
            names.add(self.stop_token)
        return names


def _run_defaults(doc: Mapping[str, Any], job_def: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for source in (doc, job_def):
        run = ((source.get("defaults") or {}).get("run") or {})
        out.update(run)
    return out


def _display(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _glob(root: Path, pattern: str) -> list[Path]:
    if pattern.startswith("/"):
        return []  # only workspace files count
    return sorted(root.glob(pattern)) if any(c in pattern for c in "*?[") else (
        [root / pattern] if (root / pattern).exists() else [])


def copy_tree(source: Path, target: Path) -> None:
    """Copy a source tree: for a git work tree, its tracked and untracked-but-not-ignored files
    (what a fresh clone of the current state would hold), else everything."""
    target.mkdir(parents=True, exist_ok=True)
    files: list[str] | None = None
    if (source / ".git").exists() and shutil.which("git"):
        proc = subprocess.run(["git", "-C", str(source), "ls-files", "-z", "--cached", "--others",
                               "--exclude-standard"], capture_output=True, check=False)
        if proc.returncode == 0:
            files = [f for f in proc.stdout.decode().split("\0") if f]
    if files is None:
        shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
        return
    for rel in files:
        src = source / rel
        if not (src.exists() or src.is_symlink()):
            continue  # deleted in the work tree
        dst = target / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
