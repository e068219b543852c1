"""Links: the store's `.links` directory, where the daemon keeps one hard link per distinct file
content, named by the nix-base32 sha256 of that file's own NAR. A file restored with the same
content as an entry there becomes another hard link to the entry's inode, so identical files
across items take their space once (what the Guix daemon does after every import, and what
`nix-store --optimise` does on request).

The entries already in `.links` are hostile input like everything else in the target store: an
entry is only linked to after it is found to be what its name says (a regular file of the right
size, mode, owner and mtime whose content hashes to the name; for Nix, a symlink with the same
target) and to carry exactly the metadata the daemon gives a file: the extended attributes
(file capabilities, ACLs, anything else) and inode flags of the file just extracted, no more.
A hard link shares the inode, so an entry's `security.capability` would otherwise reach the
restored binary. The check runs on the link made into the item's own temporary tree, so the
inode that was checked is the one that stays. An entry that fails is left alone and
reported; the file keeps its own copy.

Linking is a saving, never a condition: whatever goes wrong (no hard links on the file system, a
full directory, an entry with too many links) leaves the file as extracted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from incstore import nar
from incstore.storedir import TEMP_PREFIX
from incstore.storepath import nix32_encode

LINKS_DIR = ".links"
GUIX_MIN_SIZE = 8192  # the daemon's deduplicationMinSize; its gc drops smaller entries
_READ_BLOCK = 1 << 20
# errors that say the file system will not take hard links here at all
_UNSUPPORTED = {errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EROFS, errno.EOPNOTSUPP}
_FS_IOC_GETFLAGS = 0x80086601  # _IOR('f', 1, long); the kernel reads and writes an int
# FS_FL_USER_VISIBLE: the flags chattr shows; the rest (extents, inline data) say how the
# file system stores the inode, not what a process may do with it
_USER_VISIBLE_FLAGS = 0x0003DFFF


@dataclass(frozen=True)
class LinkRule:
    """Which files a flavour's daemon links: Guix regular files of at least 8192 bytes; Nix
    (on Linux) every regular file and every symlink."""

    min_size: int
    symlinks: bool


RULES = {"guix": LinkRule(GUIX_MIN_SIZE, symlinks=False), "nix": LinkRule(0, symlinks=True)}
DEFAULT_ON = {"guix": True, "nix": False}  # as each daemon does by default


class Links:
    """Deduplication into one store's `.links` for one run (thread-safe)."""

    def __init__(self, store_fd: int, rule: LinkRule) -> None:
        self.rule = rule
        self._store_fd = store_fd
        self.fd: int | None = None  # opened (and made) when the first file asks for it
        self._lock = threading.Lock()
        self.linked = 0  # files that now share an inode with an earlier copy
        self.saved_bytes = 0
        self.added = 0  # new entries made in .links
        self.rejected: list[str] = []  # entries that are not what their name says
        self.disabled: str | None = None  # why linking stopped, when it did

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def active(self) -> bool:
        return self.disabled is None

    def _dir(self) -> int | None:
        if self.fd is None and self.disabled is None:
            with self._lock:
                if self.fd is None and self.disabled is None:
                    self.fd = _open_links_dir(self._store_fd)
                    if self.fd is None:
                        self.disabled = (f"{LINKS_DIR} is not a directory of the store's own "
                                         "(or cannot be made)")
        return self.fd if self.disabled is None else None

    def wants_file(self, size: int) -> bool:
        return self.active and size >= self.rule.min_size

    def wants_symlink(self) -> bool:
        return self.active and self.rule.symlinks

    # entry points from the NAR restorer -------------------------------------------------------
    def file(self, parent: int, name: bytes, digest: bytes, size: int, executable: bool
             ) -> None:
        """`name` in `parent` was just written with canonical metadata; `digest` is the
        sha256 of its NAR."""
        want_mode = 0o555 if executable else 0o444

        def holds_it(tmp: bytes) -> bool:
            # only when an entry exists already: most files become the entry themselves
            mine = os.stat(name, dir_fd=parent, follow_symlinks=False)
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=parent)
            try:
                st = os.fstat(fd)
                if not (stat.S_ISREG(st.st_mode) and st.st_size == size
                        and stat.S_IMODE(st.st_mode) == want_mode
                        and (st.st_uid, st.st_gid) == (mine.st_uid, mine.st_gid)
                        and st.st_mtime_ns == mine.st_mtime_ns
                        and inode_extras(fd) == inode_extras(_fd_path(parent, name))):
                    return False
                return file_nar_digest(fd, size, executable) == digest
            finally:
                os.close(fd)

        self._link(parent, name, digest, size, stat.S_IFREG, holds_it)

    def symlink(self, parent: int, name: bytes, target: bytes) -> None:
        digest = symlink_nar_digest(target)

        def holds_it(tmp: bytes) -> bool:
            mine = os.stat(name, dir_fd=parent, follow_symlinks=False)
            st = os.stat(tmp, dir_fd=parent, follow_symlinks=False)
            # a symlink's target cannot change in place: reading it once settles it
            return (stat.S_ISLNK(st.st_mode) and (st.st_uid, st.st_gid) ==
                    (mine.st_uid, mine.st_gid) and st.st_mtime_ns == mine.st_mtime_ns
                    and os.readlink(tmp, dir_fd=parent) == target
                    and inode_extras(_fd_path(parent, tmp)) ==
                    inode_extras(_fd_path(parent, name)))

        self._link(parent, name, digest, 0, stat.S_IFLNK, holds_it)

    # ------------------------------------------------------------------------------------------
    def _link(self, parent: int, name: bytes, digest: bytes, size: int, kind: int,
              holds_it: Callable[[bytes], bool]) -> None:
        entry = nix32_encode(digest).encode()
        for _ in range(3):  # the entry may come and go under a concurrent restore or gc
            links = self._dir()
            if links is None:
                return
            try:
                os.link(name, entry, src_dir_fd=parent, dst_dir_fd=links,
                        follow_symlinks=False)
            except FileExistsError:
                if self._adopt(parent, name, entry, size, kind, holds_it):
                    return
                continue  # it vanished: become the entry ourselves
            except OSError as e:
                self._trouble(e)
                return
            with self._lock:
                self.added += 1
            return

    def _adopt(self, parent: int, name: bytes, entry: bytes, size: int, kind: int,
               holds_it: Callable[[bytes], bool]) -> bool:
        """Put the entry's inode in place of `name`, if it holds the same thing. False only
        when the entry is gone."""
        assert self.fd is not None
        try:
            found = os.stat(entry, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_IFMT(found.st_mode) != kind:
            self._reject(entry)
            return True
        # a temporary name the store's sweep removes should a crash leave it (at the top of
        # the store when the item is a lone file)
        tmp = f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}-link".encode()
        try:
            os.link(entry, tmp, src_dir_fd=self.fd, dst_dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno == errno.EPERM:  # protected_hardlinks: an entry someone else owns
                self._reject(entry)
            else:
                self._trouble(e)
            return True
        try:
            same = holds_it(tmp)
        except OSError:
            same = False
        if not same:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent)
            self._reject(entry)
            return True
        try:
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent)
            self._trouble(e)
            return True
        with self._lock:
            self.linked += 1
            self.saved_bytes += size
        return True

    def _reject(self, entry: bytes) -> None:
        with self._lock:
            self.rejected.append(entry.decode())

    def _trouble(self, e: OSError) -> None:
        if e.errno == errno.EMLINK:
            return  # this entry is full; others may not be
        if e.errno in _UNSUPPORTED or e.errno == errno.ENOSPC:
            with self._lock:
                self.disabled = self.disabled or f"{LINKS_DIR}: {e.strerror}"
            return
        raise e


def _open_links_dir(store_fd: int) -> int | None:
    """The `.links` directory (made if missing, as the daemon would); None when there is
    something else at that name or it cannot be made."""
    try:
        os.mkdir(LINKS_DIR, 0o755, dir_fd=store_fd)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        return os.open(LINKS_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=store_fd)
    except OSError:
        return None


def _fd_path(parent: int, name: bytes) -> bytes:
    """A path naming `name` in the directory open at `parent` (for the xattr calls, which take
    no directory descriptor); its last component is never followed by `inode_extras`."""
    return b"/proc/self/fd/%d/%s" % (parent, name)


def inode_extras(target: int | bytes) -> tuple[tuple[tuple[str, bytes], ...], int]:
    """What an inode carries beyond mode, owner and times: its extended attributes (names
    and values: capabilities, ACLs, labels) and its user-visible inode flags (immutable,
    append-only, ...). `target` is a descriptor, or a path whose last component is not
    followed. A file system without xattrs or flags has none of either."""
    def xattrs() -> tuple[tuple[str, bytes], ...]:
        try:
            names = (os.listxattr(target) if isinstance(target, int)
                     else os.listxattr(target, follow_symlinks=False))
            return tuple(sorted(
                (n, os.getxattr(target, n) if isinstance(target, int)
                 else os.getxattr(target, n, follow_symlinks=False)) for n in names))
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return ()
            raise

    flags = 0
    if isinstance(target, int):
        try:
            raw = fcntl.ioctl(target, _FS_IOC_GETFLAGS, bytes(8))
            flags = struct.unpack_from("=i", raw)[0] & _USER_VISIBLE_FLAGS
        except OSError as e:
            if e.errno not in (errno.ENOTTY, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                raise
    else:
        # a symlink cannot be opened to ask (and chattr refuses symlinks): a path's flags
        # come from a descriptor that does not follow it, where it is a file
        with contextlib.suppress(OSError):
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                flags = inode_extras(fd)[1]
            finally:
                os.close(fd)
    return xattrs(), flags


def file_nar_digest(fd: int, size: int, executable: bool) -> bytes:
    """sha256 of the NAR of the regular file open at `fd`, reading exactly `size` bytes."""
    h = hashlib.sha256(nar.lone_file_head(size, executable))
    left = size
    while left:
        block = os.read(fd, min(left, _READ_BLOCK))
        if not block:
            return b""  # shorter than it said
        h.update(block)
        left -= len(block)
    if os.read(fd, 1):
        return b""
    h.update(nar.lone_file_tail(size))
    return h.digest()


def symlink_nar_digest(target: bytes) -> bytes:
    return hashlib.sha256(nar.lone_symlink(target)).digest()
