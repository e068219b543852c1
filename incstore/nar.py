"""NAR: the Nix ARchive, the canonical serialisation of one store item.

`dump` streams a file tree as NAR bytes (byte-exact with `nix-store --dump`) and `restore`
rebuilds a tree from NAR bytes with canonical store metadata. Both compute the NAR's sha256 and
size on the way, which is what the daemon DB records as `hash` and `narSize`.

`restore` treats its input as hostile: names are checked (`..`, `.`, empty, `/`, NUL), entries
must be strictly sorted (so no duplicates), every file is created with O_EXCL|O_NOFOLLOW relative
to its parent's descriptor (so nothing is ever written through a symlink), declared lengths are
streamed rather than allocated, padding must be zero, and trailing bytes are an error.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from incstore.errors import NarFormatError, StoreError

MAGIC = b"nix-archive-1"
MAX_DEPTH = 256  # two Python frames a level; real store trees stay far below
MAX_NAME = 255  # NAME_MAX on Linux
MAX_TARGET = 4095  # PATH_MAX - 1
MAX_TOKEN = 16
BLOCK = 1 << 18
INLINE_FILE = 1 << 18
CANONICAL_TIME = (1, 1)

Sink = Callable[[bytes], object]
Source = Callable[[int], bytes]


@dataclass(frozen=True)
class NarDigest:
    """The sha256 (lower-case hex) and length of a NAR stream."""

    sha256: str
    size: int

    @property
    def db_hash(self) -> str:
        """The form the daemon DB's `ValidPaths.hash` column uses."""
        return "sha256:" + self.sha256


def _pad(n: int) -> bytes:
    return b"\0" * ((8 - n % 8) % 8)


def _enc(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + _pad(len(data))


_T = {
    t: _enc(t)
    for t in (
        MAGIC, b"(", b")", b"type", b"regular", b"executable", b"", b"contents",
        b"symlink", b"target", b"directory", b"entry", b"name", b"node",
    )
}
_DIR_OPEN = _T[b"("] + _T[b"type"] + _T[b"directory"]
_ENTRY_OPEN = _T[b"entry"] + _T[b"("] + _T[b"name"]
_REGULAR = _T[b"("] + _T[b"type"] + _T[b"regular"]
_EXEC_CONTENTS = _T[b"executable"] + _T[b""] + _T[b"contents"]
_OPEN_TYPE = _T[b"("] + _T[b"type"]
# the token runs that open almost every node and entry, matched in one comparison each
_PLAIN_FILE = _REGULAR + _T[b"contents"]
_EXEC_FILE = _REGULAR + _EXEC_CONTENTS
_ENTRY_HEAD = _ENTRY_OPEN
_OPEN_NAME = _T[b"("] + _T[b"name"]
_ZEROS = [b"\0" * n for n in range(8)]


def _kind(entry: os.DirEntry[str]) -> int:
    if entry.is_symlink():
        return stat.S_IFLNK
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if entry.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return 0


class _Writer:
    """Collects small tokens into one buffer so the sink sees few, large writes."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.buf = bytearray()

    def flush(self) -> None:
        if self.buf:
            self.sink(bytes(self.buf))
            self.buf.clear()

    def dump_node(self, dir_fd: int | None, name: str, depth: int, kind: int = 0) -> None:
        """Dump one node; `kind` is its S_IFMT type when the directory listing told it."""
        if depth > MAX_DEPTH:
            raise StoreError(f"directory tree deeper than {MAX_DEPTH} levels", item=name)
        mode = kind or os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        if stat.S_ISREG(mode):
            self.dump_file(dir_fd, name)
        elif stat.S_ISLNK(mode):
            target = os.readlink(name, dir_fd=dir_fd)
            self.buf += _T[b"("] + _T[b"type"] + _T[b"symlink"] + _T[b"target"]
            self.buf += _enc(os.fsencode(target)) + _T[b")"]
        elif stat.S_ISDIR(mode):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                # the listing's d_type saves a stat per entry; 0 (unknown) falls back to stat
                entries = sorted((os.fsencode(e.name), _kind(e)) for e in os.scandir(fd))
                self.buf += _DIR_OPEN
                for raw, entry_kind in entries:
                    self.buf += _ENTRY_OPEN + _enc(raw) + _T[b"node"]
                    self.dump_node(fd, os.fsdecode(raw), depth + 1, entry_kind)
                    self.buf += _T[b")"]
                self.buf += _T[b")"]
            finally:
                os.close(fd)
        else:
            raise StoreError("not a regular file, directory or symlink", item=name)
        if len(self.buf) >= BLOCK:
            self.flush()

    def dump_file(self, dir_fd: int | None, name: str) -> None:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            size = st.st_size
            self.buf += _REGULAR
            self.buf += _EXEC_CONTENTS if st.st_mode & stat.S_IXUSR else _T[b"contents"]
            self.buf += size.to_bytes(8, "little")
            if size <= INLINE_FILE:
                data = os.read(fd, size + 1)
                if len(data) != size:
                    raise StoreError("file changed size while being read", item=name)
                self.buf += data
            else:
                self.flush()
                left = size
                while left:
                    block = os.read(fd, min(left, 1 << 20))
                    if not block:
                        raise StoreError("file shrank while being read", item=name)
                    self.sink(block)
                    left -= len(block)
            self.buf += _pad(size) + _T[b")"]
        finally:
            os.close(fd)


def dump(path: str | os.PathLike[str], sink: Sink) -> None:
    """Write the NAR of `path` (a file, directory or symlink) to `sink` in large pieces."""
    writer = _Writer(sink)
    writer.buf += _T[MAGIC]
    writer.dump_node(None, os.fspath(path), 0)
    writer.flush()


def dump_hashed(path: str | os.PathLike[str], sink: Sink | None = None) -> NarDigest:
    """`dump`, also returning the NAR's sha256 and size."""
    sha = hashlib.sha256()
    size = 0

    def tee(block: bytes) -> None:
        nonlocal size
        sha.update(block)
        size += len(block)
        if sink is not None:
            sink(block)

    dump(path, tee)
    return NarDigest(sha.hexdigest(), size)


def dump_bytes(path: str | os.PathLike[str]) -> bytes:
    parts: list[bytes] = []
    dump(path, parts.append)
    return b"".join(parts)


class NarTooLong(NarFormatError):
    """The NAR goes on past the length it was said to have (a decompression bomb, or a chunk
    that is not the item's): reading stopped there."""


class _Reader:
    """Buffered, hashing reader over a `read(n)` source; never allocates a declared length,
    and never reads more than `limit` bytes of NAR (plus one block)."""

    def __init__(self, read: Source, item: str | None, limit: int) -> None:
        self._read = read
        self.item = item
        self.limit = limit
        self.buf = b""
        self.pos = 0
        self.sha = hashlib.sha256()
        self.total = 0

    def fail(self, message: str) -> NarFormatError:
        return NarFormatError(message, item=self.item)

    def too_long(self) -> NarTooLong:
        return NarTooLong(f"NAR is longer than the {self.limit} bytes recorded", item=self.item)

    def room(self) -> int:
        """How many more NAR bytes may follow what has been consumed so far."""
        return self.limit - (self.total - (len(self.buf) - self.pos))

    def _fill(self, need: int) -> None:
        while len(self.buf) - self.pos < need:
            block = self._read(BLOCK)
            if not block:
                raise self.fail("NAR is truncated")
            self.sha.update(block)
            self.total += len(block)
            if self.total > self.limit + BLOCK:
                raise self.too_long()
            self.buf = self.buf[self.pos :] + block
            self.pos = 0

    def take(self, n: int) -> bytes:
        pos = self.pos
        end = pos + n
        if end > len(self.buf):
            self._fill(n)
            pos, end = self.pos, self.pos + n
        self.pos = end
        return self.buf[pos:end]

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "little")

    def padding(self, n: int) -> None:
        if n % 8 and self.take(8 - n % 8) != _ZEROS[8 - n % 8]:
            raise self.fail("NAR padding is not zero")

    def string(self, limit: int, what: str) -> bytes:
        # fast path: length, bytes and padding all in the buffer (almost always)
        buf, pos = self.buf, self.pos
        if pos + 8 <= len(buf):
            n = int.from_bytes(buf[pos : pos + 8], "little")
            if n > limit:
                raise self.fail(f"NAR {what} is {n} bytes long, more than the limit of {limit}")
            start = pos + 8
            end = start + ((n + 7) & ~7)
            if end <= len(buf):
                if buf[start + n : end] != _ZEROS[end - start - n]:
                    raise self.fail("NAR padding is not zero")
                self.pos = end
                return buf[start : start + n]
        n = self.u64()
        if n > limit:
            raise self.fail(f"NAR {what} is {n} bytes long, more than the limit of {limit}")
        data = self.take(n)
        self.padding(n)
        return data

    def skip_if(self, encoded: bytes) -> bool:
        """Consume `encoded` if the buffer holds it next; False leaves the slow path to decide
        (also when it straddles a refill)."""
        end = self.pos + len(encoded)
        if self.buf[self.pos : end] == encoded:
            self.pos = end
            return True
        return False

    def expect_raw(self, encoded: bytes, what: str) -> None:
        if self.take(len(encoded)) != encoded:
            raise self.fail(f"NAR is malformed: expected {what!r}")

    def expect(self, token: bytes) -> None:
        self.expect_raw(_T[token], token.decode())

    def copy_to(self, fd: int, n: int, also: Any = None) -> None:
        """Write the next `n` bytes to `fd` (and to the hash `also`)."""
        while n:
            if self.pos == len(self.buf):
                self.buf, self.pos = b"", 0
                self._fill(1)
            piece = min(n, len(self.buf) - self.pos)
            view = memoryview(self.buf)[self.pos : self.pos + piece]
            if also is not None:
                also.update(view)
            while view:
                view = view[os.write(fd, view) :]
            self.pos += piece
            n -= piece

    def check_end(self) -> None:
        if self.pos != len(self.buf) or self._read(1):
            raise self.fail("NAR has trailing data after its end")
        if self.total > self.limit:
            raise self.too_long()


def lone_file_head(size: int, executable: bool) -> bytes:
    """The NAR of a lone regular file of `size` bytes, up to its contents (what `.links`
    entries are named by the hash of)."""
    return _T[MAGIC] + (_EXEC_FILE if executable else _PLAIN_FILE) + size.to_bytes(8, "little")


def lone_file_tail(size: int) -> bytes:
    return _pad(size) + _T[b")"]


def lone_symlink(target: bytes) -> bytes:
    return _T[MAGIC] + _OPEN_TYPE + _T[b"symlink"] + _T[b"target"] + _enc(target) + _T[b")"]


class Linker(Protocol):
    """Deduplication of restored files (`incstore.links.Links`)."""

    def wants_file(self, size: int) -> bool: ...
    def wants_symlink(self) -> bool: ...
    def file(self, parent: int, name: bytes, digest: bytes, size: int,
             executable: bool) -> None: ...
    def symlink(self, parent: int, name: bytes, target: bytes) -> None: ...


def _check_name(reader: _Reader, name: bytes) -> None:
    if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
        raise reader.fail(f"NAR entry has a forbidden name {name!r}")


_UMASK = os.umask(0)
os.umask(_UMASK)


class _Restorer:
    def __init__(self, reader: _Reader, owner: tuple[int, int] | None,
                 links: Linker | None) -> None:
        self.r = reader
        self.owner = owner
        self.links = links

    def node(self, parent: int, name: bytes, depth: int) -> None:
        r = self.r
        if depth > MAX_DEPTH:
            raise r.fail(f"NAR is nested deeper than {MAX_DEPTH} levels")
        if r.skip_if(_PLAIN_FILE):
            self.file(parent, name, executable=False)
            r.expect(b")")
            return
        if r.skip_if(_EXEC_FILE):
            self.file(parent, name, executable=True)
            r.expect(b")")
            return
        r.expect_raw(_OPEN_TYPE, "( type")
        kind = r.string(MAX_TOKEN, "node type")
        if kind == b"regular":
            self.regular(parent, name)
        elif kind == b"symlink":
            r.expect(b"target")
            target = r.string(MAX_TARGET, "symlink target")
            if not target or b"\0" in target:
                raise r.fail("NAR symlink has an empty target or one containing NUL")
            os.symlink(target, name, dir_fd=parent)
            os.utime(name, CANONICAL_TIME, dir_fd=parent, follow_symlinks=False)
            if self.owner:
                os.chown(name, *self.owner, dir_fd=parent, follow_symlinks=False)
            if self.links is not None and self.links.wants_symlink():
                self.links.symlink(parent, name, target)
        elif kind == b"directory":
            self.directory(parent, name, depth)
            return
        else:
            raise r.fail(f"NAR has an unknown node type {kind!r}")
        r.expect(b")")

    def regular(self, parent: int, name: bytes) -> None:
        r = self.r
        token = r.string(MAX_TOKEN, "token")
        executable = token == b"executable"
        if executable:
            if r.string(MAX_TOKEN, "token") != b"":
                raise r.fail("NAR is malformed: 'executable' must be followed by ''")
            token = r.string(MAX_TOKEN, "token")
        if token != b"contents":
            raise r.fail("NAR is malformed: expected 'contents'")
        self.file(parent, name, executable)

    def file(self, parent: int, name: bytes, executable: bool) -> None:
        r = self.r
        size = r.u64()
        if size > r.room():
            raise r.too_long()
        mode = 0o555 if executable else 0o444
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        links = self.links
        lone = (hashlib.sha256(lone_file_head(size, executable))
                if links is not None and links.wants_file(size) else None)
        fd = os.open(name, flags, mode, dir_fd=parent)
        try:
            r.copy_to(fd, size, lone)
            if _UMASK & mode:
                os.fchmod(fd, mode)
            if self.owner:
                os.fchown(fd, *self.owner)
            os.utime(fd, CANONICAL_TIME)
        finally:
            os.close(fd)
        r.padding(size)
        if lone is not None and links is not None:
            lone.update(lone_file_tail(size))
            links.file(parent, name, lone.digest(), size, executable)

    def directory(self, parent: int, name: bytes, depth: int) -> None:
        r = self.r
        os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        try:
            previous: bytes | None = None
            while True:
                if not r.skip_if(_ENTRY_HEAD):
                    token = r.string(MAX_TOKEN, "token")
                    if token == b")":
                        break
                    if token != b"entry":
                        raise r.fail("NAR is malformed: expected 'entry' or ')'")
                    r.expect_raw(_OPEN_NAME, "( name")
                entry = r.string(MAX_NAME, "entry name")
                _check_name(r, entry)
                if previous is not None and entry <= previous:
                    raise r.fail(f"NAR entries are unsorted or duplicated at {entry!r}")
                previous = entry
                r.expect(b"node")
                self.node(fd, entry, depth + 1)
                r.expect(b")")
            os.fchmod(fd, 0o555)
            if self.owner:
                os.fchown(fd, *self.owner)
            os.utime(fd, CANONICAL_TIME)
        finally:
            os.close(fd)


def restore(
    read: Source,
    dir_fd: int,
    name: str,
    *,
    owner: tuple[int, int] | None = None,
    item: str | None = None,
    limit: int = 1 << 62,
    links: Linker | None = None,
) -> NarDigest:
    """Rebuild the NAR read from `read` as `name` inside the directory `dir_fd`.

    The tree gets canonical store metadata (files 0444 or 0555, directories 0555, mtime 1 on
    everything, `owner` if given). `name` must not exist. Reading stops with `NarTooLong` as
    soon as the NAR is known to exceed `limit` bytes, before the excess is written. With
    `links`, files are deduplicated as they are written (a file's NAR hash is computed on the
    way; see `incstore.links`). On an error
    the partial tree is left for the caller to remove; the caller decides where the tree may
    appear.
    """
    reader = _Reader(read, item, limit)
    reader.expect(MAGIC)
    _Restorer(reader, owner, links).node(dir_fd, os.fsencode(name), 0)
    reader.check_end()
    return NarDigest(reader.sha.hexdigest(), reader.total)
