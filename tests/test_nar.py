"""NAR: byte-exactness with nix-store --dump, round trips, and hostile archives."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from incstore import nar
from incstore.errors import NarFormatError
from incstore.verify import metadata_problems

from .conftest import needs_nix


def s(data: bytes) -> bytes:
    """One NAR string: length, bytes, zero padding."""
    return len(data).to_bytes(8, "little") + data + b"\0" * ((8 - len(data) % 8) % 8)


def toks(*parts: bytes) -> bytes:
    return b"".join(s(p) for p in parts)


def regular(contents: bytes, executable: bool = False) -> bytes:
    head = toks(b"(", b"type", b"regular") + (toks(b"executable", b"") if executable else b"")
    return head + toks(b"contents", contents, b")")


def symlink(target: bytes) -> bytes:
    return toks(b"(", b"type", b"symlink", b"target", target, b")")


def directory(*entries: tuple[bytes, bytes]) -> bytes:
    body = b"".join(toks(b"entry", b"(", b"name", name) + s(b"node") + node + s(b")")
                    for name, node in entries)
    return toks(b"(", b"type", b"directory") + body + s(b")")


def archive(node: bytes) -> bytes:
    return s(b"nix-archive-1") + node


def make_tree(root: Path) -> None:
    """A tree with every kind of entry the NAR format has."""
    root.mkdir()
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "Zeta").write_bytes(b"upper case sorts first")
    (root / "alpha").write_bytes(b"")
    (root / "seven").write_bytes(b"1234567")
    (root / "eight").write_bytes(b"12345678")
    (root / "big").write_bytes(os.urandom(nar.INLINE_FILE + 12345))
    (root / "empty-dir").mkdir()
    os.symlink("/gnu/store/" + "a" * 32 + "-abs", root / "abs-link")
    os.symlink("../bin/tool", root / "rel-link")
    os.symlink("dangling", root / "dangling-link")
    (root / "ünïcode").write_bytes(b"utf-8 name")


def restore_bytes(data: bytes, dest: Path) -> nar.NarDigest:
    fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return nar.restore(io.BytesIO(data).read, fd, dest.name, item="test-item")
    finally:
        os.close(fd)


@needs_nix
def test_dump_is_byte_exact_with_nix_store_dump(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    make_tree(root)
    for path in [root, root / "bin" / "tool", root / "abs-link", root / "alpha"]:
        ours = nar.dump_bytes(path)
        theirs = subprocess.run(["nix-store", "--dump", str(path)], capture_output=True,
                                check=True).stdout
        assert ours == theirs, path
        nix_hash = subprocess.run(["nix-hash", "--type", "sha256", str(path)],
                                  capture_output=True, text=True, check=True).stdout.strip()
        assert nar.dump_hashed(path).sha256 == nix_hash


def test_golden_nar_of_a_small_tree(tmp_path: Path) -> None:
    # built by hand from the grammar, independently of the serialiser
    root = tmp_path / "g"
    root.mkdir()
    (root / "a").write_bytes(b"hello")
    (root / "x").write_bytes(b"#!")
    (root / "x").chmod(0o755)
    os.symlink("a", root / "l")
    expected = archive(directory((b"a", regular(b"hello")), (b"l", symlink(b"a")),
                                 (b"x", regular(b"#!", executable=True))))
    assert nar.dump_bytes(root) == expected
    digest = nar.dump_hashed(root)
    assert digest.sha256 == hashlib.sha256(expected).hexdigest()
    assert digest.size == len(expected)


def test_round_trip_gives_canonical_metadata(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    make_tree(root)
    data = nar.dump_bytes(root)
    digest = restore_bytes(data, tmp_path / "out")
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert digest.size == len(data)
    assert nar.dump_bytes(tmp_path / "out") == data
    assert metadata_problems(tmp_path / "out") == []
    assert os.readlink(tmp_path / "out" / "abs-link") == "/gnu/store/" + "a" * 32 + "-abs"
    assert (tmp_path / "out" / "bin" / "tool").stat().st_mode & 0o777 == 0o555
    assert (tmp_path / "out" / "alpha").stat().st_mode & 0o777 == 0o444


names = st.binary(min_size=1, max_size=12).filter(
    lambda n: n not in (b".", b"..") and b"/" not in n and b"\0" not in n
)
trees = st.recursive(
    st.one_of(
        st.tuples(st.just("file"), st.binary(max_size=300), st.booleans()),
        st.tuples(st.just("link"),
                  st.binary(min_size=1, max_size=40).filter(lambda t: b"\0" not in t)),
    ),
    lambda children: st.dictionaries(names, children, max_size=5).map(lambda d: ("dir", d)),
    max_leaves=20,
)


def encode(tree: tuple) -> bytes:  # type: ignore[type-arg]
    if tree[0] == "file":
        return regular(tree[1], tree[2])
    if tree[0] == "link":
        return symlink(tree[1])
    return directory(*[(name, encode(child)) for name, child in sorted(tree[1].items())])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=trees)
def test_property_restore_then_dump_is_identity(tmp_path: Path, tree: tuple) -> None:  # type: ignore[type-arg]
    data = archive(encode(tree))
    dest = tmp_path / f"t{hashlib.sha256(data).hexdigest()[:16]}"
    if os.path.lexists(dest):  # hypothesis repeats examples within one tmp_path
        return
    digest = restore_bytes(data, dest)
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert nar.dump_bytes(dest) == data


HOSTILE = {
    "dotdot": archive(directory((b"..", regular(b"x")))),
    "dot": archive(directory((b".", regular(b"x")))),
    "empty-name": archive(directory((b"", regular(b"x")))),
    "slash": archive(directory((b"a/b", regular(b"x")))),
    "absolute": archive(directory((b"/etc", regular(b"x")))),
    "nul": archive(directory((b"a\0b", regular(b"x")))),
    "unsorted": archive(directory((b"b", regular(b"x")), (b"a", regular(b"y")))),
    "duplicate": archive(directory((b"a", regular(b"x")), (b"a", regular(b"y")))),
    "write-through-symlink": archive(
        directory((b"l", symlink(b"/tmp")), (b"l", directory((b"evil", regular(b"x")))))
    ),
    "huge-length": s(b"nix-archive-1") + toks(b"(", b"type", b"regular", b"contents")
    + (1 << 62).to_bytes(8, "little") + b"short",
    "huge-name": s(b"nix-archive-1") + toks(b"(", b"type", b"directory", b"entry", b"(", b"name")
    + (1 << 40).to_bytes(8, "little"),
    "truncated": archive(regular(b"hello world"))[:-12],
    "trailing-garbage": archive(regular(b"x")) + b"garbage!",
    "bad-padding": s(b"nix-archive-1") + toks(b"(", b"type", b"regular", b"contents")
    + (1).to_bytes(8, "little") + b"x\1\0\0\0\0\0\0" + s(b")"),
    "bad-magic": s(b"nix-archive-2") + regular(b"x"),
    "unknown-type": archive(toks(b"(", b"type", b"fifo", b")")),
    "empty-target": archive(symlink(b"")),
    "nul-target": archive(symlink(b"a\0b")),
    "executable-junk": s(b"nix-archive-1") + toks(b"(", b"type", b"regular", b"executable", b"x"),
    "empty": b"",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_nar_is_rejected_without_escaping(tmp_path: Path, case: str) -> None:
    jail = tmp_path / "jail"
    jail.mkdir()
    outside_before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(NarFormatError) as info:
        restore_bytes(HOSTILE[case], jail / "item")
    assert "test-item" in str(info.value)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == outside_before
    # nothing but the item itself was created in the jail, and nothing at all outside it
    assert [p.name for p in jail.iterdir()] in ([], ["item"])
    assert not Path("/tmp/evil").exists()


def test_symlinks_with_absolute_or_dotdot_targets_are_kept_not_followed(tmp_path: Path) -> None:
    data = archive(directory((b"a", symlink(b"/etc/passwd")), (b"b", symlink(b"../../outside"))))
    restore_bytes(data, tmp_path / "item")
    assert os.readlink(tmp_path / "item" / "a") == "/etc/passwd"
    assert os.readlink(tmp_path / "item" / "b") == "../../outside"
    assert not (tmp_path.parent / "outside").exists()


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    node = regular(b"x")
    for _ in range(nar.MAX_DEPTH + 2):
        node = directory((b"d", node))
    with pytest.raises(NarFormatError, match="deeper"):
        restore_bytes(archive(node), tmp_path / "item")
