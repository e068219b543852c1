"""Store directory: the target store (`/gnu/store` under a prefix), touched only through a
directory file descriptor.

Everything a restore does to the store — per-item locks, temporary trees, renames into place,
removal of debris and of failed trees — goes through this one object, relative to the
descriptor of the store directory and never by path. No symlink is ever followed: names are
single components (a store entry, a lock file), subdirectories are opened with O_NOFOLLOW, and
directories are made writable with fchmod on their own descriptor. A process that can write
inside debris may swap a directory for a symlink at any moment; the worst it can achieve is
that its own entries are deleted.

Removal works for trees of any depth: descent keeps at most `MAX_OPEN` directory descriptors,
and a subtree deeper than that is renamed up into the store directory under a temporary name
and removed on its own, so neither PATH_MAX nor the descriptor limit nor Python's recursion
limit is ever reached.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from incstore import atomicfile
from incstore.atomicfile import temp_owner, writer_alive
from incstore.errors import LockedError, StoreError
from incstore.locks import Primitive, acquire, open_lock_file

TEMP_PREFIX = ".incstore-tmp-"
LOCK_SUFFIX = ".lock"
MAX_OPEN = 64  # directory descriptors one removal keeps open at most
LOCK_ATTEMPTS = 100  # lock files found non-empty and replaced before giving up
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_NOREPLACE = 1


def _renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


@dataclass
class RemoveReport:
    """What a removal could not do: entries left behind, each with the reason."""

    failures: list[str] = field(default_factory=list)

    def raise_if_failed(self, item: str) -> None:
        if self.failures:
            more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
            raise StoreError(f"cannot remove {self.failures[0]}{more}", item=item)


class StoreDir:
    """An open store directory. Use as a context manager, or `close()` it."""

    def __init__(self, root: Path, *, create: bool = False) -> None:
        self.root = root
        if create:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                raise StoreError("is not a directory", item=str(root)) from None
            except OSError as e:
                raise StoreError(f"cannot create the store directory: {e.strerror}",
                                 item=str(root)) from None
        try:
            self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except NotADirectoryError:
            raise StoreError("is not a directory", item=str(root)) from None
        except OSError as e:
            raise StoreError(f"cannot open the store directory: {e.strerror}",
                             item=str(root)) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> StoreDir:
        return self

    def sync_trees(self) -> None:
        """Make every file written under the store durable (one syncfs for all the trees a
        restore extracted, not an fsync per file): before any of them gets its final name."""
        atomicfile.syncfs(self.fd)

    def sync_names(self) -> None:
        """Make the renames into the store directory durable: before the DB may name them."""
        os.fsync(self.fd)

    def __exit__(self, *exc: object) -> None:
        self.close()

    # looking ---------------------------------------------------------------------------
    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return self.lstat(name) is not None

    def listing(self) -> set[str]:
        """Every name in the directory, read at once."""
        return set(os.listdir(self.fd))

    def names(self) -> Iterator[str]:
        with os.scandir(self.fd) as entries:
            for entry in entries:
                yield entry.name

    def free_bytes(self) -> int:
        st = os.fstatvfs(self.fd)
        return st.f_bavail * st.f_frsize

    def read_only(self) -> bool:
        return bool(os.fstatvfs(self.fd).f_flag & os.ST_RDONLY)

    def temp_name(self, tag: str) -> str:
        return f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}-{tag}"

    # moving ----------------------------------------------------------------------------
    def rename_new(self, src: str, dst: str) -> None:
        """Rename `src` to `dst`, failing with FileExistsError if `dst` exists (atomically
        where the kernel can: an entry that appeared meanwhile is never replaced)."""
        if _RENAMEAT2 is not None:
            if _RENAMEAT2(self.fd, os.fsencode(src), self.fd, os.fsencode(dst),
                          _RENAME_NOREPLACE) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EINVAL):
                raise OSError(err, os.strerror(err), dst)
        if self.exists(dst):
            raise FileExistsError(errno.EEXIST, "exists", dst)
        os.rename(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def replace(self, src: str, dst: str) -> RemoveReport:
        """Put `src` at `dst`; whatever was at `dst` (debris) is moved aside first and then
        removed, so the name is never empty for long and never holds a partial tree."""
        try:
            self.rename_new(src, dst)
            return RemoveReport()
        except FileExistsError:
            pass
        aside = self.temp_name("debris")
        os.rename(dst, aside, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        self.rename_new(src, dst)
        return self.remove(aside)

    # removing --------------------------------------------------------------------------
    def remove(self, name: str) -> RemoveReport:
        """Delete the entry `name` (a file, symlink or tree of any depth) without following
        any symlink; what cannot be deleted is reported, not raised."""
        report = RemoveReport()
        pending = [name]
        while pending:
            self._remove_top(pending.pop(), pending, report)
        return report

    def _open_subdir(self, parent: int, name: str) -> int | None:
        """Open a subdirectory and make it writable; None if it is not (or no longer) one."""
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        except (NotADirectoryError, FileNotFoundError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:  # swapped for a symlink: unlinked as a plain entry
                return None
            raise
        try:
            os.fchmod(fd, 0o700)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _remove_top(self, top: str, pending: list[str], report: RemoveReport) -> None:
        try:
            fd = self._open_subdir(self.fd, top)
        except OSError as e:
            report.failures.append(f"{top}: {e.strerror}")
            return
        if fd is None:
            self._unlink(self.fd, top, report)
            return
        # each frame: (descriptor, its name in the parent, subdirectories still to visit)
        stack: list[tuple[int, str, list[str]]] = []
        try:
            stack.append((fd, top, self._clear_files(fd, report)))
            while stack:
                fd, dir_name, subdirs = stack[-1]
                if not subdirs:
                    stack.pop()
                    os.close(fd)
                    parent = stack[-1][0] if stack else self.fd
                    try:
                        os.rmdir(dir_name, dir_fd=parent)
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        report.failures.append(f"{dir_name}: {e.strerror}")
                    continue
                child = subdirs.pop()
                try:
                    cfd = self._open_subdir(fd, child)
                except OSError as e:
                    report.failures.append(f"{child}: {e.strerror}")
                    continue
                if cfd is None:
                    self._unlink(fd, child, report)
                    continue
                if len(stack) >= MAX_OPEN:
                    # too deep to keep descending: lift the subtree up into the store
                    # directory and remove it on its own afterwards
                    os.close(cfd)
                    lifted = self.temp_name("deep")
                    try:
                        os.rename(child, lifted, src_dir_fd=fd, dst_dir_fd=self.fd)
                        pending.append(lifted)
                    except OSError as e:
                        report.failures.append(f"{child}: {e.strerror}")
                    continue
                stack.append((cfd, child, self._clear_files(cfd, report)))
        finally:
            for frame in stack:
                os.close(frame[0])

    def _clear_files(self, fd: int, report: RemoveReport) -> list[str]:
        """Unlink every non-directory entry of the directory `fd`; return its subdirectories."""
        subdirs = []
        with os.scandir(fd) as entries:
            listing = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        for name, is_dir in listing:
            if is_dir:
                subdirs.append(name)
            elif not self._unlink(fd, name, report):
                subdirs.append(name)  # it became a directory meanwhile
        return subdirs

    def _unlink(self, parent: int, name: str, report: RemoveReport) -> bool:
        """Unlink a non-directory; False if it turned out to be a directory."""
        try:
            os.unlink(name, dir_fd=parent)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            return False
        except OSError as e:
            if e.errno == errno.EISDIR:
                return False
            report.failures.append(f"{name}: {e.strerror}")
        return True

    def sweep_temps(self) -> tuple[list[str], list[str]]:
        """Remove temporary entries left by runs that died. Returns (removed, problems): an
        entry that cannot be removed (an immutable file in it, say) is reported and left,
        since temporary names never block anything."""
        removed: list[str] = []
        problems: list[str] = []
        for name in list(self.names()):
            if not name.startswith(TEMP_PREFIX):
                continue
            pid = temp_owner(name, TEMP_PREFIX)
            if pid is not None and writer_alive(pid):
                continue
            report = self.remove(name)
            if report.failures:
                problems.append(f"{name}: cannot remove {report.failures[0]}")
            else:
                removed.append(name)
        return removed, problems

    # locking ---------------------------------------------------------------------------
    def item_lock(self, name: str, primitive: Primitive) -> ItemLock:
        return ItemLock(self, name, primitive)


class ItemLock:
    """The daemon's per-item lock `<item>.lock`, held while an item is being created.

    Protocol (Guix pathlocks.cc, Nix the same): lock the file; if it is not empty a previous
    holder deleted it after use (it wrote the stale marker `d`), so open it anew; when done,
    unlink it, write `d` into the still-open descriptor, and close. A non-empty file still
    linked under the name is not the daemon's (its holders unlink before writing): it is
    replaced, a bounded number of times, so planted data cannot make a restore spin.
    """

    def __init__(self, store: StoreDir, name: str, primitive: Primitive) -> None:
        self.store = store
        self.name = name + LOCK_SUFFIX
        self.primitive = primitive
        self.fd: int | None = None
        self.ident: tuple[int, int] = (0, 0)

    def acquire(self, *, blocking: bool = True) -> bool:
        for _ in range(LOCK_ATTEMPTS):
            fd = open_lock_file(self.name, dir_fd=self.store.fd, what=self.name)
            try:
                if not acquire(fd, self.primitive, exclusive=True, blocking=blocking):
                    os.close(fd)
                    return False
                st = os.fstat(fd)
                if _is_store_item(st):
                    # `X.lock` may itself be a valid store item (one registered by another
                    # manifest): unlinking it as a stale lock, or writing the `d` marker into
                    # it, would destroy that item. Store items have the canonical mtime of 1,
                    # lock files never do.
                    raise StoreError("is a store item, not a lock file; not taking the lock "
                                     "of " + name_of(self.name), item=self.name)
                if st.st_size == 0:
                    self.fd, self.ident = fd, (st.st_dev, st.st_ino)
                    return True
                if self._linked((st.st_dev, st.st_ino)):
                    os.unlink(self.name, dir_fd=self.store.fd)
            except BaseException:
                if self.fd != fd:
                    os.close(fd)
                raise
            os.close(fd)
        raise LockedError(f"lock file {self.name} keeps changing under us; giving up")

    def _linked(self, ident: tuple[int, int]) -> bool:
        st = self.store.lstat(self.name)
        return st is not None and (st.st_dev, st.st_ino) == ident

    def release(self) -> None:
        if self.fd is None:
            return
        # unlink only our own file: the name may meanwhile belong to someone else's
        if self._linked(self.ident):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.name, dir_fd=self.store.fd)
        with contextlib.suppress(OSError):
            os.write(self.fd, b"d")
        os.close(self.fd)
        self.fd = None


def name_of(lock_name: str) -> str:
    return lock_name.removesuffix(LOCK_SUFFIX)


def _is_store_item(st: os.stat_result) -> bool:
    """The canonical store mtime of 1: an item, never a lock file (the daemon and incstore
    create those, and leave them at their time of creation)."""
    return st.st_mtime == 1


def is_lock_name(name: str) -> bool:
    return name.endswith(LOCK_SUFFIX)


def is_plain(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)
