"""Verify: the verb that checks that a store's files and its daemon DB agree.

For every valid path: the item exists, its NAR hash and size equal the DB's, its metadata is
canonical (0444/0555 files, 0555 directories, mtime 1 on everything including symlinks), and
every reference is itself valid. This is what `guix gc --verify=contents` checks, plus the
metadata the daemon sets but never checks.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from incstore import db, nar
from incstore.store import Store


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"checked": self.checked, "ok": self.ok, "problems": self.problems}


def metadata_problems(root: Path) -> list[str]:
    """Non-canonical metadata anywhere in the tree at `root`."""
    problems = []

    def check(path: str) -> None:
        st = os.lstat(path)
        if st.st_mtime != 1:
            problems.append(f"{path}: mtime {st.st_mtime} is not 1")
        if stat.S_ISLNK(st.st_mode):
            return
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            if mode != 0o555:
                problems.append(f"{path}: directory mode {mode:o} is not 555")
        elif mode not in (0o444, 0o555):
            problems.append(f"{path}: file mode {mode:o} is not 444 or 555")

    check(str(root))
    if root.is_dir() and not root.is_symlink():
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                check(os.path.join(dirpath, name))
    return problems


def verify_store(store: Store, db_path: Path, paths: Iterable[str] | None = None) -> VerifyReport:
    snapshot = db.read_snapshot(db_path)
    report = VerifyReport()
    for path in sorted(paths if paths is not None else snapshot.infos):
        info = snapshot.infos.get(path)
        if info is None:
            report.problems.append(f"{path}: not valid in the DB")
            continue
        report.checked += 1
        physical = store.physical(path)
        if not os.path.lexists(physical):
            report.problems.append(f"{path}: valid but missing on disk")
            continue
        digest = nar.dump_hashed(physical)
        if digest.db_hash != info.hash or digest.size != info.nar_size:
            report.problems.append(
                f"{path}: NAR {digest.db_hash} differs from the DB's {info.hash}"
            )
        report.problems += metadata_problems(physical)
        report.problems += [
            f"{path}: reference {ref} is not valid"
            for ref in info.references
            if ref not in snapshot.infos
        ]
    return report
