"""Trust end to end through the real CLI: keys, signed saves, and restores that believe only
what a trusted key signed — checked against the real Nix (nix copy with signatures required)
and the real libgcrypt (Guix signatures)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from incstore import db
from incstore.demo import rows
from incstore.errors import KeyFileError, SignatureError
from incstore.signature import (
    generate_guix_key,
    generate_nix_key,
    guix_sign_narinfo,
    nix_fingerprint,
    nix_sign,
    parse_secret_key,
    substitute_cache_dirname,
)
from incstore.store import Store
from incstore.storepath import nix32_encode

from .conftest import SampleStore, make_sample, needs_nix, run
from .manifests import dump, load
from .test_signature import Gcrypt, gcrypt, payload_sexp  # noqa: F401 (fixture)

NIX = ["nix", "--extra-experimental-features", "nix-command"]


def keypair(tmp_path: Path, name: str = "ci-1", *, guix: bool = False) -> tuple[Path, Path]:
    sec, pub = tmp_path / f"{name}.sec", tmp_path / f"{name}.pub"
    r = run("keygen", name, sec, pub, *(["--guix"] if guix else []))
    assert r.code == 0, r.err
    return sec, pub


def save(src: SampleStore, cache: Path, name: str, *extra: str | Path):  # type: ignore[no-untyped-def]
    return run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", cache,
               "--name", name, "--json", *extra)


def restore(cache: Path, dst: Path, name: str, *extra: str | Path):  # type: ignore[no-untyped-def]
    return run("restore", "--name", name, "--cache", cache, "--prefix", dst, "--json", *extra)


def store_entries(dst: Path, flavour: db.Flavour = db.GUIX) -> list[str]:
    root = Store(dst, flavour).store_root
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def registered(dst: Path, flavour: db.Flavour = db.GUIX) -> dict[str, db.PathInfo]:
    path = Store(dst, flavour).default_db
    return rows(path) if path.exists() else {}


@pytest.fixture
def signed(tmp_path: Path) -> tuple[SampleStore, Path, Path, Path]:
    """A sample store saved as `w` with a Nix-format key: (store, cache, secret, public)."""
    src = make_sample(tmp_path / "src", items=8, seed=91)
    sec, pub = keypair(tmp_path)
    r = save(src, tmp_path / "cache", "w", "--sign-key", sec)
    assert r.code == 0, r.err
    assert "ci-1:" not in r.out.replace(pub.read_text(), "")  # no key material in the output
    return src, tmp_path / "cache", sec, pub


def test_keygen_writes_a_private_nix_key_pair_and_refuses_to_overwrite(tmp_path: Path) -> None:
    sec, pub = keypair(tmp_path)
    assert sec.stat().st_mode & 0o777 == 0o600
    assert pub.read_text().startswith("ci-1:") and len(sec.read_text().split(":")[1]) == 88
    assert run("keygen", "ci-1", sec, tmp_path / "other.pub").code == KeyFileError.exit_code
    gsec, gpub = keypair(tmp_path, "g", guix=True)
    assert gpub.read_text().startswith("(public-key")
    # the modes each project's own key generator gives its files, and what keygen says
    assert {p.name: p.stat().st_mode & 0o777 for p in (sec, pub, gsec, gpub)} == {
        sec.name: 0o600, pub.name: 0o644, gsec.name: 0o400, gpub.name: 0o444}
    said = run("keygen", "--guix", "x", tmp_path / "s2", tmp_path / "p2").err
    assert "mode 0400" in said and "mode 0444" in said and "0600" not in said


def test_save_refuses_a_secret_key_others_can_read(tmp_path: Path) -> None:
    src = make_sample(tmp_path / "src", items=3, seed=92)
    sec, _ = keypair(tmp_path)
    sec.chmod(0o644)
    r = save(src, tmp_path / "cache", "w", "--sign-key", sec)
    assert r.code == KeyFileError.exit_code, r.err
    assert len(r.err.strip().splitlines()) == 1 and str(sec) in r.err
    assert sec.read_text().split(":")[1] not in r.err


def test_a_signed_manifest_restores_trusted(tmp_path: Path,
                                            signed: tuple[SampleStore, Path, Path, Path]) -> None:
    src, cache, _, pub = signed
    assert (cache / "manifests" / "w.json.sig").read_text().startswith("ed25519 ci-1:")
    r = restore(cache, tmp_path / "dst", "w", "--trusted-key", pub)
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["trusted"] is True and doc["trust"]["manifest_signed_by"] == "ci-1"
    assert registered(tmp_path / "dst") == rows(src.db_path)  # every field from the manifest
    # the same, with the key given as a string in the environment
    r = run("restore", "--name", "w", "--cache", cache, "--prefix", tmp_path / "dst2",
            "--json", env={"INCSTORE_TRUSTED_KEYS": f"other:{'A' * 43}= {pub.read_text()}"})
    assert r.code == 0, r.err
    assert r.json()["trusted"] is True


def test_without_a_trust_root_the_restore_says_it_is_not_trusted(
        tmp_path: Path, signed: tuple[SampleStore, Path, Path, Path]) -> None:
    _, cache, _, _ = signed
    r = restore(cache, tmp_path / "dst", "w")
    assert r.code == 0 and r.json()["trusted"] is False
    human = run("restore", "--name", "w", "--cache", cache, "--prefix", tmp_path / "dst")
    assert "trusted: no" in human.out


def _refused_and_untouched(r, dst: Path, before: list[str]) -> None:  # type: ignore[no-untyped-def]
    assert r.code == SignatureError.exit_code, (r.code, r.err)
    assert "Traceback" not in r.err
    assert store_entries(dst) == before
    assert not registered(dst)
    if not before:  # the target exactly as it was: no store directory, no DB, no big-lock
        assert not dst.exists() or sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == []


def test_a_manifest_and_items_signed_by_another_key_are_refused(
        tmp_path: Path, signed: tuple[SampleStore, Path, Path, Path]) -> None:
    _, cache, _, _ = signed
    _, other = keypair(tmp_path, "other-1")
    r = restore(cache, tmp_path / "dst", "w", "--trusted-key", other)
    _refused_and_untouched(r, tmp_path / "dst", [])
    assert r.err.count("not trusted") == len(load(cache / "manifests" / "w.json")["items"])


def test_an_unsigned_save_is_refused_once_a_key_is_trusted(tmp_path: Path) -> None:
    src = make_sample(tmp_path / "src", items=4, seed=93)
    _, pub = keypair(tmp_path)
    assert save(src, tmp_path / "cache", "w").code == 0
    r = restore(tmp_path / "cache", tmp_path / "dst", "w", "--trusted-key", pub)
    _refused_and_untouched(r, tmp_path / "dst", [])
    assert "is not signed" in r.json()["trust"]["manifest_problem"]
    r = restore(tmp_path / "cache", tmp_path / "dst", "w", "--trusted-key", pub,
                "--require-signed-manifest")
    _refused_and_untouched(r, tmp_path / "dst", [])
    assert len(r.err.strip().splitlines()) == 1


def test_a_swapped_chunk_with_a_matching_tampered_manifest_is_refused(
        tmp_path: Path, signed: tuple[SampleStore, Path, Path, Path]) -> None:
    src, cache, _, pub = signed
    path = cache / "manifests" / "w.json"
    doc = load(path)
    # the attacker puts another item's chunk under the victim's key and makes the manifest
    # agree with it: every hash matches, but nobody trusted signed that content for the path
    victim, donor = doc["items"][0], doc["items"][1]
    (cache / "nar" / f"{victim['chunk']['key']}.nar.zst").write_bytes(
        (cache / "nar" / f"{donor['chunk']['key']}.nar.zst").read_bytes())
    victim["chunk"].update(size=donor["chunk"]["size"], xxh3_128=donor["chunk"]["xxh3_128"])
    victim.update(nar_hash=donor["nar_hash"], nar_size=donor["nar_size"])
    dump(path, doc)
    r = restore(cache, tmp_path / "dst", "w", "--trusted-key", pub)
    assert r.code == SignatureError.exit_code, r.err
    assert victim["path"] in r.err and "not trusted" in r.err
    got = registered(tmp_path / "dst")
    assert victim["path"] not in got
    assert not Store(tmp_path / "dst", db.GUIX).exists(victim["path"])
    assert not any(victim["path"] in info.references for info in got.values())
    # whatever was restored is exactly what the source has
    for p, info in got.items():
        assert info.hash == rows(src.db_path)[p].hash


def test_fields_no_item_signature_covers_come_only_from_a_signed_manifest(
        tmp_path: Path, signed: tuple[SampleStore, Path, Path, Path]) -> None:
    src, cache, _, pub = signed
    path = cache / "manifests" / "w.json"
    doc = load(path)
    for item in doc["items"]:
        item["registration_time"] = 42
    dump(path, doc)  # the manifest's signature no longer holds; the items' own ones do
    before = time.time()
    r = restore(cache, tmp_path / "dst", "w", "--trusted-key", pub)
    assert r.code == 0, r.err
    assert r.json()["trusted"] is True and r.json()["trust"]["manifest_signed_by"] is None
    got = registered(tmp_path / "dst")
    assert set(got) == set(rows(src.db_path))
    assert all(info.registration_time >= before - 1 and info.deriver is None
               for info in got.values())


def test_an_old_signed_manifest_replayed_under_another_name_is_refused(
        tmp_path: Path, signed: tuple[SampleStore, Path, Path, Path]) -> None:
    _, cache, _, pub = signed
    manifests = cache / "manifests"
    for suffix in ("", ".sig"):
        (manifests / f"prod.json{suffix}").write_bytes((manifests / f"w.json{suffix}").read_bytes())
    r = restore(cache, tmp_path / "dst", "prod", "--trusted-key", pub)
    _refused_and_untouched(r, tmp_path / "dst", [])
    assert "replay" in r.err and len(r.err.strip().splitlines()) == 1


def test_max_age_refuses_an_old_signed_manifest(
        tmp_path: Path, signed: tuple[SampleStore, Path, Path, Path]) -> None:
    _, cache, _, pub = signed
    time.sleep(1.1)
    r = restore(cache, tmp_path / "dst", "w", "--trusted-key", pub, "--max-age", "1s")
    _refused_and_untouched(r, tmp_path / "dst", [])
    assert restore(cache, tmp_path / "dst", "w", "--trusted-key", pub,
                   "--max-age", "30d").code == 0


# upstream signatures ------------------------------------------------------------------


def _nix_store_with_upstream_sigs(tmp_path: Path) -> tuple[SampleStore, str]:
    """A Nix sample store whose DB carries signatures by an 'upstream cache' key, as paths
    substituted from cache.nixos.org do; returns the upstream public key."""
    src = make_sample(tmp_path / "src", db.NIX, items=6, seed=94)
    secret_text, public_text = generate_nix_key("upstream-1")
    secret = parse_secret_key(secret_text)
    import sqlite3

    con = sqlite3.connect(src.db_path)
    for info in src.infos:
        sig = nix_sign(secret, nix_fingerprint(info.path, info.hash, info.nar_size,  # type: ignore[arg-type]
                                               info.references))
        con.execute("update ValidPaths set sigs = ? where path = ?", (sig, info.path))
    con.commit()
    con.close()
    return src, public_text


def test_nix_upstream_signatures_are_kept_and_vouch_for_items(tmp_path: Path) -> None:
    src, upstream = _nix_store_with_upstream_sigs(tmp_path)
    assert save(src, tmp_path / "cache", "w").code == 0  # saved without a key of its own
    narinfo = next((tmp_path / "cache").glob("*.narinfo")).read_text()
    assert "Sig: upstream-1:" in narinfo
    r = run("restore", "--name", "w", "--cache", tmp_path / "cache", "--prefix",
            tmp_path / "dst", "--json", "--trusted-key", upstream)
    assert r.code == 0, r.err
    assert r.json()["trusted"] is True
    got = registered(tmp_path / "dst", db.NIX)
    assert {p: i.sigs for p, i in got.items()} == {p: i.sigs for p, i in rows(src.db_path).items()}


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _guix_store_with_substitute_cache(tmp_path: Path) -> tuple[SampleStore, Path, str]:
    """A Guix sample store as if every item had been substituted from a server whose Guix key
    signed its narinfos, cached by `guix substitute` under var/guix/substitute/cache; returns
    the store, the server's public key file and one item whose cached narinfo lies."""
    src = make_sample(tmp_path / "src", items=6, seed=95)
    sec_text, pub_text = generate_guix_key()
    secret = parse_secret_key(sec_text)
    pub = tmp_path / "server.pub"
    pub.write_text(pub_text)
    url = "https://substitutes.example"
    where = src.prefix / "var/guix/substitute/cache" / substitute_cache_dirname(url)
    where.mkdir(parents=True)
    liar = sorted(src.infos, key=lambda i: i.path)[0].path
    for info in src.infos:
        digest = "sha256:" + nix32_encode(bytes.fromhex(info.hash[7:]))
        size = info.nar_size + (1 if info.path == liar else 0)
        text = (f"StorePath: {info.path}\nURL: nar/zstd/{info.path[11:]}\nCompression: zstd\n"
                f"NarHash: {digest}\nNarSize: {size}\n"
                f"References: {' '.join(sorted(r[11:] for r in info.references))}\n"
                f"FileSize: 1\nSystem: x86_64-linux\n"
                + (f"Deriver: {info.deriver[11:]}\n" if info.deriver else ""))
        entry = (f'(narinfo (version 2) (cache-uri "{url}") (date 1) (ttl 1) '
                 f"(value {_scheme_string(guix_sign_narinfo(secret, text))}))")  # long expired
        (where / info.path[11:43]).write_text(entry)
    return src, pub, liar


def test_guix_upstream_narinfos_are_harvested_checked_and_vouch_for_items(
        tmp_path: Path) -> None:
    src, server_pub, liar = _guix_store_with_substitute_cache(tmp_path)
    cache = tmp_path / "cache"
    assert save(src, cache, "w").code == 0  # no key of our own
    kept = {p.name.removesuffix(".narinfo") for p in (cache / "guix").iterdir()}
    doc = load(cache / "manifests" / "w.json")
    with_upstream = {i["path"] for i in doc["items"] if (i["extra"] or {}).get("upstream_narinfo")}
    # the one whose cached narinfo disagrees with the DB is not kept
    assert liar not in with_upstream and len(with_upstream) == len(src.infos) - 1
    assert kept == {i["chunk"]["key"] for i in doc["items"] if i["path"] in with_upstream}
    # an ACL file in Guix's format, as `guix archive --authorize` writes it
    acl = tmp_path / "acl"
    acl.write_text(f"(acl (entry {server_pub.read_text()} (tag (guix import))))\n")
    r = run("restore", "--name", "w", "--cache", cache, "--prefix", tmp_path / "dst", "--json",
            "--trust-guix-acl", acl)
    assert r.code == SignatureError.exit_code, r.err
    refused = {line.split(": ")[0] for line in r.json()["failed"]}
    liar_and_referrers = {liar} | {i.path for i in src.infos if liar in i.references}
    assert refused == {liar}
    got = registered(tmp_path / "dst")
    assert set(got) == {i.path for i in src.infos} - liar_and_referrers
    # each signed narinfo's Deriver is covered by its signature: registered, as the daemon
    # registers it when it substitutes that narinfo
    derivers = {i.path: i.deriver for i in src.infos}
    assert any(derivers[p] for p in got)
    assert {p: info.deriver for p, info in got.items()} == {p: derivers[p] for p in got}


def test_a_guix_signed_save_verifies_with_libgcrypt_and_by_itself(
        tmp_path: Path, gcrypt: Gcrypt) -> None:  # noqa: F811 (pytest fixture)
    src = make_sample(tmp_path / "src", items=4, seed=96)
    sec, pub = keypair(tmp_path, "g", guix=True)
    cache = tmp_path / "cache"
    assert save(src, cache, "w", "--sign-key", sec).code == 0
    narinfos = list(cache.glob("*.narinfo"))
    assert len(narinfos) == len(src.infos)
    for narinfo in narinfos:
        last = narinfo.read_text().splitlines()[-1]
        assert last.startswith("Signature: 1;incstore;")
        assert gcrypt.verify(payload_sexp(last))
    assert gcrypt.verify(payload_sexp((cache / "manifests/w.json.sig").read_text()))
    gcrypt.release()
    # signed manifest: trusted
    r = restore(cache, tmp_path / "dst", "w", "--trusted-key", pub)
    assert r.code == 0 and r.json()["trust"]["manifest_signed_by"].startswith("guix:")
    # unsigned manifest: the narinfos' Guix signatures vouch for each item
    (cache / "manifests/w.json.sig").unlink()
    r = restore(cache, tmp_path / "dst2", "w", "--trusted-key", pub)
    assert r.code == 0, r.err
    assert r.json()["trusted"] is True and r.json()["trust"]["manifest_signed_by"] is None
    derivers = {p: info.deriver for p, info in registered(tmp_path / "dst2").items()}
    assert derivers == {i.path: i.deriver for i in src.infos} and any(derivers.values())


def test_sign_key_from_the_environment_and_resigning_a_filled_store(tmp_path: Path) -> None:
    src = make_sample(tmp_path / "src", items=4, seed=97)
    cache = tmp_path / "cache"
    assert save(src, cache, "w").code == 0  # filled before signing began
    sec, pub = keypair(tmp_path)
    r = run("save", "--db", src.db_path, "--prefix", src.prefix, "--cache", cache,
            "--name", "w", env={"INCSTORE_SIGN_KEY_FILE": str(sec)})
    assert r.code == 0, r.err
    assert all("Sig: ci-1:" in p.read_text() for p in cache.glob("*.narinfo"))
    assert restore(cache, tmp_path / "dst", "w", "--trusted-key", pub).json()["trusted"]


@needs_nix
def test_nix_copy_requires_and_accepts_our_signatures(tmp_path: Path) -> None:
    """A key made by nix-store signs a save; Nix 2.8 copies from the chunk store with
    signature checking on when the key is trusted, and refuses with another key."""
    env = {**os.environ, "NIX_CONF_DIR": str(tmp_path / "nix-conf"),
           "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)}
    (tmp_path / "nix-conf").mkdir()
    sec, pub = tmp_path / "k.sec", tmp_path / "k.pub"
    p = subprocess.run(["nix-store", "--generate-binary-cache-key", "interop-1", sec, pub],
                       capture_output=True, text=True, env=env, check=False)
    assert p.returncode == 0, p.stderr
    src = make_sample(tmp_path / "src", db.NIX, items=6, seed=98)
    cache = tmp_path / "cache"
    assert save(src, cache, "w", "--sign-key", sec).code == 0
    wanted = sorted(rows(src.db_path))

    def copy(dst: Path, trusted: str, paths: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*NIX, "copy", "--from", f"file://{cache}", "--to", str(dst), "--option",
             "substituters", "", "--option", "require-sigs", "true", "--option",
             "trusted-public-keys", trusted, *paths],
            capture_output=True, text=True, env=env, check=False)

    # the sample's .drv texts are not derivations Nix would register (it checks their output
    # paths), so the outputs are what Nix copies
    outputs = [p for p in wanted if not p.endswith(".drv")]
    refused = copy(tmp_path / "refused", generate_nix_key("interop-1")[1], outputs)
    assert refused.returncode != 0 and "lacks a valid signature" in refused.stderr
    accepted = copy(tmp_path / "dst", pub.read_text(), outputs)
    assert accepted.returncode == 0, accepted.stderr
    got = rows(tmp_path / "dst/nix/var/nix/db/db.sqlite")
    assert sorted(got) == outputs
    # and our own restore trusts the same key through nix.conf
    (tmp_path / "nix-conf/nix.conf").write_text(f"trusted-public-keys = {pub.read_text()}\n")
    r = run("restore", "--name", "w", "--cache", cache, "--prefix", tmp_path / "ours", "--json",
            "--trust-nix-conf", env={"NIX_CONF_DIR": str(tmp_path / "nix-conf")})
    assert r.code == 0 and json.loads(r.out)["trusted"] is True
