"""Project rules kept true by tests: the README's exit-code table, ruff and mypy."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from incstore.errors import EXIT_CODES

from .conftest import ROOT, needs


def test_readme_exit_code_table_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    table = dict(
        (int(code), text.strip())
        for code, text in re.findall(r"^\| (\d+) \| (.+?) \|$", section, flags=re.M)
    )
    assert table == EXIT_CODES


def test_exit_codes_are_distinct_per_error_class() -> None:
    from incstore import errors

    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.IncstoreError)
               and c is not errors.IncstoreError]
    codes = [c.exit_code for c in classes]
    assert len(codes) == len(set(codes))
    assert all(code in EXIT_CODES for code in codes)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    command = "python3 -m pip install -e '.[test]' && python3 -m pytest"
    assert command in readme
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


@needs(importlib.util.find_spec("ruff"), "ruff not installed (the test extra)")
def test_ruff_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "incstore", "tests", "bench",
                           ".github/actions/generate.py"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_cli_defaults_match_the_library() -> None:
    """cli.py repeats a few defaults so that `--help` does not import the verbs; they must agree."""
    from incstore import cli, gc, save, trust

    assert cli.DEFAULT_LEVEL == save.DEFAULT_LEVEL
    assert cli.DEFAULT_GRACE == gc.DEFAULT_GRACE
    assert Path(cli.DEFAULT_GUIX_ACL) == trust.DEFAULT_GUIX_ACL


@needs(importlib.util.find_spec("mypy"), "mypy not installed (the test extra)")
def test_mypy_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_every_module_opens_with_a_docstring() -> None:
    import ast

    for path in sorted((ROOT / "incstore").glob("*.py")):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), path.name


VERBS = {"save", "restore", "gc", "check", "stats", "verify", "demo"}
FRONT_ENDS = {"cli", "actionstep", "__main__"}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (imports inside functions included)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "incstore":
                found |= {f"incstore.{alias.name}" for alias in node.names}
    return found


def test_the_layering_holds() -> None:
    """Nouns never import verbs or front ends, verbs never import front ends, and only cli
    imports click."""
    problems = []
    for path in sorted((ROOT / "incstore").glob("*.py")):
        module = path.stem
        imported = _imports(path)
        ours = {m.split(".")[1] for m in imported if m.startswith("incstore.")}
        if "click" in {m.split(".")[0] for m in imported} and module != "cli":
            problems.append(f"{module} imports click")
        if module in FRONT_ENDS:
            continue
        forbidden = FRONT_ENDS | (set() if module in VERBS else VERBS)
        problems += [f"{module} imports {m}" for m in sorted(ours & forbidden)]
    assert problems == []
