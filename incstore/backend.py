"""Backend: where a chunk store's files live, as a handful of operations on named blobs.

A name is a relative, slash-separated path (`nar/<key>.nar.zst`, `<key>.narinfo`,
`manifests/<name>.json`); it is validated before use. Two backends implement the interface: a
local directory (`LocalBackend`, here) and an S3 bucket prefix (`S3Backend`, in `incstore.s3`,
needing the `s3` extra). Every write is all-or-nothing: temp file, fsync and rename locally,
a single PUT or a completed multipart upload remotely. `create` never replaces an existing blob.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Protocol

from incstore import atomicfile, faults, regularfile
from incstore.atomicfile import AlreadyExists
from incstore.dirfd import descend
from incstore.errors import ChunkStoreError

_NAME_RE = re.compile(r"[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*")

__all__ = ["AlreadyExists", "Backend", "Entry", "LocalBackend", "Reader", "open_backend"]


class Entry(NamedTuple):
    name: str
    size: int
    mtime: float


class Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


MAX_BLOB = 1 << 30  # the largest narinfo, manifest or cache-info `read` accepts


def valid_name(name: str) -> bool:
    parts = name.split("/")
    return bool(_NAME_RE.fullmatch(name)) and "." not in parts and ".." not in parts


def check_name(name: str) -> str:
    if not valid_name(name):
        raise ChunkStoreError(f"invalid blob name {name!r}")
    return name


class Staged(NamedTuple):
    """A blob written but not yet published under its name (see `Backend.stage`)."""

    name: str
    tmp: str  # where it waits: a temporary file's path, or a spool file's
    size: int


class Backend(ABC):
    # whether blobs are made durable (fsync, syncfs) before they get their names. Off by
    # default: a blob a power cut tore is caught by its size and XXH3 and quarantined, and
    # the next save writes it again (FORMAT.md §5); manifests, which name the blobs and have
    # no copy elsewhere, are always made durable (`write(..., durable=True)`)
    fsync: bool = False

    """The operations a chunk store needs; names are checked by `check_name` first."""

    url: str
    # workers worth running at once: a remote store waits on the network, not on the CPU
    min_workers = 1
    # whether reading every reused chunk at each save is cheap (a local disk), as opposed to
    # downloading it (a remote store)
    verifies_reads_cheaply = True

    @abstractmethod
    def read(self, name: str) -> bytes:
        """The whole blob; FileNotFoundError if there is none."""

    @abstractmethod
    def open(self, name: str) -> Reader:
        """A streaming reader; FileNotFoundError if there is none."""

    @abstractmethod
    def write(self, name: str, data: bytes, *, durable: bool = False) -> None:
        """Create or replace the blob, atomically (and durably, with `durable` or `fsync`)."""

    @abstractmethod
    def create(self, name: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """Stream a new blob; it appears only on a clean exit, and never over an existing one
        (`AlreadyExists` is raised then and the existing blob is kept)."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove the blob; a missing one is fine."""

    @abstractmethod
    def listdir(self, directory: str) -> list[Entry]:
        """The blobs directly inside `directory` ("" for the top), names relative to it. Names
        that are not valid blob names (planted by someone else) are left out."""

    def lstat(self, name: str) -> os.stat_result | None:
        """The blob file's own status, where blobs are files (None elsewhere, or if missing)."""
        return None

    def scan(self, directory: str) -> Iterator[Entry]:
        """What `listdir` lists, one entry at a time where the backend can (a large chunk
        store is summed without holding its listing)."""
        return iter(self.listdir(directory))

    def names(self, directory: str) -> list[str]:
        """The names `listdir` would give, where they are cheaper to get alone."""
        return [e.name for e in self.listdir(directory)]

    @abstractmethod
    def move(self, name: str, new_name: str) -> bool:
        """Move a blob to a new name (replacing nothing); False if it was not there."""

    @abstractmethod
    def stat(self, name: str) -> Entry | None:
        """Size and mtime of one blob, or None."""

    def sweep(self) -> list[str]:
        """Remove what dead writers left behind; nothing to do where writes cannot be torn."""
        return []

    def delete_if_older(self, name: str, cutoff: float) -> bool:
        """Delete the blob if its mtime is before `cutoff`; True if it was deleted."""
        entry = self.stat(name)
        if entry is None or entry.mtime >= cutoff:
            return False
        self.delete(name)
        return True

    def renew(self, name: str) -> os.stat_result | None:
        """Move the blob's mtime to now, where the backend can do that without rewriting it,
        and return the blob file's status after that (None where unsupported, or missing)."""
        return None

    def local_path(self, name: str) -> Path:
        raise ChunkStoreError(f"{self.url} is not a local directory")

    # many small blobs: written first, made durable and published together ----------------
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageFile]:
        """Write a blob to be published later with `publish` (its content is complete and in
        a file when the block ends without an exception; else nothing is left)."""
        check_name(name)
        spool = tempfile.NamedTemporaryFile(prefix=atomicfile.TEMP_PREFIX, delete=False)  # noqa: SIM115
        out = StageFile(spool, name, spool.name)
        try:
            yield out
            spool.close()
        except BaseException:
            spool.close()
            os.unlink(spool.name)
            raise

    def stage_bytes(self, name: str, data: bytes) -> Staged:
        """`stage` for a blob already in memory."""
        with self.stage(name) as f:
            f.write(data)
        return f.staged

    def publish(self, staged: list[Staged], *, replace: bool, durable: bool = False
                ) -> list[bool]:
        """Give each staged blob its name: create-only (False where the name is taken) unless
        `replace`. Each is uploaded on its own: remote writes are atomic. `durable`: the
        staged files were already made durable (by an earlier `publish` of this backend that
        came after they were staged)."""
        done = []
        for blob in staged:
            try:
                if replace:
                    with open(blob.tmp, "rb") as f:
                        self.write(blob.name, f.read())
                    done.append(True)
                    continue
                try:
                    with self.create(blob.name) as out, open(blob.tmp, "rb") as f:
                        while piece := f.read(1 << 20):
                            out.write(piece)
                    done.append(True)
                except AlreadyExists:
                    done.append(False)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(blob.tmp)
        return done

    def discard(self, staged: Staged) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged.tmp)

    def close(self) -> None:  # noqa: B027 (optional: nothing to release by default)
        """Release what the backend holds open."""


class StageFile:
    """The file a `stage` block writes into; `staged` says where it went."""

    def __init__(self, f: Any, name: str, tmp: str) -> None:
        self.f = f
        self.name = name
        self.tmp = tmp
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return int(self.f.write(data))

    def flush(self) -> None:
        self.f.flush()

    @property
    def staged(self) -> Staged:
        return Staged(self.name, self.tmp, self.size)


class LocalBackend(Backend):
    """A chunk store in a local directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)
        self._dirs: dict[str, int] = {}
        self._lock = threading.Lock()

    def local_path(self, name: str) -> Path:
        return self.root / check_name(name)

    def read(self, name: str) -> bytes:
        try:
            return regularfile.read(self.local_path(name), MAX_BLOB, follow=False)
        except (regularfile.NotRegular, regularfile.TooLarge) as e:
            raise ChunkStoreError(str(e).replace(str(self.root) + "/", ""), item=self.url) from e
        except FileNotFoundError:
            raise
        except OSError as e:
            raise ChunkStoreError(f"cannot read {name}: {e.strerror or e}", item=self.url) from e

    def open(self, name: str) -> Reader:
        try:
            return regularfile.open_binary(self.local_path(name), follow=False)
        except regularfile.NotRegular as e:
            raise ChunkStoreError(f"{name} is not a regular file", item=self.url) from e
        except FileNotFoundError:
            raise
        except OSError as e:
            raise ChunkStoreError(f"cannot open {name}: {e.strerror or e}", item=self.url) from e

    def _dir_fd(self, directory: str, *, create: bool) -> int:
        """A descriptor on `directory` (a checked relative name, "" for the root), opened one
        component at a time without following a symlink, made if missing when `create`.

        Why: a planted `quarantine` (or `nar`) symlink made restore, as root, link a chunk
        into any directory it named; a planted regular file there made the OSError abort the
        whole restore. Now both are a ChunkStoreError, which callers report per item."""
        if create:  # the root itself is the user's choice: made as given, symlinks and all
            self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return descend(fd, directory.split("/") if directory else (), create=create)
        finally:
            os.close(fd)

    def blob_dir(self, name: str) -> tuple[int, str]:
        """The descriptor of a blob's directory (opened and checked once, then kept: every
        write goes through it, so a symlink planted later is never followed) and the blob's
        base name."""
        directory, _, base = check_name(name).rpartition("/")
        fd = self._dirs.get(directory)  # kept once opened: no lock needed to find it
        if fd is not None:
            return fd, base
        with self._lock:
            fd = self._dirs.get(directory)
            if fd is None:
                try:
                    fd = self._dir_fd(directory, create=True)
                except OSError as e:
                    raise ChunkStoreError(f"cannot use the directory of {name}: "
                                          f"{e.strerror or e}", item=self.url) from e
                self._dirs[directory] = fd
        return fd, base

    def close(self) -> None:
        with self._lock:
            for fd in self._dirs.values():
                os.close(fd)
            self._dirs.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    @staticmethod
    def _new_temp(fd: int, base: str) -> tuple[int, str]:
        tmp = f"{atomicfile.TEMP_PREFIX}{os.getpid()}-{os.urandom(6).hex()}-{base}"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o644, dir_fd=fd)
        return out, tmp

    def write(self, name: str, data: bytes, *, durable: bool = False) -> None:
        fd, base = self.blob_dir(name)
        sync = durable or self.fsync
        try:
            out, tmp = self._new_temp(fd, base)
            try:
                _write_all(out, data)
                if sync:
                    os.fsync(out)
            finally:
                os.close(out)
            try:
                os.rename(tmp, base, src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=fd)
                raise
            if sync:
                os.fsync(fd)
        except OSError as e:
            # e.g. a directory planted at a narinfo's name: one error for that blob, not an
            # unexplained OSError that ends the whole run
            raise ChunkStoreError(f"cannot write {name}: {e.strerror or e}", item=self.url) from e

    @contextlib.contextmanager
    def create(self, name: str) -> Iterator[BinaryIO]:
        fd, base = self.blob_dir(name)
        out, tmp = self._new_temp(fd, base)
        try:
            with os.fdopen(out, "wb") as f:
                yield f
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            faults.point("atomicfile.before-rename")
            try:
                os.link(tmp, base, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
            except FileExistsError:
                raise AlreadyExists(name) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=fd)
        if self.fsync:
            os.fsync(fd)
        faults.point("atomicfile.after-rename")

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageFile]:
        fd, base = self.blob_dir(name)
        out, tmp = self._new_temp(fd, base)
        try:
            with os.fdopen(out, "wb") as f:
                yield StageFile(f, name, tmp)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=fd)
            raise

    def stage_bytes(self, name: str, data: bytes) -> Staged:
        # no file object: for the thousands of small chunks and narinfos of a save
        fd, base = self.blob_dir(name)
        out, tmp = self._new_temp(fd, base)
        try:
            try:
                _write_all(out, data)
            finally:
                os.close(out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=fd)
            raise
        return Staged(name, tmp, len(data))

    def publish(self, staged: list[Staged], *, replace: bool, durable: bool = False
                ) -> list[bool]:
        """Make the staged blobs durable with one file-system sync (instead of an fsync each),
        then give each its name, and sync the directories once: every blob is complete and
        durable before it has a name."""
        if not staged:
            return []
        if self.fsync and not durable:
            atomicfile.syncfs(self.blob_dir(staged[0].name)[0])
        faults.point("atomicfile.before-rename")
        done = []
        dirs = set()
        for blob in staged:
            fd, base = self.blob_dir(blob.name)
            dirs.add(fd)
            try:
                if replace:
                    os.rename(blob.tmp, base, src_dir_fd=fd, dst_dir_fd=fd)
                    done.append(True)
                    continue
                try:
                    os.link(blob.tmp, base, src_dir_fd=fd, dst_dir_fd=fd,
                            follow_symlinks=False)
                    done.append(True)
                except FileExistsError:
                    done.append(False)
                os.unlink(blob.tmp, dir_fd=fd)
            except OSError as e:
                raise ChunkStoreError(f"cannot publish {blob.name}: {e.strerror or e}",
                                      item=self.url) from e
        if self.fsync:
            for fd in dirs:
                os.fsync(fd)
        faults.point("atomicfile.after-rename")
        return done

    def discard(self, staged: Staged) -> None:
        fd, _ = self.blob_dir(staged.name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged.tmp, dir_fd=fd)

    def delete(self, name: str) -> None:
        # through the directory's descriptor: a symlinked `nar/` must not make a restore
        # (root) delete a file elsewhere
        directory, _, base = check_name(name).rpartition("/")
        try:
            fd = self._dir_fd(directory, create=False)
        except FileNotFoundError:
            return
        except OSError as e:
            raise ChunkStoreError(f"cannot delete {name}: {e.strerror or e}",
                                  item=self.url) from e
        try:
            os.unlink(base, dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ChunkStoreError(f"cannot delete {name}: {e.strerror or e}",
                                  item=self.url) from e
        finally:
            os.close(fd)

    def listdir(self, directory: str) -> list[Entry]:
        return list(self.scan(directory))

    def scan(self, directory: str) -> Iterator[Entry]:
        where = self.root / check_name(directory) if directory else self.root
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), \
                os.scandir(where) as entries:
            for e in entries:
                if e.is_file(follow_symlinks=False) and not atomicfile.is_temp_name(e.name) \
                        and valid_name(e.name):
                    with contextlib.suppress(FileNotFoundError):
                        st = e.stat(follow_symlinks=False)
                        yield Entry(e.name, st.st_size, st.st_mtime)

    def lstat(self, name: str) -> os.stat_result | None:
        fd, base = self.blob_dir(name)
        try:
            return os.stat(base, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None

    def names(self, directory: str) -> list[str]:
        # the listing's file types alone: no stat per entry
        where = self.root / check_name(directory) if directory else self.root
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), \
                os.scandir(where) as entries:
            return [e.name for e in entries if e.is_file(follow_symlinks=False)
                    and not atomicfile.is_temp_name(e.name) and valid_name(e.name)]
        return []

    def move(self, name: str, new_name: str) -> bool:
        # both directories through descriptors that never follow a symlink (see `_dir_fd`)
        src_dir, _, src = check_name(name).rpartition("/")
        dst_dir, _, dst = check_name(new_name).rpartition("/")
        fds: list[int] = []
        try:
            try:
                fds.append(self._dir_fd(src_dir, create=False))
            except FileNotFoundError:
                return False
            fds.append(self._dir_fd(dst_dir, create=True))
            try:
                os.link(src, dst, src_dir_fd=fds[0], dst_dir_fd=fds[1], follow_symlinks=False)
            except FileNotFoundError:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(src, dir_fd=fds[0])
            os.fsync(fds[1])
        except OSError as e:
            raise ChunkStoreError(f"cannot move {name} to {new_name}: {e.strerror or e}",
                                  item=self.url) from e
        finally:
            for fd in fds:
                os.close(fd)
        return True

    def renew(self, name: str) -> os.stat_result | None:
        fd, base = self.blob_dir(name)
        try:
            # never through a symlink planted at the name: only the blob's own times change
            os.utime(base, dir_fd=fd, follow_symlinks=False)
            return os.stat(base, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None

    def delete_if_older(self, name: str, cutoff: float) -> bool:
        # Move it aside first, then look at its mtime: a renew that came before the move shows
        # in the moved file (which then goes back), and one that comes after finds no file.
        path = self.local_path(name)
        aside = atomicfile.temp_path_for(path)
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        if aside.stat().st_mtime >= cutoff:
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)  # a writer may have created it anew meanwhile: keep that
            aside.unlink()
            return False
        aside.unlink()
        return True

    def stat(self, name: str) -> Entry | None:
        try:
            st = self.local_path(name).lstat()
        except FileNotFoundError:
            return None
        return Entry(name, st.st_size, st.st_mtime)

    def sweep(self) -> list[str]:
        return [name for directory, _, _ in os.walk(self.root)
                for name in atomicfile.sweep(Path(directory))]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def open_backend(location: str | Path) -> Backend:
    """`s3://bucket/prefix` or a local directory."""
    text = str(location)
    if text.startswith("s3://"):
        try:
            from incstore.s3 import S3Backend
        except ImportError as e:
            raise ChunkStoreError(
                "an s3:// chunk store needs the s3 extra: pip install 'incstore[s3]'"
            ) from e
        return S3Backend(text)
    if "://" in text:
        raise ChunkStoreError(f"unsupported chunk store location {text!r} (a directory or s3://)")
    return LocalBackend(Path(text))
