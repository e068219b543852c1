"""Store: the physical layout of one flavour's store and state directories under a prefix.

Paths in the daemon DB and in manifests read `/gnu/store/...`; the files live under
`<prefix>/gnu/store` and the DB under `<prefix>/var/guix/db`, as with Guix's own
`register-items #:prefix`. A prefix of `/` is the real store. What is done *inside* the store
directory goes through `storedir.StoreDir`; this module only says where things are and whom
restored files must belong to.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from incstore.db import Flavour
from incstore.errors import StoreError
from incstore.storedir import StoreDir

# the daemon's own account when it runs unprivileged (Guix's `guix-daemon` service user)
DAEMON_USERS = {"guix": "guix-daemon", "nix": "nix-daemon"}


def _under(prefix: Path, absolute: str) -> Path:
    return prefix / absolute.lstrip("/")


@dataclass(frozen=True)
class Store:
    """Where items, the DB and the locks of one store are."""

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

    def daemon_owner(self) -> tuple[int, int] | None:
        """Whom restored files must belong to, when that is not the user running incstore.

        Only root can give files away. The daemon expects root:root, unless it runs
        unprivileged as its own service user, which then owns the store: a running daemon
        process tells, else that user's existence and its owning the store directory. Who
        happens to own the store directory otherwise (a runner user that unpacked the binary
        tarball, say) does not matter.
        """
        if os.geteuid() != 0:
            return None
        found = _running_daemon_owner(self.flavour.name)
        if found is not None and found != (0, 0) and not _is_daemon_account(
                found[0], self.flavour.name):
            # anyone can name a process guix-daemon: only root's or the service account's
            # counts, or a user could have a root restore give every item to them
            found = None
        if found is None:
            with contextlib.suppress(KeyError):
                user = pwd.getpwnam(DAEMON_USERS[self.flavour.name])
                with contextlib.suppress(OSError):
                    if self.store_root.stat().st_uid == user.pw_uid:
                        found = (user.pw_uid, user.pw_gid)
        return None if found is None or found == (0, 0) else found


def _is_daemon_account(uid: int, flavour: str) -> bool:
    try:
        return pwd.getpwuid(uid).pw_name == DAEMON_USERS[flavour]
    except KeyError:
        return False


def _running_daemon_owner(flavour: str) -> tuple[int, int] | None:
    """The effective uid and gid of a running `<flavour>-daemon` process, if one runs."""
    wanted = f"{flavour}-daemon"
    with contextlib.suppress(OSError), os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry.name}/comm", "rb") as f:
                    if f.read().strip() != wanted.encode():
                        continue
                ids: dict[str, int] = {}
                with open(f"/proc/{entry.name}/status", "rb") as f:
                    for line in f:
                        key, _, rest = line.partition(b":")
                        if key in (b"Uid", b"Gid"):
                            ids[key.decode()] = int(rest.split()[1])  # effective id
                return ids["Uid"], ids["Gid"]
    return None


def parse_owner(text: str) -> tuple[int, int]:
    """`USER[:GROUP]` or `UID[:GID]` for --owner."""
    import grp

    user, _, group = text.partition(":")
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid = pw.pw_uid, pw.pw_gid
    except KeyError:
        if not user.isdigit():
            raise StoreError("no such user", item=user) from None
        uid, gid = int(user), int(user)
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise StoreError("no such group", item=group) from None
    return uid, gid


def canonicalise(root: Path) -> None:
    """Give a tree the daemon's canonical metadata: 0444/0555 files, 0555 dirs, mtime 1.
    For trees this program builds itself (sample stores, benchmarks), not hostile ones."""

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
    """Delete a file or tree whose directories may be read-only (0555, as in the store),
    through descriptors, never following a symlink (see `StoreDir.remove`)."""
    with StoreDir(path.parent) as parent:
        parent.remove(path.name).raise_if_failed(str(path))
