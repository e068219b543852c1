"""A GitHub Actions runner emulator for tests: runs workflow jobs and composite actions the way
GitHub's hosted ubuntu runner and actions/cache do, each job on its own isolated "machine".

Needs root (it creates the ``runner`` user and one mount namespace per job), sudo and zstd;
its ``actions/cache`` steps run the real ``@actions/cache`` client (node and the package that
``.ci/run`` installs: see ``tests/ghcache``) against a local stand-in of the cache service.

Usage::

    from tests.ghrunner import Event, GitHub

    with GitHub(tmp_path, repository="octo-org/incstore", source=ROOT) as gh:
        gh.actions["OWNER/incstore"] = ROOT          # serves OWNER/incstore/...@ref
        first = gh.run(ROOT / ".github/workflows/guix-example.yml", "guix",
                       event=Event.push("main"),
                       setup=lambda m: m.write_file("/gnu/store/abc-x/f", "x")).job
        assert first.success, first.log
        assert first.step("restore").outputs["hit"] == "false"
        assert first.step("restore.cache").outcome == "success"   # inside the composite
        assert [e.key for e in gh.cache.entries] == ["incstore-Linux-10000000001-1"]
        print(first.machine.run("ls /gnu/store").stdout)          # after the job
        gh.clock.advance(days=8)                                   # entries expire
        pr = gh.run(..., event=Event.pull_request(7, base="main")).job

    # one action as step "action" after a checkout, with steps around it
    job = gh.run_action("./.github/actions/save", {"name": "x"}, before=[{"run": "..."}])

- :class:`GitHub`: the repository (name, default branch), its :class:`CacheService` (the
  model: ``gh.cache.entries``...) and :class:`Clock`, ``cache_server`` (the cache service v2 on
  loopback over that model, a :class:`tests.ghcache.CacheServer`: inject its faults there),
  ``actions`` (``uses:`` name -> directory or Python action), ``secrets``, ``vars``;
  :meth:`GitHub.run` runs a job (every matrix combination, concurrently). Each job gets its own
  ``ACTIONS_RUNTIME_TOKEN``, which the service maps to the job's cache scopes.
- :class:`JobResult`: ``status``, ``steps`` (:class:`StepResult` with outcome, conclusion,
  outputs, log, summary), ``outputs``, ``annotations``, ``summary``, ``log`` (masked),
  ``env``/``path`` (what GITHUB_ENV/GITHUB_PATH left), and the job's :class:`Machine`.
- :class:`Machine`: ``run``/``spawn`` inside the job's namespace as root or ``runner``,
  ``path`` (a machine path's host location), ``write_file``, ``bind_readonly``.
"""

from .actions import ActionContext, ActionFailed, PythonAction
from .cache import CacheEntry, CacheService, Clock, cache_version
from .commands import SecretMasker, format_command, parse_command, parse_env_file
from .expressions import Evaluator, ExpressionError, evaluate_template
from .machine import DEFAULT_ISOLATED, Machine, MachineError, ensure_runner_user
from .runner import (
    Annotation,
    Event,
    GitHub,
    JobResult,
    Run,
    StepResult,
    WorkflowError,
)

__all__ = [
    "DEFAULT_ISOLATED",
    "ActionContext",
    "ActionFailed",
    "Annotation",
    "CacheEntry",
    "CacheService",
    "Clock",
    "Evaluator",
    "Event",
    "ExpressionError",
    "GitHub",
    "JobResult",
    "Machine",
    "MachineError",
    "PythonAction",
    "Run",
    "SecretMasker",
    "StepResult",
    "WorkflowError",
    "cache_version",
    "ensure_runner_user",
    "evaluate_template",
    "format_command",
    "parse_command",
    "parse_env_file",
]
