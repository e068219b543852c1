"""Deduplication on restore: identical files hard-linked through the store's `.links`, named as
the daemon names them, never linked to an entry that is not what its name says, and checked by
the real Nix (`--verify --check-contents` re-hashes every `.links` entry; `--optimise` must find
nothing left to link)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import struct
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from incstore import db, links, nar
from incstore.demo import rows
from incstore.sample import LICENSE_TEXT
from incstore.storepath import nix32_encode

from .conftest import SampleStore, make_sample, needs_nix, run


def _save(tmp_path: Path, src: SampleStore) -> tuple[Path, Path]:
    cache, manifest = tmp_path / "cache", tmp_path / "m.json"
    r = run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", cache,
            "--manifest", manifest)
    assert r.code == 0, r.err
    return cache, manifest


def _restore(cache: Path, manifest: Path, dst: Path, *extra: str) -> dict:  # type: ignore[type-arg]
    r = run("restore", "--manifest", manifest, "--cache", cache, "--prefix", dst, "--json",
            *extra)
    assert r.code == 0, r.err
    return r.json() | {"stderr": r.err}


def _files(store_root: Path) -> list[tuple[Path, os.stat_result]]:
    """Every regular file and symlink inside the items (not `.links`)."""
    out = []
    for item in store_root.iterdir():
        if item.name.startswith("."):
            continue
        for p in [item, *item.rglob("*")] if item.is_dir() and not item.is_symlink() else [item]:
            st = p.lstat()
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                out.append((p, st))
    return out


def _lone_nar_name(path: Path) -> str:
    """The `.links` name of a file: nix-base32 sha256 of its own NAR (computed by nar.dump)."""
    return nix32_encode(bytes.fromhex(nar.dump_hashed(path).sha256))


def _content_groups(store_root: Path, min_size: int) -> dict[tuple[bytes, bool], list[Path]]:
    groups: dict[tuple[bytes, bool], list[Path]] = defaultdict(list)
    for p, st in _files(store_root):
        if stat.S_ISREG(st.st_mode) and st.st_size >= min_size:
            key = (hashlib.sha256(p.read_bytes()).digest(), bool(st.st_mode & 0o100))
            groups[key].append(p)
    return groups


def _items_intact(src: SampleStore, dst: Path) -> None:
    """Every restored item hashes to what the source DB records, and the DBs agree."""
    dst_db = dst / "var/guix/db/db.sqlite" if src.flavour is db.GUIX else \
        dst / "nix/var/nix/db/db.sqlite"
    assert rows(dst_db) == rows(src.db_path)
    for info in src.infos:
        physical = dst / info.path.lstrip("/")
        assert nar.dump_hashed(physical).db_hash == info.hash, info.path


def test_guix_restore_links_identical_files_through_dot_links(tmp_path: Path) -> None:
    src = make_sample(tmp_path / "src", items=10)
    cache, manifest = _save(tmp_path, src)
    dst = tmp_path / "dst"
    doc = _restore(cache, manifest, dst)
    store_root = dst / "gnu/store"
    _items_intact(src, dst)

    # what should have been linked, worked out from the restored files themselves
    groups = _content_groups(store_root, links.GUIX_MIN_SIZE)
    expected_saved = sum((len(ps) - 1) * ps[0].stat().st_size for ps in groups.values())
    licences = [p for p, _ in _files(store_root) if p.name == "COPYING"]
    assert len(licences) >= 5
    assert expected_saved >= (len(licences) - 1) * len(LICENSE_TEXT)
    assert doc["deduplicated"]["bytes"] == expected_saved
    assert doc["deduplicated"]["files"] == sum(len(ps) - 1 for ps in groups.values())
    assert f"{expected_saved:,} bytes saved" not in doc["stderr"]  # --json: no human line

    for paths in groups.values():
        inodes = {p.stat().st_ino for p in paths}
        assert len(inodes) == 1, paths
        entry = store_root / ".links" / _lone_nar_name(paths[0])
        assert entry.stat().st_ino in inodes
        assert entry.stat().st_nlink == len(paths) + 1
    # Guix links nothing under 8192 bytes, and no symlinks
    for p, st in _files(store_root):
        if stat.S_ISLNK(st.st_mode) or st.st_size < links.GUIX_MIN_SIZE:
            assert st.st_nlink == 1, p
    assert {e.name for e in (store_root / ".links").iterdir()} == {
        _lone_nar_name(ps[0]) for ps in groups.values()}

    # a second restore finds everything present and changes nothing
    before = {p: (st.st_ino, st.st_nlink) for p, st in _files(store_root)}
    again = _restore(cache, manifest, dst)
    assert again["extracted"] == 0 and again["present"] == len(src.infos)
    assert {p: (st.st_ino, st.st_nlink) for p, st in _files(store_root)} == before


@needs_nix
def test_links_names_are_what_nix_hash_says(tmp_path: Path) -> None:
    src = make_sample(tmp_path / "src", items=6)
    cache, manifest = _save(tmp_path, src)
    dst = tmp_path / "dst"
    _restore(cache, manifest, dst)
    entries = sorted((dst / "gnu/store/.links").iterdir())
    assert entries
    for entry in entries:
        p = subprocess.run(["nix-hash", "--type", "sha256", "--base32", str(entry)],
                           capture_output=True, text=True, check=True)
        assert p.stdout.strip() == entry.name


def test_no_deduplicate_links_nothing(tmp_path: Path) -> None:
    src = make_sample(tmp_path / "src", items=6)
    cache, manifest = _save(tmp_path, src)
    dst = tmp_path / "dst"
    doc = _restore(cache, manifest, dst, "--no-deduplicate")
    assert doc["deduplicated"] is None
    assert all(st.st_nlink == 1 for _, st in _files(dst / "gnu/store"))
    assert not (dst / "gnu/store/.links").exists()
    _items_intact(src, dst)


def _licence_entry_name() -> str:
    h = hashlib.sha256(nar.lone_file_head(len(LICENSE_TEXT), False) + LICENSE_TEXT
                       + nar.lone_file_tail(len(LICENSE_TEXT)))
    return nix32_encode(h.digest())


def _plant(dst: Path, name: str, make: object) -> Path:
    where = dst / "gnu/store/.links"
    where.mkdir(parents=True, exist_ok=True)
    entry = where / name
    assert callable(make)
    make(entry)
    return entry


def _regular(data: bytes, mode: int = 0o444, mtime: int = 1) -> object:
    def make(entry: Path) -> None:
        entry.write_bytes(data)
        entry.chmod(mode)
        os.utime(entry, (mtime, mtime))
    return make


def _with_xattr(name: str, value: bytes) -> object:
    def make(entry: Path) -> None:
        _regular(LICENSE_TEXT)(entry)  # type: ignore[operator]
        try:
            os.setxattr(entry, name, value)
        except OSError as e:
            pytest.skip(f"this file system refuses {name}: {e.strerror}")
    return make


def _with_flags(flags: int) -> object:
    def make(entry: Path) -> None:
        _regular(LICENSE_TEXT)(entry)  # type: ignore[operator]
        fd = os.open(entry, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, 0x40086602, struct.pack("=i", flags))  # FS_IOC_SETFLAGS
        except OSError as e:
            pytest.skip(f"this file system refuses inode flags: {e.strerror}")
        finally:
            os.close(fd)
    return make


# cap_setuid+ep (struct vfs_cap_data, revision 2): what `setcap cap_setuid+ep` writes
CAP_SETUID = struct.pack("<IIIII", 0x02000001, 1 << 7, 0, 0, 0)
# an ACL naming uid 1000, with the mask kept at r-- so that the mode still reads 0444
ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident
                                      in ((0x01, 4, 0xFFFFFFFF), (0x02, 7, 1000),
                                          (0x04, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
                                          (0x20, 4, 0xFFFFFFFF)))


def _symlink_to_bait(entry: Path) -> None:
    bait = entry.parent.parent / "bait"
    _regular(LICENSE_TEXT)(bait)  # type: ignore[operator]
    os.symlink("../bait", entry)


@pytest.mark.parametrize("case,make", [
    # same size, other bytes: a collision the name promises not to be
    ("other content", _regular(LICENSE_TEXT[::-1])),
    ("writable", _regular(LICENSE_TEXT, mode=0o644)),
    ("setuid", _regular(LICENSE_TEXT, mode=0o4555)),
    ("not canonical mtime", _regular(LICENSE_TEXT, mtime=1_700_000_000)),
    ("symlink to the real content", _symlink_to_bait),
    ("symlink outside", lambda e: os.symlink("/etc/passwd", e)),
    ("directory", lambda e: e.mkdir()),
    ("fifo", lambda e: os.mkfifo(e)),
    ("file capability", _with_xattr("security.capability", CAP_SETUID)),
    ("user xattr", _with_xattr("user.origin", b"attacker")),
    ("acl", _with_xattr("system.posix_acl_access", ACL)),
    ("nodump flag", _with_flags(0x40)),
])
def test_a_planted_links_entry_is_never_linked_to(tmp_path: Path, case: str,
                                                   make: object) -> None:
    src = make_sample(tmp_path / "src", items=6)
    cache, manifest = _save(tmp_path, src)
    dst = tmp_path / "dst"
    entry = _plant(dst, _licence_entry_name(), make)
    before = entry.lstat()
    doc = _restore(cache, manifest, dst)
    _items_intact(src, dst)
    licences = [p for p, _ in _files(dst / "gnu/store") if p.name == "COPYING"]
    assert licences and all(p.read_bytes() == LICENSE_TEXT for p in licences)
    assert all(p.lstat().st_ino != before.st_ino for p in licences)
    assert any(f".links/{entry.name} is not what its name says" in w for w in doc["warnings"])
    after = entry.lstat()  # left exactly as found
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == \
        (before.st_ino, before.st_mode, before.st_mtime_ns)
    assert Path("/etc/passwd").stat().st_nlink == 1
    for p in licences:  # what the restore wrote itself carries nothing of the entry's
        assert not os.listxattr(p)


def test_a_good_existing_entry_is_shared(tmp_path: Path) -> None:
    src = make_sample(tmp_path / "src", items=6)
    cache, manifest = _save(tmp_path, src)
    dst = tmp_path / "dst"
    entry = _plant(dst, _licence_entry_name(), _regular(LICENSE_TEXT))
    doc = _restore(cache, manifest, dst)
    _items_intact(src, dst)
    licences = [p for p, _ in _files(dst / "gnu/store") if p.name == "COPYING"]
    assert {p.stat().st_ino for p in licences} == {entry.stat().st_ino}
    assert doc["deduplicated"]["bytes"] >= len(licences) * len(LICENSE_TEXT)
    assert not doc["warnings"]


def test_a_links_directory_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    src = make_sample(tmp_path / "src", items=4)
    cache, manifest = _save(tmp_path, src)
    dst = tmp_path / "dst"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (dst / "gnu/store").mkdir(parents=True)
    os.symlink(elsewhere, dst / "gnu/store/.links")
    doc = _restore(cache, manifest, dst)
    _items_intact(src, dst)
    assert list(elsewhere.iterdir()) == []
    assert doc["deduplicated"] == {"files": 0, "bytes": 0}
    assert any(".links" in w for w in doc["warnings"])


# --- the real Nix ---------------------------------------------------------------------------


def _nix_optimise(root: Path) -> str:
    p = subprocess.run(["nix-store", "--store", str(root), "--optimise"], capture_output=True,
                       text=True, check=False)
    assert p.returncode == 0, p.stderr
    return p.stderr


@needs_nix
def test_nix_store_deduplicated_verifies_and_leaves_nothing_to_optimise(tmp_path: Path) -> None:
    from .test_nix_peer import check_contents

    src = make_sample(tmp_path / "src", db.NIX, items=8)
    cache, manifest = _save(tmp_path, src)
    # off by default for Nix, as auto-optimise-store is: then Nix finds work to do
    plain = tmp_path / "plain"
    doc = _restore(cache, manifest, plain)
    assert doc["deduplicated"] is None
    assert "hard-linking 0 files" not in _nix_optimise(plain)

    dst = tmp_path / "dst"
    doc = _restore(cache, manifest, dst, "--deduplicate")
    assert doc["deduplicated"]["files"] > 0
    check_contents(dst)  # re-hashes every .links entry against its name
    _items_intact(src, dst)
    assert "0.00 MiB freed by hard-linking 0 files" in _nix_optimise(dst)
    check_contents(dst)


@needs_nix
def test_nix_made_links_are_reused(tmp_path: Path) -> None:
    """A store Nix optimised itself: its `.links` entries are the right shape, and restoring
    more items into it shares them."""
    from .test_nix_peer import check_contents

    src = make_sample(tmp_path / "src", db.NIX, items=8)
    cache, manifest = _save(tmp_path, src)
    dst = tmp_path / "dst"
    half = tmp_path / "half.json"
    r = run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", tmp_path / "c2",
            "--manifest", half, "--closure-of", src.infos[0].path)
    assert r.code == 0, r.err
    _restore(tmp_path / "c2", half, dst, "--no-deduplicate")
    _nix_optimise(dst)
    doc = _restore(cache, manifest, dst, "--deduplicate")
    assert doc["extracted"] > 0 and doc["deduplicated"]["bytes"] > 0
    assert not doc["warnings"]
    check_contents(dst)
    assert "hard-linking 0 files" in _nix_optimise(dst)
