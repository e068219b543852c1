"""The GitHub Actions runner emulator (tests/ghrunner) itself: shells, file and workflow commands,
sudo, composite actions, conditions, expressions, actions/cache against GitHub's cache rules, and
per-job machine isolation. Needs root (user creation and mount namespaces), sudo and zstd."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .ghrunner import (
    ActionContext,
    CacheService,
    Clock,
    Evaluator,
    Event,
    ExpressionError,
    GitHub,
    JobResult,
    Machine,
    PythonAction,
    cache_version,
    format_command,
    parse_command,
    parse_env_file,
)
from .ghrunner.commands import FileCommandError, SecretMasker
from .ghrunner.expressions import (
    CaseSensitiveDict,
    condition_expression,
    evaluate_template,
    to_json,
)
from .ghrunner.runner import expand_matrix

WS = "/home/runner/work/incstore/incstore"
TOOLS = ("unshare", "nsenter", "setpriv", "sudo", "tar", "zstd")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(t) is None for t in TOOLS),
    reason="the emulator needs root, sudo and zstd (see .ci/run)")


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(content))
    return root


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "src", {"README.md": "hello\n", "data/a.txt": "a\n",
                                         "data/b.txt": "b\n"})


@pytest.fixture
def gh(tmp_path: Path, source: Path) -> Iterator[GitHub]:
    with GitHub(tmp_path / "gh", source=source) as hub:
        yield hub


def ok(job: JobResult) -> JobResult:
    assert job.success, job.log
    return job


def output(step: Any) -> list[str]:
    """A step's log after its header group (what the process printed)."""
    log = step.log
    return log[log.index("##[endgroup]") + 1:] if "##[endgroup]" in log else log


# --- expressions (no machine needed) ----------------------------------------------------------

def ev(expr: str, **contexts: Any) -> Any:
    return Evaluator(contexts).evaluate(expr)


@pytest.mark.parametrize(("expr", "expected"), [
    ("1 == '1'", True), ("'abc' == 'ABC'", True), ("null == 0", True), ("'' == 0", True),
    ("true == 1", True), ("true == 'true'", False), ("'0x10' == 16", True),
    ("' 1.5 ' == 1.5", True), ("'abc' == 0", False), ("'abc' != 0", True),
    ("NaN == NaN", False), ("'a' < 'B'", True), ("'b' >= 'B'", True), ("2 > '10'", False),
    ("null < 1", True), ("false < true", True), ("'x' > 1", False), ("'x' <= 1", False),
    ("!''", True), ("!'false'", False), ("!0", True), ("1 && 'yes'", "yes"),
    ("0 && 'yes'", 0.0), ("'' || 'fallback'", "fallback"), ("'a' || 'b'", "a"),
    ("null || false", False), ("(1 == 1) && (2 == 3) || 'x'", "x"),
    ("contains('Hello World', 'WORLD')", True), ("contains(fromJSON('[1, 2]'), '2')", True),
    ("contains(fromJSON('[\"a\"]'), 'A')", True), ("startsWith('refs/heads/main', 'REFS/')", True),
    ("endsWith('file.TXT', '.txt')", True), ("startsWith(fromJSON('[1]'), '1')", False),
    ("format('{0}-{1}-{{x}}', 'a', 3)", "a-3-{x}"),
    ("join(fromJSON('[1, \"b\", true]'))", "1,b,true"),
    ("join(fromJSON('[\"a\", \"b\"]'), ' | ')", "a | b"), ("join('solo', '-')", "solo"),
    ("fromJSON('{\"a\": {\"b\": [10, 20]}}').a.b[1]", 20.0), ("fromJSON('true')", True),
    ("1.0", 1.0), ("-2.5", -2.5), ("0xff", 255.0),
])
def test_expression_operators_and_coercions(expr: str, expected: Any) -> None:
    result = ev(expr)
    assert result == expected and type(result) is type(expected), (expr, result)


def test_expression_contexts_properties_and_filters() -> None:
    ctx = {"github": {"Event": {"pull_request": {"number": 7}}, "ref": "refs/heads/main"},
           "steps": {"build": {"outputs": {"cache-hit": "true"}, "outcome": "success"}},
           "matrix": {"os": "ubuntu"},
           "needs": {"a": {"outputs": {"x": "1"}}, "b": {"outputs": {"x": "2"}}}}
    assert ev("github.event.pull_request.number", **ctx) == 7
    assert ev("github['REF']", **ctx) == "refs/heads/main"
    assert ev("steps.build.outputs.cache-hit == 'true'", **ctx) is True
    assert ev("steps.missing.outputs.x", **ctx) is None
    assert ev("needs.*.outputs.x", **ctx) == ["1", "2"]
    assert ev("contains(needs.*.outputs.x, '2')", **ctx) is True
    assert ev("toJSON(matrix)", **ctx) == '{\n  "os": "ubuntu"\n}'
    assert ev("toJSON(fromJSON('[]'))") == "[]"
    assert to_json({"a": [1.0, "x"], "b": None}) == \
        '{\n  "a": [\n    1,\n    "x"\n  ],\n  "b": null\n}'
    env = Evaluator({"env": CaseSensitiveDict(HOME="/h")})
    assert env.evaluate("env.HOME") == "/h" and env.evaluate("env.home") is None


def test_expression_templates_numbers_and_errors() -> None:
    e = Evaluator({"github": {"run_id": "42"}})
    assert evaluate_template("k-${{ github.run_id }}-${{ 1 == 1 }}", e) == "k-42-true"
    assert evaluate_template("${{ 3.10 }}", e) == 3.1
    assert evaluate_template("a ${{ 1e20 }} ${{ 0.5 }} ${{ null }}!", e) == "a 1E+20 0.5 !"
    assert evaluate_template("${{ format('{0}}}', 'x') }}", e) == "x}"
    for bad in ("foo.bar", "unknownfn()", "1 ==", "contains('a')", "'unterminated"):
        with pytest.raises(ExpressionError):
            e.evaluate(bad)
    with pytest.raises(ExpressionError, match="Unrecognized named-value: 'foo'"):
        e.evaluate("foo.bar")


def test_if_conditions_get_an_implicit_success() -> None:
    assert condition_expression(None) == "success()"
    assert condition_expression("github.ref == 'x'") == "success() && (github.ref == 'x')"
    assert condition_expression("${{ always() && x }}".replace("x", "true")) == "always() && true"
    assert condition_expression("failure() || cancelled()") == "failure() || cancelled()"
    assert condition_expression(True) == "success() && (true)"
    assert condition_expression("${{ 1 }} == 2") is None


def test_matrix_expansion_with_include_and_exclude() -> None:
    matrix = {"os": ["a", "b"], "v": [1, 2], "exclude": [{"os": "b", "v": 2}],
              "include": [{"os": "a", "extra": "x"}, {"os": "c", "v": 9}]}
    combos = expand_matrix(matrix, Evaluator({}))
    assert combos == [{"os": "a", "v": 1.0, "extra": "x"}, {"os": "a", "v": 2.0, "extra": "x"},
                      {"os": "b", "v": 1.0}, {"os": "c", "v": 9.0}]
    assert expand_matrix(None, Evaluator({})) == [{}]


# --- commands (no machine needed) --------------------------------------------------------------

def test_workflow_command_parsing_and_escapes() -> None:
    cmd = parse_command("::warning file=a%2Cb.py,line=3,title=T%3Ax::one%0Atwo%25")
    assert cmd is not None and cmd.name == "warning"
    assert cmd.properties == {"file": "a,b.py", "line": "3", "title": "T:x"}
    assert cmd.data == "one\ntwo%"
    legacy = parse_command("##[error file=x.c;line=2]boom%3B")
    assert legacy is not None and legacy.properties == {"file": "x.c", "line": "2"}
    assert legacy.data == "boom;"
    assert parse_command("  ::notice::indented") is not None
    assert parse_command("::unknown::x") is None and parse_command("plain") is None
    line = format_command("error", "a\nb%", title="t,1")
    assert line == "::error title=t%2C1::a%0Ab%25"
    assert parse_command(line).data == "a\nb%"  # type: ignore[union-attr]


def test_env_file_parsing_with_heredocs() -> None:
    text = "A=1\nB=x=y\n\nC<<EOF\nline 1\nline 2\nEOF\nD<<EOF\nEOF\nE=\n"
    assert parse_env_file(text) == [("A", "1"), ("B", "x=y"), ("C", "line 1\nline 2"),
                                    ("D", ""), ("E", "")]
    assert parse_env_file("X<<EOF\nv\nEOF") == [("X", "v")]
    for bad, message in [("=1\n", "Name must not be empty"),
                         ("X<<EOF\nv\n", "Matching delimiter"),
                         ("X<<EOF\nv", "EOF marker missing new line"),
                         ("junk\n", "Invalid format")]:
        with pytest.raises(FileCommandError, match=message):
            parse_env_file(bad)


def test_secret_masker_masks_values_lines_and_encodings() -> None:
    m = SecretMasker()
    m.add("s3cr3t-value\nsecond-line")
    assert m.mask("a s3cr3t-value b") == "a *** b"
    assert m.mask("second-line") == "***"
    assert m.mask("czNjcjN0LXZhbHVl") == "***"  # base64


def test_cache_version_is_the_toolkits() -> None:
    expected = hashlib.sha256(b"~/.cache/x|/gnu|zstd-without-long|1.0").hexdigest()
    assert cache_version(["~/.cache/x", "/gnu"]) == expected
    assert cache_version(["p"], cross_os=True) == cache_version(["p"])
    assert cache_version(["p"], "gzip") != cache_version(["p"])


def test_cache_service_lookup_order(tmp_path: Path) -> None:
    clock = Clock()
    svc = CacheService(tmp_path / "svc", clock=clock)
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 10)

    def save(key: str, scope: str = "refs/heads/main", version: str = "v") -> None:
        svc.commit(svc.reserve(key, version, scope), blob)
        clock.advance(seconds=1)

    save("deps-a-1")
    save("deps-a-2")
    save("deps-b")
    save("deps-a-3", version="other")
    save("deps-feature", scope="refs/heads/feature")

    def hit(key: str, restore: list[str], scopes: list[str] | None = None) -> str | None:
        found = svc.lookup(key, restore, "v", scopes or ["refs/heads/main"])
        return found.key if found else None

    assert hit("deps-b", []) == "deps-b"
    assert hit("deps-a", []) == "deps-a-2"  # newest prefix match of the primary key
    assert hit("deps-x", ["deps-a-1", "deps-"]) == "deps-a-1"  # exact restore key first
    assert hit("deps-x", ["nope", "deps-"]) == "deps-b"  # then the newest prefix
    assert hit("deps-a-3", []) is None  # only under another version
    assert hit("deps-a-3", ["deps-a"]) == "deps-a-2"
    assert hit("deps-feature", []) is None
    assert hit("deps-", [], ["refs/heads/feature", "refs/heads/main"]) == "deps-feature"
    assert hit("deps-a-9", ["deps-"], ["refs/heads/feature", "refs/heads/main"]) == "deps-feature"


# --- runs on a machine ---------------------------------------------------------------------

@needs_root
def test_default_shell_and_pipefail(gh: GitHub) -> None:
    job = gh.run_steps([
        {"id": "default", "run": "false | true\necho \"shell=$0 opts=$-\""},
        {"id": "bash", "shell": "bash", "run": "false | true\necho unreachable"},
        {"id": "after", "if": "always()", "shell": "sh", "run": "echo sh:$0"},
        {"id": "py", "if": "always()", "shell": "python3 {0}",
         "run": "import os, sys; print('py', os.path.basename(sys.argv[0]).count('.'))"},
        {"id": "custom", "if": "always()", "shell": "bash -x {0}", "run": "echo x"},
    ])
    assert job.status == "failure"
    default = job.step("default")
    assert default.outcome == "success"
    assert "shell: /usr/bin/bash -e {0}" in default.log
    out = next(line for line in default.log if line.startswith("shell=/"))
    assert out.startswith("shell=/home/runner/work/_temp/") and ".sh opts=" in out
    bash = job.step("bash")
    assert bash.outcome == "failure" and "unreachable" not in output(bash)
    assert "shell: /usr/bin/bash --noprofile --norc -e -o pipefail {0}" in bash.log
    assert "##[error]Process completed with exit code 1." in bash.log
    assert job.errors == ["Process completed with exit code 1."]
    assert "sh:/home/runner/work/_temp/" in job.step("after").text
    assert "py 0" in job.step("py").log  # a custom shell's script has no extension
    assert "+ echo x" in job.step("custom").log


@needs_root
def test_defaults_run_and_working_directory(gh: GitHub) -> None:
    job = gh.run({"on": "push", "defaults": {"run": {"shell": "bash"}},
                  "jobs": {"j": {"defaults": {"run": {"working-directory": "data"}},
                                 "steps": [{"uses": "actions/checkout@v4"},
                                           {"run": "false | true"},
                                           {"run": "echo never"}]}}}).job
    assert job.status == "failure"
    assert "shell: /usr/bin/bash --noprofile --norc -e -o pipefail {0}" in job.log
    job = ok(gh.run_steps([{"uses": "actions/checkout@v4"},
                           {"id": "pwd", "run": "pwd; ls", "working-directory": "data"}]))
    assert job.step("pwd").log[-3:] == [f"{WS}/data", "a.txt", "b.txt"]
    job = gh.run_steps([{"run": "true", "working-directory": "nowhere"}])
    assert not job.success and "with working directory '" + WS + "/nowhere'" in job.log


@needs_root
def test_runner_user_environment_and_contexts(gh: GitHub) -> None:
    job = ok(gh.run_steps([
        {"id": "env", "run": textwrap.dedent("""\
            echo "user=$(id -un) groups=$(id -Gn) home=$HOME pwd=$(pwd)"
            for v in CI GITHUB_ACTIONS GITHUB_WORKSPACE GITHUB_REF GITHUB_REF_NAME GITHUB_SHA \\
                     GITHUB_REPOSITORY GITHUB_EVENT_NAME GITHUB_RUN_ID GITHUB_RUN_ATTEMPT \\
                     GITHUB_JOB RUNNER_OS RUNNER_ARCH RUNNER_TEMP RUNNER_TOOL_CACHE ImageOS; do
              echo "$v=${!v}"
            done
            python3 -c 'import json, os
            event = json.load(open(os.environ["GITHUB_EVENT_PATH"]))
            print("default_branch=" + event["repository"]["default_branch"])'
            echo "path=$PATH"
            """)},
        {"id": "ctx", "run": "echo '${{ github.event_name }} ${{ github.ref_name }} "
                             "${{ runner.os }} ${{ runner.temp }} ${{ github.workspace }} "
                             "${{ github.run_id }} ${{ github.event.repository.default_branch }}'"},
    ], run_id=4242, run_attempt=2))
    log = job.step("env").log
    assert f"user=runner groups=runner adm users docker systemd-journal home=/home/runner " \
           f"pwd={WS}" in log
    expected = {"CI": "true", "GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": WS,
                "GITHUB_REF": "refs/heads/main", "GITHUB_REF_NAME": "main",
                "GITHUB_REPOSITORY": "octo-org/incstore", "GITHUB_EVENT_NAME": "push",
                "GITHUB_RUN_ID": "4242", "GITHUB_RUN_ATTEMPT": "2", "GITHUB_JOB": "job",
                "RUNNER_OS": "Linux", "RUNNER_ARCH": "X64",
                "RUNNER_TEMP": "/home/runner/work/_temp",
                "RUNNER_TOOL_CACHE": "/opt/hostedtoolcache", "ImageOS": "ubuntu24"}
    for k, v in expected.items():
        assert f"{k}={v}" in log
    assert "default_branch=main" in log
    assert "path=/snap/bin:/home/runner/.local/bin:" in job.step("env").text
    assert job.step("ctx").log[-1] == (f"push main Linux /home/runner/work/_temp {WS} 4242 main")


@needs_root
def test_pull_request_context(gh: GitHub) -> None:
    job = ok(gh.run_steps([{"run": "echo \"$GITHUB_REF $GITHUB_BASE_REF $GITHUB_HEAD_REF "
                                   "${{ github.event.pull_request.number }} "
                                   "${{ github.ref_name }}\""}],
                          event=Event.pull_request(17, base="main", head="topic")))
    assert "refs/pull/17/merge main topic 17 17/merge" in job.log


@needs_root
def test_file_commands_env_output_path_and_heredoc(gh: GitHub) -> None:
    job = ok(gh.run_steps([
        {"id": "set", "run": textwrap.dedent("""\
            echo "PLAIN=one" >> "$GITHUB_ENV"
            { echo 'MULTI<<EOF'; echo 'line 1'; echo 'line 2'; echo EOF; } >> "$GITHUB_ENV"
            echo "out=value=with=equals" >> "$GITHUB_OUTPUT"
            { echo 'json<<END'; echo '{"a": 1}'; echo END; } >> "$GITHUB_OUTPUT"
            mkdir -p "$HOME/bin" && printf '#!/bin/sh\\necho mytool ran\\n' > "$HOME/bin/mytool"
            chmod +x "$HOME/bin/mytool" && echo "$HOME/bin" >> "$GITHUB_PATH"
            """)},
        {"id": "use", "env": {"FROM_OUTPUT": "${{ steps.set.outputs.out }}"},
         "run": textwrap.dedent("""\
            echo "plain=$PLAIN multi=[$MULTI] out=$FROM_OUTPUT"
            echo "a=${{ fromJSON(steps.set.outputs.json).a }} env=${{ env.PLAIN }}"
            mytool
            echo "first=${PATH%%:*}"
            """)},
    ]))
    assert job.step("set").outputs == {"out": "value=with=equals", "json": '{"a": 1}'}
    use = job.step("use").text
    assert "plain=one multi=[line 1\nline 2] out=value=with=equals" in use
    assert "a=1 env=one" in use and "mytool ran" in use and "first=/home/runner/bin" in use
    assert job.env == {"PLAIN": "one", "MULTI": "line 1\nline 2"}
    assert job.path == ["/home/runner/bin"]
    bad = gh.run_steps([{"run": "echo 'broken<<EOF' >> $GITHUB_OUTPUT"}])
    assert not bad.success and "Unable to process file command 'output' successfully." in bad.errors


@needs_root
def test_sudo_resets_env_and_drops_github_path_dirs(gh: GitHub) -> None:
    job = gh.run_steps([
        {"run": "mkdir -p ~/tools && printf '#!/bin/sh\\necho tool ok\\n' > ~/tools/mytool && "
                "chmod +x ~/tools/mytool && echo ~/tools >> $GITHUB_PATH && "
                "echo MY_VAR=kept >> $GITHUB_ENV"},
        {"id": "plain", "run": "mytool"},
        {"id": "env", "run": "sudo sh -c 'echo \"root=$(id -u) var=[$MY_VAR] path=$PATH\"'; "
                             "sudo --preserve-env sh -c 'echo \"E var=[$MY_VAR] path=$PATH\"'"},
        {"id": "sudo", "run": "sudo mytool"},
    ])
    assert job.step("plain").log[-1] == "tool ok"
    secure = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/snap/bin"
    assert f"root=0 var=[] path={secure}" in job.step("env").log
    assert f"E var=[kept] path={secure}" in job.step("env").log
    assert job.step("sudo").outcome == "failure"
    assert any("mytool: command not found" in line for line in job.step("sudo").log)


@needs_root
def test_workflow_commands_annotations_masks_and_groups(gh: GitHub) -> None:
    job = ok(gh.run_steps([{"id": "c", "run": textwrap.dedent(f"""\
        echo "::warning file={WS}/src/x.py,line=3,endLine=4,title=Heads up::look%0Ahere"
        echo "::error title=E::bad thing" >&2
        echo "::notice::fyi"
        echo "::group::My group"
        echo inside
        echo "::endgroup::"
        echo "::add-mask::hunter2-secret"
        echo "password is hunter2-secret"
        echo "the token ${{{{ secrets.GITHUB_TOKEN }}}} and ${{{{ secrets.MY_SECRET }}}}"
        echo "::stop-commands::pause-token-123"
        echo "::warning::not processed"
        echo "::pause-token-123::"
        echo "::debug::hidden"
        """)}], secrets={"MY_SECRET": "s3cret-xyz"}))
    anns = {a.level: a for a in job.annotations}
    warning = anns["warning"]
    assert (warning.message, warning.title, warning.file, warning.line, warning.end_line) == \
        ("look\nhere", "Heads up", "src/x.py", 3, 4)
    assert (anns["error"].message, anns["error"].title) == ("bad thing", "E")
    assert anns["notice"].message == "fyi"
    log = output(job.step("c"))
    assert log[log.index("##[group]My group"):log.index("##[group]My group") + 3] == \
        ["##[group]My group", "inside", "##[endgroup]"]
    assert "password is ***" in log and "hunter2-secret" not in "\n".join(log)
    assert "the token *** and ***" in log and "s3cret-xyz" not in job.log
    assert "::warning::not processed" in log and len(job.warnings) == 1
    assert "hidden" not in "\n".join(log)
    failed = gh.run_steps([{"run": "echo '::set-env name=X::1'"}])
    assert not failed.success and any("`set-env` command is disabled" in e for e in failed.errors)


@needs_root
def test_step_summary(gh: GitHub) -> None:
    job = ok(gh.run_steps([
        {"id": "a", "run": "echo '### Title' >> $GITHUB_STEP_SUMMARY; "
                           "echo 'secret ${{ secrets.S }}' >> $GITHUB_STEP_SUMMARY"},
        {"id": "b", "run": "echo '| x |' >> $GITHUB_STEP_SUMMARY"},
    ], secrets={"S": "topsecret1"}))
    assert job.step("a").summary == "### Title\nsecret ***\n"
    assert job.summary == "### Title\nsecret ***\n| x |\n"


@needs_root
def test_conditions_status_functions_and_continue_on_error(gh: GitHub) -> None:
    job = gh.run_steps([
        {"id": "soft", "run": "exit 3", "continue-on-error": True},
        {"id": "check", "run": "echo '${{ steps.soft.outcome }}/${{ steps.soft.conclusion }} "
                               "${{ job.status }}'"},
        {"id": "hard", "run": "exit 1"},
        {"id": "skipped", "run": "echo no"},
        {"id": "on-failure", "if": "failure()", "run": "echo failure seen"},
        {"id": "always", "if": "${{ always() }}", "run": "echo '${{ steps.skipped.outcome }}'"},
        {"id": "expr-false", "if": "always() && github.ref == 'refs/heads/other'", "run": "echo"},
        {"id": "bad-if", "if": "always() && nonsense.x", "run": "echo"},
    ])
    assert job.status == "failure"
    outcomes = {s.qualified_id: (s.outcome, s.conclusion) for s in job.steps}
    assert outcomes == {"soft": ("failure", "success"), "check": ("success", "success"),
                        "hard": ("failure", "failure"), "skipped": ("skipped", "skipped"),
                        "on-failure": ("success", "success"), "always": ("success", "success"),
                        "expr-false": ("skipped", "skipped"), "bad-if": ("failure", "failure")}
    assert job.step("check").log[-1] == "failure/success success"
    assert job.step("always").log[-1] == "skipped"
    assert "##[error]Process completed with exit code 3." in job.step("soft").log


@needs_root
def test_job_outputs_env_matrix_strategy_vars_and_secrets(gh: GitHub) -> None:
    workflow = """
        name: m
        on: push
        env:
          LEVEL: workflow
          OVERRIDDEN: workflow
        jobs:
          build:
            strategy:
              matrix:
                flavour: [guix, nix]
                include:
                  - flavour: nix
                    extra: yes
            env:
              OVERRIDDEN: job-${{ matrix.flavour }}
            outputs:
              result: ${{ steps.s.outputs.r }}
            steps:
              - id: s
                env:
                  STEP: ${{ vars.V }}
                run: |
                  s="${{ strategy.job-index }}/${{ strategy.job-total }}"
                  echo "r=$LEVEL/$OVERRIDDEN/$STEP/$s/${{ matrix.extra }}" >> "$GITHUB_OUTPUT"
    """
    run = gh.run(textwrap.dedent(workflow), vars={"V": "var"})
    results = {j.matrix["flavour"]: j for j in run.jobs}
    assert results["guix"].outputs == {"result": "workflow/job-guix/var/0/2/"}
    assert results["nix"].outputs == {"result": "workflow/job-nix/var/1/2/yes"}
    assert results["nix"].name == "build (nix, yes)"
    single = gh.run(textwrap.dedent(workflow), matrix={"flavour": "nix"})
    assert [j.matrix["flavour"] for j in single.jobs] == ["nix"]
    skipped = gh.run({"on": "push", "jobs": {"j": {"if": "github.event_name == 'pull_request'",
                                                   "steps": [{"run": "true"}]}}}).job
    assert skipped.status == "skipped" and skipped.machine is None


@needs_root
def test_composite_action_inputs_outputs_env_and_action_path(gh: GitHub, source: Path) -> None:
    write_tree(source, {".github/actions/greet/action.yml": """\
        name: greet
        inputs:
          who:
            description: whom
            default: world
          punct:
            default: ${{ github.event_name }}!
        outputs:
          greeting:
            value: ${{ steps.say.outputs.text }}
          status:
            value: ${{ steps.fail.outcome }}
        runs:
          using: composite
          steps:
            - id: say
              shell: bash
              env:
                WHO: ${{ inputs.who }}
              run: |
                echo "text=hello ${WHO}${{ inputs.punct }}" >> "$GITHUB_OUTPUT"
                echo "action_path=$GITHUB_ACTION_PATH ctx=${{ github.action_path }} outer=$OUTER"
                cat "$GITHUB_ACTION_PATH/extra.txt"
            - id: fail
              if: inputs.who == 'fail'
              shell: bash
              run: exit 5
            - id: after-failure
              shell: bash
              run: echo should not run
            - if: failure()
              shell: bash
              run: "echo 'composite saw failure: ${{ steps.fail.outcome }}'"
        """, ".github/actions/greet/extra.txt": "extra file\n"})
    job = gh.run_steps([
        {"id": "missing", "uses": "./.github/actions/greet", "continue-on-error": True},
        {"uses": "actions/checkout@v4"},
        {"id": "g", "uses": "./.github/actions/greet", "with": {"who": "Guix", "bogus": "1"},
         "env": {"OUTER": "from-step"}},
        {"id": "f", "uses": "./.github/actions/greet", "with": {"who": "fail"}},
        {"if": "always()", "run": "echo '${{ steps.g.outputs.greeting }}|"
                                  "${{ steps.f.outcome }}|${{ steps.f.outputs.status }}'"},
    ])
    assert job.step("missing").outcome == "failure"
    assert any("Did you forget to run actions/checkout" in e for e in job.errors)
    g = job.step("g")
    assert g.outputs == {"greeting": "hello Guixpush!", "status": "skipped"}
    path = f"{WS}/.github/actions/greet"
    assert f"action_path={path} ctx={path} outer=from-step" in job.step("g.say").log
    assert "extra file" in job.step("g.say").log
    assert "Unexpected input(s) 'bogus', valid inputs are ['who', 'punct']" in job.warnings
    assert job.step("f").outcome == "failure" and job.step("f.fail").outcome == "failure"
    assert job.step("f.after-failure").outcome == "skipped"
    assert "composite saw failure: failure" in job.log
    assert job.steps[-1].log[-1] == "hello Guixpush!|failure|failure"
    assert job.status == "failure"


@needs_root
def test_composite_run_steps_need_a_shell(gh: GitHub, source: Path) -> None:
    write_tree(source, {"act/action.yml": """\
        runs:
          using: composite
          steps:
            - run: echo hi
        """})
    job = gh.run_action("./act")
    assert not job.success and any("Required property is missing: shell" in e
                                   for e in job.errors)


@needs_root
def test_pluggable_actions(gh: GitHub, source: Path, tmp_path: Path) -> None:
    calls: list[str] = []

    def hello(ctx: ActionContext) -> None:
        calls.append(ctx.get_input("name"))
        ctx.set_output("greeting", f"hi {ctx.get_input('name')}")
        ctx.export_variable("FROM_ACTION", "yes")
        ctx.warning("from python")
        assert ctx.exec(["sh", "-c", "id -un; echo ::notice::child"]) == 0

    def post(ctx: ActionContext) -> None:
        ctx.info(f"post saw state {ctx.get_state('s')}")

    def main_with_state(ctx: ActionContext) -> None:
        ctx.save_state("s", "kept")

    gh.actions["octo/hello"] = hello
    gh.actions["octo/stateful@v2"] = PythonAction(main_with_state, post=post)
    other = write_tree(tmp_path / "other-repo", {"sub/action.yml": """\
        inputs:
          x: {default: dflt}
        outputs:
          y: {value: "${{ steps.s.outputs.y }}"}
        runs:
          using: composite
          steps:
            - id: s
              shell: bash
              run: echo "y=${{ inputs.x }}@$(basename $GITHUB_ACTION_PATH)" >> $GITHUB_OUTPUT
        """})
    gh.actions["octo/other"] = other
    job = gh.run_steps([
        {"id": "h", "uses": "octo/hello@v1", "with": {"name": "Ann"}},
        {"run": "echo \"FROM_ACTION=$FROM_ACTION\""},
        {"id": "st", "uses": "octo/stateful@v2"},
        {"id": "o", "uses": "octo/other/sub@v3"},
        {"id": "nope", "uses": "octo/unknown@v1"},
    ])
    assert calls == ["Ann"]
    assert job.step("h").outputs == {"greeting": "hi Ann"}
    assert "runner" in job.step("h").log and "child" in job.notices
    assert "FROM_ACTION=yes" in job.log and "from python" in job.warnings
    assert job.step("o").outputs == {"y": "dflt@sub"}
    assert "post saw state kept" in job.step("st", stage="post").log
    assert job.step("nope").outcome == "failure"
    assert any("Unable to resolve action `octo/unknown@v1`" in e for e in job.errors)


@needs_root
def test_hash_files(gh: GitHub) -> None:
    job = ok(gh.run_steps([{"uses": "actions/checkout@v4"},
                           {"run": "echo 'h=${{ hashFiles('data/*.txt') }}|"
                                   "${{ hashFiles('nothing/**') }}|'"}]))
    digest = hashlib.sha256(hashlib.sha256(b"a\n").digest()
                            + hashlib.sha256(b"b\n").digest()).hexdigest()
    assert f"h={digest}||" in job.log


# --- machines ---------------------------------------------------------------------------------

@needs_root
def test_jobs_get_isolated_machines(gh: GitHub) -> None:
    host_gnu = sorted(os.listdir("/gnu")) if os.path.isdir("/gnu") else []

    def setup(machine: Machine) -> None:
        machine.write_file("/gnu/store/abc-preinstalled/README", "from the hook\n")

    workflow = {"on": "push", "jobs": {"j": {
        "strategy": {"matrix": {"n": [1, 2]}},
        "steps": [{"run": "sudo mkdir -p /gnu/store/job-${{ matrix.n }} /var/guix/db && "
                          "sudo touch /etc/guix/acl-${{ matrix.n }} && sleep 0.3 && "
                          "ls /gnu/store /etc/guix | tr '\\n' ' '"}]}}}
    run = gh.run(workflow, setup=setup)
    for job in run.jobs:
        n = int(job.matrix["n"])
        other = 3 - n
        assert job.success, job.log
        line = job.steps[0].log[-1]
        assert f"job-{n}" in line and f"job-{other}" not in line and "abc-preinstalled" in line
        assert job.machine is not None
        after = job.machine.run("ls /gnu/store; cat /gnu/store/abc-preinstalled/README")
        assert f"job-{n}" in after.stdout and "from the hook" in after.stdout
        assert job.machine.path("/gnu/store") .joinpath(f"job-{n}").is_dir()
    assert (sorted(os.listdir("/gnu")) if os.path.isdir("/gnu") else []) == host_gnu
    assert not os.path.exists("/etc/guix/acl-1")


@needs_root
def test_read_only_store_and_daemons(gh: GitHub) -> None:
    def setup(machine: Machine) -> None:
        machine.write_file("/gnu/store/xyz-item/file", "x")
        machine.bind_readonly("/gnu/store")
        machine.spawn(["flock", "/var/guix/big-lock", "sleep", "300"])
        for _ in range(100):
            if machine.path("/var/guix/big-lock").exists():
                break
            time.sleep(0.02)

    job = gh.run_steps([
        {"id": "ro", "run": "sudo touch /gnu/store/new 2>&1 || echo 'write refused'"},
        {"id": "lock", "run": "flock -n /var/guix/big-lock true || echo 'lock held'"},
        {"id": "bg", "run": "nohup sleep 300 > /dev/null 2>&1 &"},
    ], setup=setup)
    assert job.success, job.log
    assert "write refused" in job.step("ro").log
    assert "lock held" in job.step("lock").log
    assert job.machine is not None
    procs = []
    for pid in job.machine.processes():
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if cmdline.strip():  # an empty command line: a process exiting
                procs.append((Path(f"/proc/{pid}").stat().st_uid, cmdline.strip()))
    assert (0, "flock /var/guix/big-lock sleep 300") in procs  # the hook's daemon survives
    assert not [p for p in procs if p[0] != 0]  # the step's orphan is gone
    # (the orphan is normally logged as "Terminate orphan process"; this machine's init may
    # also reap it first, so the kill itself is checked in test_machine_kills_tracked_orphans)


# --- actions/cache ---------------------------------------------------------------------------

def cache_steps(key: str, restore_keys: str = "", *, action: str = "actions/cache@v4",
                path: str = "~/.cache/thing", content: str = "data", **extra: Any
                ) -> list[dict[str, Any]]:
    with_: dict[str, Any] = {"path": path, "key": key, **extra}
    if restore_keys:
        with_["restore-keys"] = restore_keys
    return [
        {"id": "cache", "uses": action, "with": with_},
        {"id": "show", "run": f"cat {path}/file 2>/dev/null || echo absent"},
        {"id": "fill", "run": f"mkdir -p {path} && echo {content} > {path}/file"},
    ]


def save_steps(key: str, content: str, path: str = "~/.cache/thing") -> list[dict[str, Any]]:
    return [{"run": f"mkdir -p {path} && echo {content} > {path}/file"},
            {"id": "save", "uses": "actions/cache/save@v4", "with": {"path": path, "key": key}}]


@needs_root
def test_cache_miss_then_post_save_then_exact_hit(gh: GitHub) -> None:
    first = ok(gh.run_steps(cache_steps("deps-1", "deps-")))
    assert first.step("cache").outputs == {}  # cache-hit is not set on a miss
    assert "Cache not found for input keys: deps-1, deps-" in first.step("cache").log
    assert first.step("show").log[-1] == "absent"
    post = first.step("cache", stage="post")
    assert "Cache saved with key: deps-1" in post.log
    assert any(line.startswith("[command]/usr/bin/tar --posix -cf cache.tzst --exclude "
                               f"cache.tzst -P -C {WS} --files-from manifest.txt "
                               "--use-compress-program zstdmt") for line in post.log)
    [entry] = gh.cache.entries
    assert (entry.key, entry.scope, entry.version) == \
        ("deps-1", "refs/heads/main", cache_version(["~/.cache/thing"]))
    assert entry.size == gh.cache.total_size > 0

    second = ok(gh.run_steps(cache_steps("deps-1", "deps-")))
    assert second.step("cache").outputs == {"cache-hit": "true"}
    assert second.step("show").log[-1] == "data"
    assert "Cache hit occurred on the primary key deps-1, not saving cache." in \
        second.step("cache", stage="post").log

    partial = ok(gh.run_steps(cache_steps("deps-2", "deps-", content="newer")))
    assert partial.step("cache").outputs == {"cache-hit": "false"}
    assert "Cache restored from key: deps-1" in partial.step("cache").log
    assert "Cache saved with key: deps-2" in partial.step("cache", stage="post").log
    assert gh.cache.keys() == ["deps-1", "deps-2"]

    failed = gh.run_steps([*cache_steps("deps-3"), {"run": "exit 1"}])
    post = failed.step("cache", stage="post")
    assert post.outcome == "skipped" and gh.cache.keys() == ["deps-1", "deps-2"]


@needs_root
def test_restore_only_outputs_newest_prefix_and_version(gh: GitHub) -> None:
    gh.run_steps(save_steps("os-a-1", "one"))
    gh.clock.advance(minutes=1)
    gh.run_steps(save_steps("os-a-2", "two"))
    gh.clock.advance(minutes=1)
    gh.run_steps(save_steps("os-b-1", "three"))
    job = ok(gh.run_steps(cache_steps("os-a-9", "os-x-\nos-a-", action="actions/cache/restore@v4")))
    assert job.step("cache").outputs == {"cache-primary-key": "os-a-9",
                                         "cache-matched-key": "os-a-2", "cache-hit": "false"}
    assert job.step("show").log[-1] == "two"
    assert "Cache hit for restore-key: os-a-2" in job.step("cache").log
    exact = ok(gh.run_steps(cache_steps("OS-A-1", action="actions/cache/restore@v4")))
    assert exact.step("cache").outputs["cache-hit"] == "true"  # keys ignore case
    assert exact.step("cache").outputs["cache-matched-key"] == "os-a-1"
    prefix = ok(gh.run_steps(cache_steps("os-", action="actions/cache/restore@v4")))
    assert prefix.step("cache").outputs["cache-matched-key"] == "os-b-1"
    other_path = ok(gh.run_steps(cache_steps("os-a-1", "os-", path="~/.cache/other",
                                             action="actions/cache/restore@v4")))
    assert other_path.step("cache").outputs == {"cache-primary-key": "os-a-1"}
    lookup = ok(gh.run_steps(cache_steps("os-a-1", action="actions/cache/restore@v4",
                                         **{"lookup-only": "true"})))
    assert lookup.step("cache").outputs["cache-hit"] == "true"
    assert lookup.step("show").log[-1] == "absent"
    assert "Cache found and can be restored from key: os-a-1" in lookup.step("cache").log
    miss = gh.run_steps(cache_steps("zzz", action="actions/cache/restore@v4",
                                    **{"fail-on-cache-miss": "true"}))
    assert not miss.success and miss.errors == [
        "Failed to restore cache entry. Exiting as fail-on-cache-miss is set. Input key: zzz"]


@needs_root
def test_cache_scopes_for_branches_and_pull_requests(gh: GitHub) -> None:
    gh.run_steps(save_steps("k-main", "main"))
    gh.clock.advance(seconds=5)
    gh.run_steps(save_steps("k-feature", "feature"), event=Event.push("feature"))
    gh.clock.advance(seconds=5)
    gh.run_steps(save_steps("k-pr", "pr"), event=Event.pull_request(5, base="release",
                                                                    head="feature"))
    gh.clock.advance(seconds=5)
    gh.run_steps(save_steps("k-release", "release"), event=Event.push("release"))
    scopes = {e.key: e.scope for e in gh.cache.entries}
    assert scopes == {"k-main": "refs/heads/main", "k-feature": "refs/heads/feature",
                      "k-pr": "refs/pull/5/merge", "k-release": "refs/heads/release"}

    def matched(event: Event) -> str | None:
        job = ok(gh.run_steps(cache_steps("k-none", "k-", action="actions/cache/restore@v4"),
                              event=event))
        return job.step("cache").outputs.get("cache-matched-key")

    assert matched(Event.push("main")) == "k-main"  # not the newer branch entries
    assert matched(Event.push("feature")) == "k-feature"  # own scope first
    assert matched(Event.push("other")) == "k-main"  # falls back to the default branch
    assert matched(Event.pull_request(5, base="release")) == "k-pr"
    assert matched(Event.pull_request(6, base="release")) == "k-release"  # base branch next
    assert matched(Event.pull_request(7, base="feature")) == "k-feature"
    assert matched(Event.tag("v1")) == "k-main"


@needs_root
def test_existing_key_is_immutable(gh: GitHub) -> None:
    ok(gh.run_steps(save_steps("fixed", "first")))
    again = ok(gh.run_steps(save_steps("fixed", "second")))
    assert ("Failed to save: Unable to reserve cache with key fixed, another job may be creating "
            "this cache.") in again.step("save").log
    assert again.warnings == ["Cache save failed."]
    job = ok(gh.run_steps(cache_steps("fixed", action="actions/cache/restore@v4")))
    assert job.step("show").log[-1] == "first"
    # the combined action's post step logs the same, without the warning
    combined = ok(gh.run_steps([*cache_steps("fixed2"), *save_steps("fixed2", "x")]))
    assert combined.warnings == []
    assert any("Unable to reserve cache with key fixed2" in line
               for line in combined.step("cache", stage="post").log)


@needs_root
def test_concurrent_saves_of_one_key_one_wins(gh: GitHub) -> None:
    workflow = {"on": "push", "jobs": {"race": {
        "strategy": {"matrix": {"n": [1, 2, 3]}},
        "steps": [{"run": "mkdir -p ~/.cache/thing && echo ${{ matrix.n }} > ~/.cache/thing/file"},
                  {"id": "save", "uses": "actions/cache/save@v4",
                   "with": {"path": "~/.cache/thing", "key": "race-key"}}]}}}
    run = gh.run(workflow)
    assert all(j.success for j in run.jobs)
    assert len(gh.cache.entries) == 1
    winners = [j for j in run.jobs if "Cache saved with key: race-key" in j.log]
    losers = [j for j in run.jobs if j.warnings == ["Cache save failed."]]
    assert len(winners) == 1 and len(losers) == 2
    job = ok(gh.run_steps(cache_steps("race-key", action="actions/cache/restore@v4")))
    assert job.step("show").log[-1] == str(int(winners[0].matrix["n"]))


@needs_root
def test_rate_limit_eviction_and_expiry(gh: GitHub) -> None:
    gh.cache.rate_limit = 2
    for i in range(2):
        ok(gh.run_steps(save_steps(f"r{i}", str(i))))
    limited = ok(gh.run_steps(save_steps("r2", "2")))
    assert limited.warnings[0].startswith("You've hit a rate limit, your rate limit will reset in")
    assert limited.warnings[1:] == ["Cache save failed."]
    assert gh.cache.keys() == ["r0", "r1"]
    gh.clock.advance(seconds=61)
    ok(gh.run_steps(save_steps("r2", "2")))
    assert gh.cache.keys() == ["r0", "r1", "r2"]

    # least recently accessed goes first once over the size limit
    size = gh.cache.entries[0].size
    gh.clock.advance(minutes=1)
    ok(gh.run_steps(cache_steps("r0", action="actions/cache/restore@v4")))  # r0 accessed
    gh.cache.size_limit = 3 * size + size // 2
    gh.clock.advance(minutes=1)
    ok(gh.run_steps(save_steps("r3", "3")))
    assert gh.cache.keys() == ["r0", "r2", "r3"]
    assert gh.cache.total_size <= gh.cache.size_limit

    # not accessed for more than 7 days: gone
    gh.clock.advance(days=6)
    ok(gh.run_steps(cache_steps("r3", action="actions/cache/restore@v4")))
    gh.clock.advance(days=1, hours=1)
    assert gh.cache.keys() == ["r3"]


@needs_root
def test_cache_key_validation_and_unreadable_files(gh: GitHub) -> None:
    comma = gh.run_steps(cache_steps("a,b"))
    assert not comma.success and comma.errors == ["Key Validation Error: a,b cannot contain "
                                                  "commas."]
    long_key = "k" * 513
    job = ok(gh.run_steps(save_steps(long_key, "x")))
    assert f"[warning]Key Validation Error: {long_key} cannot be larger than 512 characters." \
        in job.log
    missing = ok(gh.run_steps([{"id": "save", "uses": "actions/cache/save@v4",
                                "with": {"path": "/nonexistent", "key": "m"}}]))
    assert any("Path Validation Error: Path(s) specified in the action for caching do(es) not "
               "exist" in line for line in missing.log_lines)
    unreadable = ok(gh.run_steps([
        {"run": "mkdir -p ~/.cache/thing && echo s > ~/.cache/thing/secret && "
                "sudo chown root:root ~/.cache/thing/secret && "
                "sudo chmod 600 ~/.cache/thing/secret"},
        {"id": "save", "uses": "actions/cache/save@v4",
         "with": {"path": "~/.cache/thing", "key": "unreadable"}}]))
    assert unreadable.warnings == [
        "Failed to save: \"/usr/bin/tar\" failed with error: The process '/usr/bin/tar' failed "
        "with exit code 2", "Cache save failed."]
    assert gh.cache.find("unreadable") == []


@needs_root
def test_cache_restores_absolute_paths_as_runner(gh: GitHub) -> None:
    saved = ok(gh.run_steps([
        {"run": "sudo mkdir -p /var/guix/cachedir && sudo chown runner /var/guix/cachedir && "
                "echo abs > /var/guix/cachedir/f"},
        {"uses": "actions/cache/save@v4", "with": {"path": "/var/guix/cachedir", "key": "abs"}}]))
    assert gh.cache.keys() == ["abs"], saved.log
    job = ok(gh.run_steps([
        {"run": "sudo mkdir -p /var/guix/cachedir && sudo chown runner /var/guix/cachedir"},
        {"uses": "actions/cache/restore@v4", "with": {"path": "/var/guix/cachedir", "key": "abs"}},
        {"id": "show", "run": "stat -c '%U %n' /var/guix/cachedir/f; cat /var/guix/cachedir/f"}]))
    assert job.step("show").log[-2:] == ["runner /var/guix/cachedir/f", "abs"]
    denied = ok(gh.run_steps([{"uses": "actions/cache/restore@v4",
                               "with": {"path": "/var/guix/cachedir", "key": "abs"}}]))
    assert any(w.startswith("Failed to restore: \"/usr/bin/tar\" failed") for w in denied.warnings)


@needs_root
def test_run_action_with_a_repository_checkout(gh: GitHub, source: Path) -> None:
    write_tree(source, {".github/actions/echo/action.yml": """\
        inputs:
          msg: {default: none}
        outputs:
          said: {value: "${{ steps.e.outputs.said }}"}
        runs:
          using: composite
          steps:
            - id: e
              shell: bash
              env:
                MSG: ${{ inputs.msg }}
              run: echo "said=$MSG" >> "$GITHUB_OUTPUT"
        """})
    job = ok(gh.run_action("./.github/actions/echo", {"msg": "hi"}))
    assert job.step("action").outputs == {"said": "hi"}


def test_event_helpers() -> None:
    pr = Event.pull_request(3, base="main", head="x")
    assert (pr.ref, pr.ref_name, pr.base_ref, pr.head_ref) == ("refs/pull/3/merge", "3/merge",
                                                               "main", "x")
    assert Event.tag("v1").ref_type == "tag" and Event.push("a/b").ref_name == "a/b"


@needs_root
def test_machine_runs_commands_as_root_or_runner(tmp_path: Path) -> None:
    with Machine(tmp_path / "m", ["/gnu", "/home/runner"]) as m:
        assert m.run(["id", "-un"]).stdout.strip() == "root"
        assert m.run(["id", "-un"], user="runner").stdout.strip() == "runner"
        m.run("mkdir -p /gnu/store && echo in > /gnu/store/x", check=True)
        assert (tmp_path / "m/fs/gnu/store/x").read_text() == "in\n"
        assert m.path("/gnu/store/x") == tmp_path / "m/fs/gnu/store/x"
        assert m.path("/etc/passwd") == Path("/etc/passwd")
        assert m.which("bash", "/usr/bin:/bin") == "/usr/bin/bash"
    assert m.processes() == [] and m.closed
    assert subprocess.run(["true"]).returncode == 0


@needs_root
def test_nested_composites_and_post_steps_inside_them(gh: GitHub, source: Path) -> None:
    write_tree(source, {
        "actions/outer/action.yml": """\
            inputs:
              key: {default: nested}
            outputs:
              hit: {value: "${{ steps.inner.outputs.hit }}"}
            runs:
              using: composite
              steps:
                - id: inner
                  uses: ./actions/inner
                  with:
                    key: ${{ inputs.key }}
                - shell: bash
                  run: mkdir -p ~/.cache/nested && echo n > ~/.cache/nested/f
            """,
        "actions/inner/action.yml": """\
            inputs:
              key: {required: true}
            outputs:
              hit: {value: "${{ steps.cache.outputs.cache-hit || 'unset' }}"}
            runs:
              using: composite
              steps:
                - id: cache
                  uses: actions/cache@v4
                  with:
                    path: ~/.cache/nested
                    key: ${{ inputs.key }}
            """})
    steps = [{"uses": "actions/checkout@v4"}, {"id": "outer", "uses": "./actions/outer"}]
    first = ok(gh.run_steps(steps))
    assert first.step("outer").outputs == {"hit": "unset"}
    assert first.step("outer.inner.cache").outcome == "success"
    assert "Cache saved with key: nested" in first.step("outer.inner.cache", stage="post").log
    second = ok(gh.run_steps(steps))
    assert second.step("outer").outputs == {"hit": "true"}


@needs_root
def test_machine_kills_tracked_orphans(tmp_path: Path) -> None:
    with Machine(tmp_path / "m", ["/home/runner"]) as m:
        env = dict(m.default_env("runner"), RUNNER_TRACKING_ID="github_x")
        tracked = m.popen(["sleep", "300"], user="runner", env=env)
        other = m.popen(["sleep", "301"], user="runner")
        for _ in range(500):  # until both have entered the namespace and exec'd sleep
            cmdlines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in m.processes()}
            if sorted(cmdlines) == sorted([tracked.pid, other.pid]) and all(
                    c.startswith(b"sleep") for c in cmdlines.values()):
                break
            time.sleep(0.01)
        killed = m.kill_where(lambda pid, environ: environ.get("RUNNER_TRACKING_ID") == "github_x")
        assert killed == [tracked.pid]
        assert tracked.wait(5) == -9 and other.poll() is None
        assert m.processes() == [other.pid]
    assert other.wait(5) == -9
