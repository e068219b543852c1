"""The bench's own NAR serialiser: sha256 and length of a store item's NAR, as the daemon DB
records them (`ValidPaths.hash`, `ValidPaths.narSize`).

The bench builds and registers its stores without incstore's internals (which are being
rewritten), so it carries this ~60-line serialiser. `python3 bench/narhash.py PATH...` checks it
byte for byte against `incstore.nar.dump_hashed` and, where Nix is installed, against
`nix-store --dump`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable

Sink = Callable[[bytes], object]
_FLUSH = 1 << 18


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 8)


def _s(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + _pad(len(data))


_MAGIC = _s(b"nix-archive-1")
_OPEN, _CLOSE = _s(b"("), _s(b")")
_TYPE = _s(b"type")
_REG = _OPEN + _TYPE + _s(b"regular")
_EXEC = _s(b"executable") + _s(b"")
_CONTENTS = _s(b"contents")
_LINK = _OPEN + _TYPE + _s(b"symlink") + _s(b"target")
_DIR = _OPEN + _TYPE + _s(b"directory")
_ENTRY = _s(b"entry") + _OPEN + _s(b"name")
_NODE = _s(b"node")


def _dump(path: str, buf: bytearray, sink: Sink) -> None:
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        buf += _REG
        if st.st_mode & stat.S_IXUSR:
            buf += _EXEC
        buf += _CONTENTS + st.st_size.to_bytes(8, "little")
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                buf += block
                if len(buf) >= _FLUSH:
                    sink(bytes(buf))
                    buf.clear()
        buf += _pad(st.st_size) + _CLOSE
    elif stat.S_ISLNK(st.st_mode):
        buf += _LINK + _s(os.fsencode(os.readlink(path))) + _CLOSE
    elif stat.S_ISDIR(st.st_mode):
        buf += _DIR
        for name in sorted(os.fsencode(n) for n in os.listdir(path)):
            buf += _ENTRY + _s(name) + _NODE
            _dump(os.path.join(path, os.fsdecode(name)), buf, sink)
            buf += _CLOSE
        buf += _CLOSE
    else:
        raise ValueError(f"{path}: not a regular file, directory or symlink")
    if len(buf) >= _FLUSH:
        sink(bytes(buf))
        buf.clear()


def dump(path: str | os.PathLike[str], sink: Sink) -> None:
    """Write the NAR of `path` to `sink`, in pieces."""
    buf = bytearray(_MAGIC)
    _dump(os.fspath(path), buf, sink)
    sink(bytes(buf))


def digest(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(`sha256:<hex>`, NAR length) of the item at `path`."""
    sha = hashlib.sha256()
    size = 0

    def sink(block: bytes) -> None:
        nonlocal size
        sha.update(block)
        size += len(block)

    dump(path, sink)
    return "sha256:" + sha.hexdigest(), size


def selfcheck(paths: list[str]) -> None:
    """Compare with incstore's serialiser and, if installed, with `nix-store --dump`."""
    from incstore import nar  # only for this check: the bench itself never imports it

    for path in paths:
        ours = digest(path)
        theirs = nar.dump_hashed(path)
        assert ours == (theirs.db_hash, theirs.size), (path, ours, theirs)
        if shutil.which("nix-store"):
            sha = hashlib.sha256()
            with subprocess.Popen(["nix-store", "--dump", path], stdout=subprocess.PIPE) as p:
                assert p.stdout is not None
                size = 0
                while block := p.stdout.read(1 << 20):
                    sha.update(block)
                    size += len(block)
            assert ours == ("sha256:" + sha.hexdigest(), size), (path, "nix-store --dump")
        print(f"ok {ours[1]:>12} {path}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    selfcheck(sys.argv[1:])
