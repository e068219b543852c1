"""Signatures: Nix Ed25519 and Guix ECDSA keys, narinfo signatures and detached signatures,
checked against the real peers where they are installed (libgcrypt through ctypes, Nix 2.8,
Guile), plus fuzzing of every parser that reads untrusted input."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from incstore import signature as sig
from incstore.errors import KeyFileError, SignatureError
from incstore.signature import (
    GuixPublicKey,
    GuixSecretKey,
    NixPublicKey,
    NixSecretKey,
    generate_guix_key,
    generate_nix_key,
    guix_sign_narinfo,
    guix_verify_narinfo,
    nix_fingerprint,
    nix_sign,
    nix_verify,
    parse_guix_acl,
    parse_nix_conf_keys,
    parse_public_key,
    parse_secret_key,
    read_secret_key,
    read_substitute_cache_entry,
    sign_bytes,
    substitute_cache_dirname,
    verify_bytes,
)

from .conftest import IN_CI, needs, needs_nix

CI_GUIX_Q = "8D156F295D24B0D9A86FA5741A840FF2D24F60F7B6C4134814AD55625971B394"
CI_GUIX_KEY = f"(public-key (ecc (curve Ed25519) (q #{CI_GUIX_Q}#)))"

# Public narinfos signed by ci.guix.gnu.org (shared/reference/signatures.md).
VECTORS = [
    "StorePath: /gnu/store/8kib1cirdv0qbmn9hdkjzjfx3n5nw1yw-sed-4.4\n"
    "URL: nar/gzip/8kib1cirdv0qbmn9hdkjzjfx3n5nw1yw-sed-4.4\n"
    "Compression: gzip\n"
    "NarHash: sha256:18v7dgny1xna7f53mbkj8bk4y2f00l5rjk2k6hj166kjv964lz7r\n"
    "NarSize: 637360\n"
    "References: 3x53yv4v144c9xp02rs64z7j597kkqax-gcc-5.4.0-lib "
    "8kib1cirdv0qbmn9hdkjzjfx3n5nw1yw-sed-4.4 n6nvxlk2j8ysffjh3jphn1k5silnakh6-glibc-2.25\n"
    "FileSize: 218663\n"
    "System: x86_64-linux\n"
    "Deriver: pi8686q63rwr4md90vm3qxwhk2g2fvqa-sed-4.4.drv\n"
    "Signature: 1;berlin.guixsd.org;KHNpZ25hdHVyZSAKIChkYXRhIAogIChmbGFncyByZmM2OTc5KQogIChoYX"
    "NoIHNoYTI1NiAjQTRDRjUyMTVGNzlBOEUxRkFBNjIyOEQwQjk0QjMyMTZCRkY1RjA1NkQxMzZENUEzNTFGM0I2OTYz"
    "Qzc1MzQzMiMpCiAgKQogKHNpZy12YWwgCiAgKGVjZHNhIAogICAociAjMDFDM0NGMEIzRUMwNkIwRUNGMTJEMTU4Mk"
    "NCMzA2RjkzMEU2Njc1NDNFOEQ2NkZCRjhDRUY4QkQwMkMzOTg1NCMpCiAgIChzICMwRTg2MUEyRjI3MDg2MjVBRDkz"
    "MDg5RjFFRjE4NzUwQjIzQjM0RTA5MkFFRkQ3RTlFNkZCMjlCMkMwMURFNjI5IykKICAgKQogICkKIChwdWJsaWMta2"
    "V5IAogIChlY2MgCiAgIChjdXJ2ZSBFZDI1NTE5KQogICAocSAjOEQxNTZGMjk1RDI0QjBEOUE4NkZBNTc0MUE4NDBG"
    "RjJEMjRGNjBGN0I2QzQxMzQ4MTRBRDU1NjI1OTcxQjM5NCMpCiAgICkKICApCiApCg==\n",
    "StorePath: /gnu/store/y857mykfnc9vd1sc2lqz5g35l111fp71-opensmtpd-test\n"
    "URL: nar/gzip/y857mykfnc9vd1sc2lqz5g35l111fp71-opensmtpd-test\n"
    "Compression: gzip\n"
    "NarHash: sha256:136lm3fxh4kbsgz32157cnmyypgynkkmrqqb03biym1nm6cdwyv7\n"
    "NarSize: 2600\n"
    "References: 2sznibwwvp6x0ha2j6n8s1z1brf8ra4q-opensmtpd-test-builder\n"
    "FileSize: 894\n"
    "System: x86_64-linux\n"
    "Deriver: 8aski1xwcn6lj112yc9ylgp2y3c7sj83-opensmtpd-test.drv\n"
    "Signature: 1;berlin.guixsd.org;KHNpZ25hdHVyZSAKIChkYXRhIAogIChmbGFncyByZmM2OTc5KQogIChoYX"
    "NoIHNoYTI1NiAjQTdCQzIwRjU0QzQ1NEYyRUE1QjQ1NTU1QzExN0VDOEYzMjA1RjlEQkM4N0ZDMzc4M0M1NjBCREM5"
    "REZCQUI3QyMpCiAgKQogKHNpZy12YWwgCiAgKGVjZHNhIAogICAociAjQzhGRjZGMTMyNUFENzRBRjhDRDVDOTEzRE"
    "E2NThFMjM5QzJCOEQ1QjZGNzM5REM1ODdDMTVERDVCODA3RkQjKQogICAocyAjMENCMTA3NUI5NDI5MUNEODVFMDI5"
    "NDQ4N0YzMTk1QUI5RTI5ODE5ODBFQzg2RDc1NDZDMDYyRjQ1NTNBRjEzQiMpCiAgICkKICApCiAocHVibGljLWtleS"
    "AKICAoZWNjIAogICAoY3VydmUgRWQyNTUxOSkKICAgKHEgIzhEMTU2RjI5NUQyNEIwRDlBODZGQTU3NDFBODQwRkYy"
    "RDI0RjYwRjdCNkM0MTM0ODE0QUQ1NTYyNTk3MUIzOTQjKQogICApCiAgKQogKQo=\n",
]

UNSIGNED = (
    "StorePath: /gnu/store/0000000000000000000000000000000a-hello-2.12\n"
    "NarHash: sha256:1sg9f58l1jj88w6pdrfdpj5x9b1zrwszk84j81zvby36q9whhhqa\n"
    "NarSize: 1234\n"
    "References: 0000000000000000000000000000000b-glibc-2.35\n"
    "Deriver: 0000000000000000000000000000000c-hello-2.12.drv\n"
)


@pytest.fixture(scope="module")
def ci_guix() -> GuixPublicKey:
    key = parse_public_key(CI_GUIX_KEY)
    assert isinstance(key, GuixPublicKey)
    return key


@pytest.fixture(scope="module")
def guix_key() -> GuixSecretKey:
    key = parse_secret_key(generate_guix_key()[0])
    assert isinstance(key, GuixSecretKey)
    return key


@pytest.fixture(scope="module")
def nix_key() -> NixSecretKey:
    key = parse_secret_key(generate_nix_key("incstore-test-1")[0])
    assert isinstance(key, NixSecretKey)
    return key


# --- Guix narinfo signatures ------------------------------------------------------------------


@pytest.mark.parametrize("text", VECTORS, ids=["sed", "opensmtpd"])
def test_ci_guix_vectors_verify_under_the_ci_guix_key(text: str, ci_guix: GuixPublicKey) -> None:
    assert guix_verify_narinfo(text, [ci_guix]) == ci_guix
    # the embedded hash really is the signed text's sha256
    payload = base64.b64decode(text.rsplit(";", 1)[1])
    signed = text[: text.index("Signature:")].encode()
    assert hashlib.sha256(signed).hexdigest().upper().encode() in payload


@pytest.mark.parametrize("text", VECTORS, ids=["sed", "opensmtpd"])
def test_changing_any_byte_of_the_signed_lines_breaks_the_signature(
        text: str, ci_guix: GuixPublicKey) -> None:
    cut = text.index("Signature:")
    for i in range(cut):
        replacement = "x" if text[i] != "x" else "y"
        assert guix_verify_narinfo(text[:i] + replacement + text[i + 1 :], [ci_guix]) is None, i
        assert guix_verify_narinfo(text[:i] + text[i + 1 :], [ci_guix]) is None, i


@pytest.mark.parametrize("text", VECTORS, ids=["sed", "opensmtpd"])
def test_a_wrong_or_missing_key_fails(text: str, guix_key: GuixSecretKey,
                                      nix_key: NixSecretKey) -> None:
    assert guix_verify_narinfo(text, [guix_key.public_key]) is None
    assert guix_verify_narinfo(text, [nix_key.public_key]) is None
    assert guix_verify_narinfo(text, []) is None


def test_changing_the_signature_breaks_it(ci_guix: GuixPublicKey) -> None:
    text = VECTORS[0]
    payload = base64.b64decode(text.rsplit(";", 1)[1])
    s_value = re.search(rb"\(s #([0-9A-F]+)#\)", payload)
    assert s_value is not None
    for old, new in ((b"(s #0E86", b"(s #0E87"), (s_value.group(1), b"01"),
                     (b"sha256 #A4CF", b"sha256 #A4CE"), (b"(q #8D15", b"(q #8D16")):
        forged = base64.b64encode(payload.replace(old, new)).decode()
        assert guix_verify_narinfo(text.rsplit(";", 1)[0] + ";" + forged + "\n",
                                   [ci_guix]) is None


def test_the_signature_host_is_informative_only(ci_guix: GuixPublicKey) -> None:
    text = VECTORS[1].replace(";berlin.guixsd.org;", ";elsewhere;")
    assert guix_verify_narinfo(text, [ci_guix]) == ci_guix


def test_unsigned_narinfos_and_other_signature_versions(ci_guix: GuixPublicKey) -> None:
    assert guix_verify_narinfo(UNSIGNED, [ci_guix]) is None
    assert guix_verify_narinfo(VECTORS[0].replace("Signature: 1;", "Signature: 2;"),
                               [ci_guix]) is None
    assert guix_verify_narinfo(VECTORS[0].replace(";berlin.guixsd.org;", ";a;b;"),
                               [ci_guix]) is None


def test_sign_then_verify_round_trip(guix_key: GuixSecretKey) -> None:
    signed = guix_sign_narinfo(guix_key, UNSIGNED, host="ci.example.org")
    assert signed.startswith(UNSIGNED)
    assert signed.count("\n") == UNSIGNED.count("\n") + 1
    assert re.fullmatch(r"Signature: 1;ci\.example\.org;[A-Za-z0-9+/]+=*\n",
                        signed[len(UNSIGNED):])
    assert guix_verify_narinfo(signed, [guix_key.public_key]) == guix_key.public_key
    # RFC 6979: the same key and text always give the same signature
    assert guix_sign_narinfo(guix_key, UNSIGNED, host="ci.example.org") == signed
    # unsigned fields may follow the signature, as `guix publish` puts URL and FileSize there
    trailer = "URL: nar/zstd/x\nCompression: zstd\nFileSize: 9\n"
    assert guix_verify_narinfo(signed + trailer, [guix_key.public_key]) == guix_key.public_key


def test_a_narinfo_missing_references_in_its_signed_part_is_unsigned(
        guix_key: GuixSecretKey) -> None:
    without_refs = "".join(line for line in UNSIGNED.splitlines(keepends=True)
                           if not line.startswith("References:"))
    with pytest.raises(SignatureError):
        guix_sign_narinfo(guix_key, without_refs)
    # a mathematically valid signature over that text (the detached form carries the same
    # s-expression), with References moved after it where it is not signed
    payload = sign_bytes(guix_key, without_refs.encode()).split()[1]
    refs = "References: 0000000000000000000000000000000b-glibc-2.35\n"
    narinfo = f"{without_refs}Signature: 1;h;{payload}\n{refs}"
    assert guix_verify_narinfo(narinfo, [guix_key.public_key]) is None
    for field in ("StorePath", "NarHash"):
        text = "".join(line for line in UNSIGNED.splitlines(keepends=True)
                       if not line.startswith(field + ":"))
        payload = sign_bytes(guix_key, text.encode()).split()[1]
        assert guix_verify_narinfo(f"{text}Signature: 1;h;{payload}\n",
                                   [guix_key.public_key]) is None
    # the control: the same construction with every field signed verifies
    payload = sign_bytes(guix_key, UNSIGNED.encode()).split()[1]
    assert guix_verify_narinfo(f"{UNSIGNED}Signature: 1;h;{payload}\n",
                               [guix_key.public_key]) == guix_key.public_key


def test_guix_record_rules(guix_key: GuixSecretKey) -> None:
    signed = guix_sign_narinfo(guix_key, UNSIGNED)
    trusted = [guix_key.public_key]
    # a blank line ends the record: a signature after it is not seen
    fields, signature = signed.rsplit("Signature:", 1)
    assert guix_verify_narinfo(f"{fields}\nSignature:{signature}", trusted) is None
    # a second, bogus Signature field after the first one does not matter
    assert guix_verify_narinfo(signed + "Signature: 1;x;AAAA\n", trusted) == guix_key.public_key
    # a line Guix's reader refuses makes the whole narinfo unreadable
    assert guix_verify_narinfo(signed + " indented\n", trusted) is None
    # comments are skipped, but they are part of the signed text
    commented = guix_sign_narinfo(guix_key, "# made by a test\n" + UNSIGNED)
    assert guix_verify_narinfo(commented, trusted) == guix_key.public_key
    for bad in (UNSIGNED + "Signature: 1;h;x\n", UNSIGNED.rstrip("\n")):
        with pytest.raises(SignatureError):
            guix_sign_narinfo(guix_key, bad)
    with pytest.raises(SignatureError):
        guix_sign_narinfo(guix_key, UNSIGNED, host="a;b")


def test_importing_the_module_does_not_import_cryptography() -> None:
    code = "import sys, incstore.signature; sys.exit('cryptography' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- Guix keys --------------------------------------------------------------------------------


def test_guix_keys_look_like_guix_archive_generate_key() -> None:
    secret, public = generate_guix_key()
    assert re.fullmatch(r"\(public-key \n \(ecc \n  \(curve Ed25519\)\n  \(q (#[0-9A-F]{64}#"
                        r'|"(?:[^"\\]|\\.)*")\)\n  \)\n \)\n', public, re.S), public
    assert secret.startswith("(private-key \n (ecc \n  (curve Ed25519)\n  (q ")
    sk = parse_secret_key(secret)
    assert isinstance(sk, GuixSecretKey)
    # libgcrypt's Ed25519 secrets: bit 254 set, bit 255 and the three low bits clear
    assert sk.d >> 254 == 1 and sk.d & 7 == 0
    assert parse_public_key(public) == sk.public_key
    assert sk.render() == secret and sk.public_key.render() == public
    assert str(sk.d) not in repr(sk) and f"{sk.d:X}" not in repr(sk)


def test_guix_keys_in_canonical_form_parse(guix_key: GuixSecretKey) -> None:
    q = guix_key.q
    d = guix_key.d.to_bytes(32, "big")
    canonical_pub = b"(10:public-key(3:ecc(5:curve7:Ed25519)(1:q32:" + q + b")))"
    canonical_sec = (b"(11:private-key(3:ecc(5:curve7:Ed25519)(1:q32:" + q
                     + b")(1:d32:" + d + b")))")
    assert parse_public_key(canonical_pub) == guix_key.public_key
    assert parse_public_key(canonical_pub.decode("latin-1")) == guix_key.public_key
    assert parse_secret_key(canonical_sec) == guix_key
    # length-prefixed hex and quoted atoms, and whitespace inside hex, are libgcrypt syntax too
    spaced = " ".join(q.hex()[i : i + 8] for i in range(0, 64, 8))
    assert parse_public_key(f'(public-key(ecc(curve "Ed25519")(q 32#{spaced}#)))') \
        == guix_key.public_key


def quoted_string_q() -> bytes:
    """A curve point whose encoding libgcrypt prints as a quoted Latin-1 string."""
    allowed = [b for b in range(0x20, 0x100) if not 0x7F <= b <= 0xA0 and b not in b'"\\']
    rng = random.Random(7)
    while True:
        q = bytes([rng.choice([b for b in allowed if b < 0x80])]
                  + [rng.choice([b for b in allowed if b >= 0xA1]) for _ in range(31)])
        if sig._decode_point(q) is not None:
            return q


def test_keys_printed_as_latin1_strings_survive_guiles_utf8_files() -> None:
    q = quoted_string_q()
    key = GuixPublicKey(q)
    text = key.render()
    assert f'(q "{q.decode("latin-1")}")' in text  # what libgcrypt prints for such an atom
    # Guile writes that string to the file as UTF-8 and reads it back the same way
    assert parse_public_key(text.encode("utf-8")) == key
    assert parse_public_key(text) == key
    assert parse_public_key(text.encode("latin-1")) == key  # a Latin-1 locale's file


@pytest.mark.parametrize("text", [
    "", "(", ")", "()", "(public-key)", "(public-key (ecc (curve Ed25519)))",
    "(public-key (ecc (curve Ed448) (q #00#)))",
    "(public-key (rsa (n #00C0FFEE#) (e #010001#)))",
    f"(public-key (ecc (curve Ed25519) (q #{CI_GUIX_Q[:-2]}#)))",
    f"(public-key (ecc (curve Ed25519) (q #{CI_GUIX_Q}#) (flags eddsa)))",
    f"(public-key (ecc (curve Ed25519) (q #{CI_GUIX_Q}#)))(extra)",
    f"(public-key (ecc (curve Ed25519) (q #{CI_GUIX_Q}#))) ; comment",
    "(public-key (ecc (curve Ed25519) (q #" + "FF" * 32 + "#)))",  # y >= p
    "(public-key (ecc (curve Ed25519) (q |bm90IGEga2V5|)))",
    '(public-key (ecc (curve Ed25519) (q "\\q")))',
    "(a 99:short)", "(a #ABC#)", "(a 1x)",
])
def test_malformed_guix_public_keys_raise_key_file_error(text: str) -> None:
    with pytest.raises(KeyFileError):
        parse_public_key(text)


def test_guix_secret_scalars_out_of_range_are_refused(guix_key: GuixSecretKey) -> None:
    q = f"#{guix_key.q.hex().upper()}#"
    for d in ("#00#", "#01" + "00" * 32 + "#", f"#{sig._N:X}#"):
        with pytest.raises(KeyFileError):
            parse_secret_key(f"(private-key (ecc (curve Ed25519) (q {q}) (d {d})))")


def test_a_guix_secret_key_whose_q_is_not_d_g_is_refused(guix_key: GuixSecretKey) -> None:
    other = parse_secret_key(generate_guix_key()[0])
    assert isinstance(other, GuixSecretKey)
    mixed = GuixSecretKey(guix_key.d, other.q).render()
    with pytest.raises(KeyFileError, match="not d·G"):
        parse_secret_key(mixed)


# --- ACLs -------------------------------------------------------------------------------------

GUIX_ACL = (  # as Guix's write-acl lays it out, with an RSA key Guix allows but we cannot use
    "(acl \n (entry \n  (public-key \n   (ecc \n    (curve Ed25519)\n"
    f"    (q #{CI_GUIX_Q}#)\n    )\n   )\n  (tag \n   (guix import)\n   )\n  )\n"
    " (entry \n  (public-key \n   (rsa \n    (n #00C0FFEE#)\n    (e #010001#)\n    )\n   )\n"
    "  (tag \n   (guix import)\n   )\n  )\n )\n"
)


def test_guix_acl(ci_guix: GuixPublicKey, guix_key: GuixSecretKey) -> None:
    assert parse_guix_acl(GUIX_ACL) == [ci_guix]
    assert parse_guix_acl("(acl)") == []
    ours = guix_key.public_key.render()
    acl = f"(acl (entry {CI_GUIX_KEY} (tag (guix import))) (entry {ours} (tag (guix import)))" \
          f"(entry {ours} (tag (guix import))))"
    assert parse_guix_acl(acl) == [ci_guix, guix_key.public_key]
    canonical = (b"(3:acl(5:entry(10:public-key(3:ecc(5:curve7:Ed25519)(1:q32:"
                 + bytes.fromhex(CI_GUIX_Q) + b")))(3:tag(4:guix6:import))))")
    assert parse_guix_acl(canonical) == [ci_guix]
    # the ACL's keys are what a narinfo is checked against
    assert guix_verify_narinfo(VECTORS[0], parse_guix_acl(GUIX_ACL)) == ci_guix


@pytest.mark.parametrize("text", [
    "", "(acl", "(not-acl)", "acl",
    f"(acl (entry {CI_GUIX_KEY} (tag (guix export))))",
    f"(acl (entry {CI_GUIX_KEY}))",
    f"(acl {CI_GUIX_KEY})",
    f";; authorized keys\n(acl (entry {CI_GUIX_KEY} (tag (guix import))))",
])
def test_acls_guix_would_refuse_are_refused(text: str) -> None:
    with pytest.raises(KeyFileError):
        parse_guix_acl(text)


# --- Nix keys and nix.conf --------------------------------------------------------------------


def test_nix_key_round_trip() -> None:
    secret, public = generate_nix_key("cache.example.org-1")
    sk = parse_secret_key(secret)
    pk = parse_public_key(public)
    assert isinstance(sk, NixSecretKey) and isinstance(pk, NixPublicKey)
    assert sk.public_key == pk and pk.name == "cache.example.org-1"
    assert sk.render() == secret and pk.render() == public
    assert len(base64.b64decode(secret.split(":")[1])) == 64
    assert len(base64.b64decode(public.split(":")[1])) == 32
    assert parse_public_key(public + "\n") == pk  # a key file's trailing newline
    assert secret.split(":")[1] not in repr(sk)


@pytest.mark.parametrize("text", [
    "", "name", ":AAAA", "name:", "name:not base64!", "na me:" + "A" * 44,
    "name:" + base64.b64encode(bytes(31)).decode(),
])
def test_malformed_nix_public_keys_raise_key_file_error(text: str) -> None:
    with pytest.raises(KeyFileError):
        parse_public_key(text)


def test_a_nix_secret_key_with_a_foreign_public_half_is_refused() -> None:
    a = parse_secret_key(generate_nix_key("a")[0])
    b = parse_secret_key(generate_nix_key("a")[0])
    assert isinstance(a, NixSecretKey) and isinstance(b, NixSecretKey)
    with pytest.raises(KeyFileError, match="does not match"):
        parse_secret_key(NixSecretKey("a", a.seed, b.public).render())
    with pytest.raises(KeyFileError):
        parse_secret_key(b.public_key.render())  # a public key is not a secret key


def test_nix_conf_keys() -> None:
    k1, k2, k3, k4 = (parse_public_key(generate_nix_key(f"k{i}")[1]) for i in range(1, 5))
    assert all(isinstance(k, NixPublicKey) for k in (k1, k2, k3, k4))
    conf = (
        "# nix.conf\n"
        f"trusted-public-keys = {k1.render()}  # the old key\n"
        "substituters = https://cache.example.org\n"
        f"trusted-public-keys = {k2.render()} {k3.render()}\n"
        f"extra-trusted-public-keys = {k4.render()}\n"
        f"  extra-trusted-public-keys   =   {k2.render()}\n"
        "require-sigs = true\n"
        f"#trusted-public-keys = {k1.render()}\n"
        "include /etc/nix/other.conf\n"
        f"trusted-public-keys={k1.render()}\n"  # Nix refuses this line: no spaces around '='
    )
    assert parse_nix_conf_keys(conf) == [k2, k3, k4]
    # the plain setting replaces what came before, extras included; the old alias counts
    assert parse_nix_conf_keys(conf + f"binary-cache-public-keys = {k1.render()}\n") == [k1]
    assert parse_nix_conf_keys(conf + "trusted-public-keys =\n") == []
    assert parse_nix_conf_keys("", initial=[k1]) == [k1]
    assert parse_nix_conf_keys(f"extra-trusted-public-keys = {k2.render()}",
                               initial=[k1]) == [k1, k2]
    with pytest.raises(KeyFileError, match="trusted-public-keys"):
        parse_nix_conf_keys("trusted-public-keys = not-a-key\n")


def test_read_secret_key_wants_a_private_file(tmp_path: Path) -> None:
    secret, _ = generate_nix_key("k")
    path = tmp_path / "key.sec"
    path.write_text(secret)
    for mode in (0o644, 0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(KeyFileError, match="not private enough"):
            read_secret_key(path)
    for mode in (0o600, 0o400):
        path.chmod(mode)
        assert read_secret_key(path) == parse_secret_key(secret)
    with pytest.raises(KeyFileError, match="cannot open"):
        read_secret_key(tmp_path / "missing")
    with pytest.raises(KeyFileError, match="not a regular file"):
        read_secret_key(tmp_path)
    path.chmod(0o600)
    path.write_text("garbage")
    with pytest.raises(KeyFileError) as raised:
        read_secret_key(path)
    assert str(path) in str(raised.value)


# --- Nix signatures ---------------------------------------------------------------------------


def test_nix_fingerprint() -> None:
    digest = hashlib.sha256(b"nar").digest()
    path = "/nix/store/7n1ws9k3ymgds1rdz3k0la0m3k4qpmz7-b"
    refs = ["/nix/store/vmg5na96ajnh1v932j9jdzfc3022vbh9-a", path,
            "/nix/store/0ak7i2w9m2y2cm5svm2qxlkbd0zsg9zq-c", path]
    fingerprint = nix_fingerprint(path, "sha256:" + digest.hex(), 168, refs)
    assert fingerprint == (
        f"1;{path};sha256:{sig.nix32_encode(digest)};168;"
        f"/nix/store/0ak7i2w9m2y2cm5svm2qxlkbd0zsg9zq-c,{path},"
        "/nix/store/vmg5na96ajnh1v932j9jdzfc3022vbh9-a").encode()
    assert nix_fingerprint(path, "sha256:" + sig.nix32_encode(digest), 168, refs) == fingerprint
    assert nix_fingerprint(path, "sha256:" + digest.hex(), 1, []).endswith(b";1;")
    for bad_hash, size in (("sha256:" + digest.hex(), 0), ("md5:00", 1),
                           ("sha256:" + digest.hex().upper(), 1), (digest.hex(), 1)):
        with pytest.raises(SignatureError):
            nix_fingerprint(path, bad_hash, size, [])


def test_nix_sign_and_verify(nix_key: NixSecretKey) -> None:
    fingerprint = nix_fingerprint("/nix/store/7n1ws9k3ymgds1rdz3k0la0m3k4qpmz7-b",
                                  "sha256:" + "ab" * 32, 100, [])
    signature = nix_sign(nix_key, fingerprint)
    assert signature.startswith("incstore-test-1:")
    trusted = [parse_public_key(generate_nix_key("incstore-test-1")[1]), nix_key.public_key]
    assert nix_verify(signature, fingerprint, trusted) == "incstore-test-1"
    assert nix_verify(signature, fingerprint.replace(b";100;", b";101;"), trusted) is None
    assert nix_verify(signature, fingerprint, trusted[:1]) is None  # same name, other key
    renamed = NixPublicKey("other", nix_key.public)
    assert nix_verify(signature, fingerprint, [renamed]) is None  # Nix finds keys by name
    for bad in ("", "incstore-test-1", "incstore-test-1:", "incstore-test-1:AAAA",
                ":" + signature.split(":")[1], signature + "x", "x" * 100_000):
        assert nix_verify(bad, fingerprint, trusted) is None


# --- detached signatures ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nix", "guix"])
def test_detached_signatures(kind: str, nix_key: NixSecretKey, guix_key: GuixSecretKey) -> None:
    secret = nix_key if kind == "nix" else guix_key
    data = b'{"format": "incstore-manifest", "items": []}\n'
    line = sign_bytes(secret, data)
    assert "\n" not in line
    assert line.split(" ", 1)[0] == ("ed25519" if kind == "nix" else "guix-ecdsa")
    assert verify_bytes(line, data, [secret.public_key]) == secret.public_key
    assert verify_bytes(line + "\n", data, [secret.public_key]) == secret.public_key
    for i in range(len(data)):
        changed = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
        assert verify_bytes(line, changed, [secret.public_key]) is None
    assert verify_bytes(line, data + b" ", [secret.public_key]) is None
    untrusted = parse_secret_key(
        generate_nix_key("incstore-test-1")[0] if kind == "nix" else generate_guix_key()[0])
    assert verify_bytes(sign_bytes(untrusted, data), data, [secret.public_key]) is None
    assert verify_bytes(line, data, [untrusted.public_key]) is None
    assert verify_bytes(line, data, []) is None


def test_detached_signature_lines_that_are_garbage(nix_key: NixSecretKey,
                                                   guix_key: GuixSecretKey) -> None:
    data = b"manifest"
    trusted = [nix_key.public_key, guix_key.public_key]
    good_guix = sign_bytes(guix_key, data)
    for line in ("", "ed25519", "guix-ecdsa", "rsa abc", "guix-ecdsa !!!!",
                 "guix-ecdsa " + base64.b64encode(b"(signature)").decode(),
                 "guix-ecdsa " + base64.b64encode(b"\xff\xfe").decode(),
                 good_guix.replace("guix-ecdsa", "ed25519"),
                 sign_bytes(nix_key, data).replace("ed25519", "guix-ecdsa")):
        assert verify_bytes(line, data, trusted) is None


# --- libgcrypt, the library Guix signs and verifies with --------------------------------------


class Gcrypt:
    """The few libgcrypt calls Guix makes (through guile-gcrypt), through ctypes."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("gcrypt") or "libgcrypt.so.20"
        lib = ctypes.CDLL(name)
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        lib.gcry_check_version.restype = ctypes.c_char_p
        lib.gcry_check_version.argtypes = [ctypes.c_char_p]
        lib.gcry_sexp_new.argtypes = [ctypes.POINTER(vp), ctypes.c_char_p, sz, ctypes.c_int]
        lib.gcry_sexp_sprint.restype = sz
        lib.gcry_sexp_sprint.argtypes = [vp, ctypes.c_int, ctypes.POINTER(ctypes.c_char), sz]
        lib.gcry_sexp_find_token.restype = vp
        lib.gcry_sexp_find_token.argtypes = [vp, ctypes.c_char_p, sz]
        lib.gcry_sexp_release.argtypes = [vp]
        lib.gcry_pk_sign.argtypes = [ctypes.POINTER(vp), vp, vp]
        lib.gcry_pk_verify.argtypes = [vp, vp, vp]
        lib.gcry_pk_genkey.argtypes = [ctypes.POINTER(vp), vp]
        lib.gcry_check_version(None)
        self.lib = lib
        self.owned: list[int] = []

    def sexp(self, data: bytes) -> int:
        handle = ctypes.c_void_p()
        assert self.lib.gcry_sexp_new(ctypes.byref(handle), data, len(data), 1) == 0, data
        return self.own(handle.value)

    def own(self, handle: int | None) -> int:
        assert handle
        self.owned.append(handle)
        return handle

    def sprint(self, handle: int, mode: int = 3) -> bytes:  # 3: advanced, 1: canonical
        size = self.lib.gcry_sexp_sprint(handle, mode, None, 0)
        buf = ctypes.create_string_buffer(size)
        written = self.lib.gcry_sexp_sprint(handle, mode, buf, size)
        return buf.raw[:written]

    def find(self, handle: int, token: bytes) -> int:
        return self.own(self.lib.gcry_sexp_find_token(handle, token, 0))

    def sign(self, data: int, secret: int) -> int:
        out = ctypes.c_void_p()
        assert self.lib.gcry_pk_sign(ctypes.byref(out), data, secret) == 0
        return self.own(out.value)

    def verify(self, signature_sexp: bytes) -> bool:
        whole = self.sexp(signature_sexp)
        return self.lib.gcry_pk_verify(self.find(whole, b"sig-val"), self.find(whole, b"data"),
                                       self.find(whole, b"public-key")) == 0

    def genkey(self) -> int:
        out = ctypes.c_void_p()
        params = self.sexp(b"(genkey (ecdsa (curve Ed25519) (flags rfc6979)))")
        assert self.lib.gcry_pk_genkey(ctypes.byref(out), params) == 0
        return self.own(out.value)

    def release(self) -> None:
        for handle in self.owned:
            self.lib.gcry_sexp_release(handle)
        self.owned.clear()


@pytest.fixture(scope="module")
def gcrypt() -> Iterator[Gcrypt]:
    try:
        lib = Gcrypt()
    except OSError:
        if IN_CI:
            pytest.fail("libgcrypt is not installed: .ci/run must install it")
        pytest.skip("libgcrypt is not installed")
    yield lib
    lib.release()


def payload_sexp(line: str) -> bytes:
    """The s-expression bytes libgcrypt reads from a detached or narinfo signature payload."""
    return base64.b64decode(line.split()[-1].rsplit(";", 1)[-1]).decode().encode("latin-1")


def test_libgcrypt_accepts_our_signatures(gcrypt: Gcrypt, guix_key: GuixSecretKey) -> None:
    signed = guix_sign_narinfo(guix_key, UNSIGNED)
    assert gcrypt.verify(payload_sexp(signed.splitlines()[-1]))
    for i in range(20):
        data = os.urandom(i * 7)
        assert gcrypt.verify(payload_sexp(sign_bytes(guix_key, data)))
    # and refuses them when the signed hash is changed
    tampered = payload_sexp(sign_bytes(guix_key, b"x")).replace(
        hashlib.sha256(b"x").hexdigest().upper().encode(),
        hashlib.sha256(b"y").hexdigest().upper().encode())
    assert not gcrypt.verify(tampered)
    gcrypt.release()


def test_libgcrypt_accepts_the_ci_guix_vectors(gcrypt: Gcrypt) -> None:
    for text in VECTORS:
        assert gcrypt.verify(payload_sexp(text.splitlines()[-1]))
    gcrypt.release()


def test_our_signatures_are_byte_identical_to_libgcrypts(gcrypt: Gcrypt) -> None:
    """Guix's signature-sexp: (signature DATA (gcry_pk_sign DATA KEY) PUBLIC-KEY), printed by
    gcry_sexp_sprint. Keys both from libgcrypt's genkey and from ours."""
    rng = random.Random(3)
    for i in range(60):
        if i % 3 == 0:
            pair = gcrypt.genkey()
            secret_text = gcrypt.sprint(gcrypt.find(pair, b"private-key"))
        elif i % 3 == 1:
            secret_text = generate_guix_key()[0].encode("latin-1")
        else:  # a secret below the group order, short enough to print in 31 bytes or fewer
            d = rng.randrange(1, 1 << rng.choice((200, 247, 248, 252)))
            secret_text = GuixSecretKey(d, sig._encode_point(sig._mul(d, sig._BASE))).render() \
                .encode("latin-1")
        secret = parse_secret_key(secret_text)
        assert isinstance(secret, GuixSecretKey)
        data = os.urandom(32)
        data_sexp = gcrypt.sexp(b"(data (flags rfc6979) (hash sha256 #"
                                + hashlib.sha256(data).hexdigest().encode() + b"#))")
        their_sig = gcrypt.sign(data_sexp, gcrypt.sexp(secret_text))
        public = gcrypt.sexp(secret.public_key.render().encode("latin-1"))
        theirs = gcrypt.sprint(gcrypt.sexp(b"(signature " + gcrypt.sprint(data_sexp)
                                           + gcrypt.sprint(their_sig)
                                           + gcrypt.sprint(public) + b")"))
        assert payload_sexp(sign_bytes(secret, data)) == theirs
        gcrypt.release()


def sexp_trees() -> st.SearchStrategy[list[object]]:
    atoms = st.one_of(st.binary(max_size=12), st.sampled_from(
        [b"sha256", b"Ed25519", b"1abc", b"a b", b"t\xe9t", b"\xe9t", b"\x00x", b"\x80x",
         b"'\"\\\n\t", b"\xa0", b"\xa1", b"-./_:*+=", b"1:x", b"a\0b", b"a\0 "]))
    return st.recursive(st.lists(atoms, min_size=1, max_size=4),
                        lambda inner: st.lists(st.one_of(atoms, inner), min_size=1, max_size=4),
                        max_leaves=12)


def canonical(tree: object) -> bytes:
    if isinstance(tree, bytes):  # libgcrypt refuses "0:", the empty atom is written ""
        return str(len(tree)).encode() + b":" + tree if tree else b'""'
    assert isinstance(tree, list)
    return b"(" + b"".join(canonical(x) for x in tree) + b")"


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(tree=sexp_trees())
def test_sexp_layout_and_reader_agree_with_libgcrypt(gcrypt: Gcrypt, tree: list[object]) -> None:
    handle = gcrypt.sexp(canonical(tree))
    advanced = gcrypt.sprint(handle)
    assert sig._render_advanced(tree) == advanced  # type: ignore[arg-type]
    if b"\0" not in advanced:  # libgcrypt prints an inner NUL raw in a token, unreadable
        assert sig._parse_sexp(advanced) == tree
    assert sig._parse_sexp(gcrypt.sprint(handle, 1)) == tree
    gcrypt.release()


# --- the real Nix -----------------------------------------------------------------------------

NIX = ["nix", "--extra-experimental-features", "nix-command"]


def run_nix(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env,
                          check=False)


@pytest.fixture
def nix_env(tmp_path: Path) -> dict[str, str]:
    """No nix.conf of the machine's: every setting comes from the command line."""
    (tmp_path / "nix-conf").mkdir()
    return {**os.environ, "NIX_CONF_DIR": str(tmp_path / "nix-conf"),
            "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)}


def nix_items(env: dict[str, str], root: Path) -> str:
    """A chroot Nix store holding b, which references a; returns b's path."""
    expr = 'let a = builtins.toFile "a" "hello"; in builtins.toFile "b" "refers to ${a}"'
    p = run_nix(env, "nix-instantiate", "--store", root, "--eval", "--read-write-mode", "-E", expr)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().strip('"')


def db_rows(root: Path) -> dict[str, tuple[str, int, list[str], str]]:
    """path -> (hash, narSize, references, sigs) from a chroot store's DB."""
    con = sqlite3.connect(root / "nix/var/nix/db/db.sqlite")
    try:
        rows = {}
        for ident, path, digest, size, sigs in con.execute(
                "select id, path, hash, narSize, sigs from ValidPaths"):
            refs = [r for (r,) in con.execute(
                "select v.path from Refs join ValidPaths v on v.id = Refs.reference "
                "where Refs.referrer = ?", (ident,))]
            rows[path] = (digest, size, refs, sigs or "")
        return rows
    finally:
        con.close()


def sign_binary_cache(cache: Path, rows: dict[str, tuple[str, int, list[str], str]],
                      secret: NixSecretKey) -> None:
    """Add our `Sig:` to each narinfo, and drop `CA:` so that Nix must check it (Nix trusts
    content-addressed items without a signature)."""
    for narinfo in cache.glob("*.narinfo"):
        text = narinfo.read_text()
        path = re.search(r"^StorePath: (.*)$", text, re.M).group(1)  # type: ignore[union-attr]
        digest, size, refs, _ = rows[path]
        signature = nix_sign(secret, nix_fingerprint(path, digest, size, refs))
        narinfo.write_text(re.sub(r"^CA: .*\n", "", text, flags=re.M) + f"Sig: {signature}\n")


@needs_nix
def test_nix_accepts_our_signatures_made_with_a_nix_store_key(tmp_path: Path,
                                                              nix_env: dict[str, str]) -> None:
    sec, pub = tmp_path / "key.sec", tmp_path / "key.pub"
    p = run_nix(nix_env, "nix-store", "--generate-binary-cache-key", "interop-1", sec, pub)
    assert p.returncode == 0, p.stderr
    secret = read_secret_key(sec)  # nix-store writes it 0600
    assert isinstance(secret, NixSecretKey)
    assert parse_public_key(pub.read_text()) == secret.public_key
    src, cache = tmp_path / "src", tmp_path / "cache"
    item = nix_items(nix_env, src)
    p = run_nix(nix_env, *NIX, "copy", "--store", src, "--to", f"file://{cache}", item)
    assert p.returncode == 0, p.stderr
    sign_binary_cache(cache, db_rows(src), secret)

    def copy(dst: Path, trusted: str) -> subprocess.CompletedProcess[str]:
        return run_nix(nix_env, *NIX, "copy", "--from", f"file://{cache}", "--to", dst,
                       "--option", "substituters", "", "--option", "require-sigs", "true",
                       "--option", "trusted-public-keys", trusted, item)

    other = generate_nix_key("interop-1")[1]  # same name, different key
    refused = copy(tmp_path / "dst-refused", other)
    assert refused.returncode != 0 and "lacks a valid signature" in refused.stderr
    accepted = copy(tmp_path / "dst", pub.read_text())
    assert accepted.returncode == 0, accepted.stderr
    copied = db_rows(tmp_path / "dst")
    assert len(copied) == 2
    for path, (_, _, _, sigs) in copied.items():
        digest, size, refs, _ = db_rows(src)[path]
        assert sigs == nix_sign(secret, nix_fingerprint(path, digest, size, refs))
        assert nix_verify(sigs, nix_fingerprint(path, digest, size, refs),
                          [secret.public_key]) == "interop-1"


@needs_nix
def test_nix_store_sign_with_our_key_file_equals_our_signature(
        tmp_path: Path, nix_env: dict[str, str]) -> None:
    secret_text, public_text = generate_nix_key("ours-1")
    key_file = tmp_path / "ours.sec"
    key_file.write_text(secret_text)
    key_file.chmod(0o600)
    secret = read_secret_key(key_file)
    assert isinstance(secret, NixSecretKey)
    root = tmp_path / "store"
    item = nix_items(nix_env, root)
    p = run_nix(nix_env, *NIX, "store", "sign", "--store", root, "--key-file", key_file,
                "--recursive", item)
    assert p.returncode == 0, p.stderr
    rows = db_rows(root)
    assert len(rows) == 2
    for path, (digest, size, refs, sigs) in rows.items():
        fingerprint = nix_fingerprint(path, digest, size, refs)
        assert sigs == nix_sign(secret, fingerprint)
        assert nix_verify(sigs, fingerprint, [parse_public_key(public_text)]) == "ours-1"
    # and Nix's own verifier counts it, once the items are not content-addressed
    con = sqlite3.connect(root / "nix/var/nix/db/db.sqlite")
    con.execute("update ValidPaths set ca = null, ultimate = null")
    con.commit()
    con.close()

    def verify(trusted: str) -> subprocess.CompletedProcess[str]:
        return run_nix(nix_env, *NIX, "store", "verify", "--store", root, "--no-contents",
                       "--sigs-needed", "1", "--option", "trusted-public-keys", trusted,
                       "--recursive", item)

    assert verify(public_text).returncode == 0, verify(public_text).stderr
    assert verify(generate_nix_key("ours-1")[1]).returncode != 0


# --- Guix's narinfo cache ---------------------------------------------------------------------

# Written by Guile 3.0.8's `write` in a UTF-8 locale, as cache-narinfo! does.
CACHE_ENTRY = (
    '(narinfo (version 2) (cache-uri "https://ci.guix.gnu.org") (date 1796101994) (ttl 129600)'
    ' (value "StorePath: a\\nB: \\"q\\" \\\\ \u00e9 \u2603\\t\\x01\\x7f\\xa0\\x85\\r\\nend\\n"))'
)
CACHE_VALUE = 'StorePath: a\nB: "q" \\ \u00e9 \u2603\t\x01\x7f\xa0\x85\r\nend\n'
CACHE_DATE = 1796101994 - 37  # the entry's date is TAI, 37 s ahead of Unix time


def test_substitute_cache_dirname_is_rfc4648_base32_of_the_urls_sha256() -> None:
    url = "https://ci.guix.gnu.org"
    name = substitute_cache_dirname(url)
    bits = "".join(f"{b:08b}" for b in hashlib.sha256(url.encode()).digest()) + "0000"
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    assert name == "".join(alphabet[int(bits[i : i + 5], 2)] for i in range(0, 256, 5))
    assert len(name) == 52
    assert substitute_cache_dirname(url + "/") != name  # the URL is taken as configured


def test_substitute_cache_entries() -> None:
    assert read_substitute_cache_entry(CACHE_ENTRY, now=CACHE_DATE) == CACHE_VALUE
    assert read_substitute_cache_entry(CACHE_ENTRY.encode(), now=CACHE_DATE + 129600) \
        == CACHE_VALUE
    assert read_substitute_cache_entry(CACHE_ENTRY, now=CACHE_DATE + 129601) is None  # expired
    negative = '(narinfo (version 2) (cache-uri "https://x") (date 1796101994) (ttl 120)' \
               ' (value #f))'
    assert read_substitute_cache_entry(negative, now=CACHE_DATE) is None
    for other in (CACHE_ENTRY.replace("(version 2)", "(version 3)"),
                  CACHE_ENTRY.replace("(version 2) ", ""),
                  CACHE_ENTRY.replace("(ttl 129600)", "(ttl #t)"),
                  CACHE_ENTRY.replace("narinfo", "narinfo2", 1),
                  CACHE_ENTRY[:-1], CACHE_ENTRY + ")", CACHE_ENTRY + "(x)", "", "#f",
                  CACHE_ENTRY.replace("\\t", "\\q"), CACHE_ENTRY.replace("\\x01", "\\x1"),
                  CACHE_ENTRY.encode("latin-1", "replace") + b"\xff"):
        assert read_substitute_cache_entry(other, now=CACHE_DATE) is None


def test_a_cached_narinfo_still_verifies(ci_guix: GuixPublicKey) -> None:
    escaped = VECTORS[0].replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    entry = (f'(narinfo (version 2) (cache-uri "https://ci.guix.gnu.org") (date {10**10})'
             f' (ttl 129600) (value "{escaped}"))')
    text = read_substitute_cache_entry(entry, now=10**10)
    assert text == VECTORS[0]
    assert guix_verify_narinfo(text, [ci_guix]) == ci_guix


@needs(shutil.which("guile"), "guile not installed")
@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
def test_entries_written_by_guile_read_back(tmp_path: Path, locale: str) -> None:
    """Guile's own writer, used the way cache-narinfo! uses it, in both kinds of locale."""
    script = tmp_path / "write.scm"
    script.write_text(
        "(use-modules (srfi srfi-19) (ice-9 textual-ports))\n"
        '(setlocale LC_ALL "")\n'
        "(define text (call-with-input-file (cadr (command-line)) get-string-all\n"
        '  #:encoding "UTF-8"))\n'
        "(write `(narinfo (version 2) (cache-uri \"https://ci.guix.gnu.org\")\n"
        "                 (date ,(time-second (current-time time-monotonic)))\n"
        "                 (ttl 129600) (value ,text)))\n"
    )
    narinfo = VECTORS[1] + 'X-Odd: "quotes" \\ tab\t bell\x07 \u00e9 \u2603 \x7f\r\n'
    (tmp_path / "narinfo").write_text(narinfo, encoding="utf-8")
    env = {**os.environ, "LC_ALL": locale, "GUILE_AUTO_COMPILE": "0"}
    p = subprocess.run(["guile", "--no-auto-compile", "-s", str(script),
                        str(tmp_path / "narinfo")], capture_output=True, env=env, check=False)
    assert p.returncode == 0, p.stderr
    assert read_substitute_cache_entry(p.stdout) == narinfo
    assert read_substitute_cache_entry(p.stdout, now=time.time() + 36 * 3600 + 60) is None


# --- hostile input ----------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.one_of(
    st.binary(max_size=300),
    st.text(alphabet='()#"|[]{}:;\\ \n0123456789abcdefqdAF-', max_size=300).map(str.encode),
    st.tuples(st.sampled_from([CI_GUIX_KEY.encode(), GUIX_ACL.encode()]),
              st.integers(0, 400), st.binary(min_size=0, max_size=4),
              st.integers(0, 3)).map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + t[3] :]),
))
def test_key_and_acl_parsers_only_raise_key_file_error(data: bytes) -> None:
    for parse in (parse_public_key, parse_secret_key, parse_guix_acl):
        try:
            parse(data)  # type: ignore[operator]
        except KeyFileError as e:
            assert "\n" not in str(e)
    with contextlib.suppress(KeyFileError):
        parse_nix_conf_keys(data.decode("latin-1"))


def mutate(text: str, at: int, insert: str, delete: int) -> str:
    at %= len(text) + 1
    return text[:at] + insert + text[at + delete :]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(base=st.sampled_from(VECTORS), at=st.integers(0, 2000),
       insert=st.text(alphabet="SignatureRefs:;1\n =+/#()xA\\\"", max_size=12),
       delete=st.integers(0, 8))
def test_narinfo_signature_parser_never_raises(base: str, at: int, insert: str, delete: int,
                                               ci_guix: GuixPublicKey) -> None:
    text = mutate(base, at, insert, delete)
    result = guix_verify_narinfo(text, [ci_guix])
    if result is not None:  # only changes after the signed part can leave it valid
        assert text[: text.index("Signature:")] == base[: base.index("Signature:")]
    line = "guix-ecdsa " + text.rsplit(";", 1)[-1]
    assert verify_bytes(line, b"data", [ci_guix]) is None
    entry = read_substitute_cache_entry(mutate(CACHE_ENTRY, at, insert, delete), now=CACHE_DATE)
    assert entry is None or isinstance(entry, str)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=st.binary(max_size=400))
def test_signature_payloads_never_raise(payload: bytes, ci_guix: GuixPublicKey) -> None:
    encoded = base64.b64encode(payload).decode()
    narinfo = VECTORS[0].rsplit(";", 1)[0] + ";" + encoded + "\n"
    assert guix_verify_narinfo(narinfo, [ci_guix]) is None
    assert verify_bytes("guix-ecdsa " + encoded, b"", [ci_guix]) is None
    assert verify_bytes("ed25519 x:" + encoded, b"", [ci_guix]) is None


@pytest.mark.parametrize("data", [
    b"(" * 400_000 + b")" * 400_000,
    b"(acl " + b'"' + b"\\" * 800_000,
    b"(acl #" + b"0" * 800_000,
    b"(acl " + b"9:" * 400_000,
    b"(acl " + b"a " * 400_000 + b")",
    b"(acl " + b"(entry (public-key (ecc (curve Ed25519) (q #00#))) (tag (guix import)))" * 10_000
    + b")",
], ids=["nested", "escapes", "hex", "lengths", "atoms", "entries"])
def test_parsers_are_linear_and_shallow(data: bytes) -> None:
    start = time.perf_counter()
    with contextlib.suppress(KeyFileError):
        assert parse_guix_acl(data) == []
    with pytest.raises(KeyFileError):
        parse_public_key(data[:60_000])
    text = data.decode("latin-1").replace("#", '"')
    assert read_substitute_cache_entry(text) is None
    assert guix_verify_narinfo("StorePath: x\nSignature: 1;h;" + text, []) is None
    assert time.perf_counter() - start < 10
