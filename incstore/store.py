"""Store: the physical store directory (and state directory) of one flavour under a prefix.

Paths in the daemon DB and in manifests read `/gnu/store/...`; the files live under
`<prefix>/gnu/store` and the DB under `<prefix>/var/guix/db`, as with Guix's own
`register-items #:prefix`. A prefix of `/` is the real store.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from incstore.atomicfile import temp_owner, writer_alive
from incstore.db import Flavour

TEMP_PREFIX = ".incstore-tmp-"


def _under(prefix: Path, absolute: str) -> Path:
    return prefix / absolute.lstrip("/")


@dataclass(frozen=True)
class Store:
    """The physical layout of one store: where items, the DB and the locks are."""

    prefix: Path
    flavour: Flavour

    @property
    def store_root(self) -> Path:
        return _under(self.prefix, self.flavour.store_dir)

    @property
    def state_root(self) -> Path:
        return _under(self.prefix, self.flavour.state_dir)

    @property
    def default_db(self) -> Path:
        return _under(self.prefix, self.flavour.db_dir) / "db.sqlite"

    @property
    def gc_lock(self) -> Path:
        return self.state_root / "gc.lock"

    def physical(self, store_path: str) -> Path:
        return _under(self.prefix, store_path)

    def exists(self, store_path: str) -> bool:
        return os.path.lexists(self.physical(store_path))

    def owner(self) -> tuple[int, int] | None:
        """Who restored files must belong to, or None when they already do (not root, or root)."""
        if os.geteuid() != 0:
            return None
        st = self.store_root.stat()
        # a privileged daemon's store dir is root:<build group> but its items are root:root;
        # an unprivileged daemon owns the store dir and its items as one user and group
        owner = (st.st_uid, st.st_gid if st.st_uid != 0 else 0)
        return None if owner == (0, 0) else owner

    def lock_file(self, store_path: str) -> Path:
        return self.physical(store_path).with_name(store_path.rsplit("/", 1)[1] + ".lock")

    def temp_name(self, key: str) -> str:
        return f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}-{key}"

    def sweep_temps(self) -> list[str]:
        """Remove temporary entries left in the store by runs that died; return their names."""
        removed = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self.store_root) as entries:
            for entry in entries:
                if not entry.name.startswith(TEMP_PREFIX):
                    continue
                pid = temp_owner(entry.name, TEMP_PREFIX)
                if pid is not None and writer_alive(pid):
                    continue
                remove_tree(Path(entry.path))
                removed.append(entry.name)
        return removed


def canonicalise(root: Path) -> None:
    """Give a tree the daemon's canonical metadata: 0444/0555 files, 0555 dirs, mtime 1."""

    def fix(path: str, st: os.stat_result) -> None:
        if not stat.S_ISLNK(st.st_mode):
            exe = stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IXUSR
            os.chmod(path, 0o555 if exe else 0o444)
        os.utime(path, (1, 1), follow_symlinks=False)

    if root.is_dir() and not root.is_symlink():
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for name in filenames + dirnames:
                full = os.path.join(dirpath, name)
                fix(full, os.lstat(full))
    fix(str(root), os.lstat(root))


def remove_tree(path: Path) -> None:
    """Delete a file or tree whose directories may be read-only (0555, as in the store)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink()
        return
    for root, dirs, _files in os.walk(path):
        os.chmod(root, 0o700)
        for d in dirs:
            full = os.path.join(root, d)
            if not os.path.islink(full):
                os.chmod(full, 0o700)
    shutil.rmtree(path)
