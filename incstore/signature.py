"""Signature: a key holder's statement that a store item's metadata, or a file, is theirs.

Two families of keys sign store items, and incstore reads and writes both:

- **Nix**: Ed25519 (RFC 8032). Key files hold `NAME:base64`: the secret one seed32 + public32,
  the public one public32 (`nix-store --generate-binary-cache-key NAME SECRET PUBLIC`). A
  narinfo or the DB carries `NAME:base64(signature)` over the fingerprint
  `1;<store path>;sha256:<nix32>;<nar size>;<reference paths, sorted, comma-joined>`.
- **Guix**: ECDSA on the edwards25519 curve (not EdDSA), as libgcrypt does it for Guix's
  `(genkey (ecdsa (curve Ed25519) (flags rfc6979)))`, written here in plain Python because
  neither `cryptography` nor PyNaCl offer it. Key files are libgcrypt s-expressions:
  `signing-key.pub` is `(public-key (ecc (curve Ed25519) (q #..#)))`, `signing-key.sec` is
  `(private-key (ecc (curve Ed25519) (q #..#) (d #..#)))`, `/etc/guix/acl` is
  `(acl (entry <public-key> (tag (guix import))) ...)`. A narinfo's last signed field is
  `Signature: 1;<host>;<base64>`, the base64 of the s-expression
  `(signature (data (flags rfc6979) (hash sha256 #H#)) (sig-val (ecdsa (r #..#) (s #..#)))
  <public-key>)` in libgcrypt's "advanced" layout, where H is the sha256 of the narinfo's text
  before the first `Signature:`.

**Detached signatures** (for manifests and other files) are one line of text:

    ed25519 NAME:BASE64       a Nix key's Ed25519 signature of the file's bytes, as Nix
                              writes it in a narinfo `Sig:` field
    guix-ecdsa BASE64         a Guix key's signature of the file's sha256: BASE64 is exactly
                              what the third field of a narinfo `Signature:` carries

Everything read here (key files, ACLs, nix.conf, narinfos, signature lines, Guix's narinfo
cache) is treated as hostile: sizes and nesting are bounded, parsing is linear, and a malformed
input either raises `KeyFileError` (key material the user pointed us at) or counts as unsigned.
Verifiers never raise. Secret keys never appear in a `repr`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypeAlias

from incstore.errors import KeyFileError, SignatureError
from incstore.storepath import nix32_decode, nix32_encode

MAX_KEY_FILE_BYTES = 64 << 10
MAX_ACL_BYTES = 4 << 20
MAX_NIX_CONF_BYTES = 4 << 20
MAX_NARINFO_BYTES = 4 << 20
MAX_SIGNATURE_BYTES = 16 << 10
MAX_SEXP_DEPTH = 32


@dataclass(frozen=True)
class NixPublicKey:
    """An Ed25519 public key and the name signatures refer to it by."""

    name: str
    key: bytes

    def render(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"


@dataclass(frozen=True)
class NixSecretKey:
    name: str
    seed: bytes = field(repr=False)
    public: bytes

    @property
    def public_key(self) -> NixPublicKey:
        return NixPublicKey(self.name, self.public)

    def render(self) -> str:
        return f"{self.name}:{base64.b64encode(self.seed + self.public).decode()}"


@dataclass(frozen=True)
class GuixPublicKey:
    """A Guix signing key: `q` is the point d·G in the EdDSA encoding (32 bytes)."""

    q: bytes

    def render(self) -> str:
        """The text of `signing-key.pub`; write it as UTF-8, as Guile does."""
        return _render_advanced(_public_key_sexp(self.q)).decode("latin-1")


@dataclass(frozen=True)
class GuixSecretKey:
    d: int = field(repr=False)
    q: bytes

    @property
    def public_key(self) -> GuixPublicKey:
        return GuixPublicKey(self.q)

    def render(self) -> str:
        """The text of `signing-key.sec`; write it as UTF-8 and mode 0400, as Guix does."""
        tree: Sexp = [b"private-key",
                      [b"ecc", [b"curve", b"Ed25519"], [b"q", self.q], [b"d", _mpi_std(self.d)]]]
        return _render_advanced(tree).decode("latin-1")


PublicKey: TypeAlias = NixPublicKey | GuixPublicKey
SecretKey: TypeAlias = NixSecretKey | GuixSecretKey


# --- key generation ---------------------------------------------------------------------------


def generate_nix_key(name: str) -> tuple[str, str]:
    """A new key pair as `nix-store --generate-binary-cache-key` writes it: (secret, public)."""
    _check_nix_key_name(name)
    seed = os.urandom(32)
    key = NixSecretKey(name, seed, _ed25519_public(seed))
    return key.render(), key.public_key.render()


def generate_guix_key() -> tuple[str, str]:
    """A new key pair as `guix archive --generate-key` writes it: (signing-key.sec, .pub)."""
    # libgcrypt draws Ed25519-curve ECDSA secrets like X25519 ones (bit 254 set, bit 255 and
    # the low three bits clear), so keys made here are indistinguishable from Guix's own.
    raw = bytearray(os.urandom(32))
    raw[0] = (raw[0] & 0x7F) | 0x40
    raw[31] &= 0xF8
    d = int.from_bytes(raw, "big")
    key = GuixSecretKey(d, _encode_point(_mul(d, _BASE)))
    return key.render(), key.public_key.render()


# --- key parsing ------------------------------------------------------------------------------


# (secret, public) modes: `nix-store --generate-binary-cache-key` writes 0600 and 0644 (at the
# usual umask); `guix archive --generate-key` writes both under umask 0266 and then makes the
# public key 0444
KEY_MODES = {"nix": (0o600, 0o644), "guix": (0o400, 0o444)}


def write_key_pair(name: str, secret_file: str | os.PathLike[str],
                   public_file: str | os.PathLike[str], *, guix: bool = False) -> PublicKey:
    """Generate a key pair and write it with the modes its own tool gives it (KEY_MODES),
    never over an existing file."""
    from pathlib import Path

    from incstore.atomicfile import AlreadyExists, atomic_writer

    secret_text, public_text = generate_guix_key() if guix else generate_nix_key(name)
    secret_mode, public_mode = KEY_MODES["guix" if guix else "nix"]
    for path, text, mode in ((Path(secret_file), secret_text, secret_mode),
                             (Path(public_file), public_text, public_mode)):
        try:
            with atomic_writer(path, mode, create_only=True) as f:
                f.write(text.encode())
        except AlreadyExists:
            raise KeyFileError("exists already; not overwriting a key", item=str(path)) from None
        except OSError as e:
            raise KeyFileError(f"cannot write: {e.strerror or e}", item=str(path)) from None
    return parse_public_key(public_text)


def parse_public_key(text: str | bytes) -> PublicKey:
    """A public key: `NAME:base64` (a Nix key or key file) or a Guix `public-key` s-expression."""
    data = _as_bytes(text, MAX_KEY_FILE_BYTES)
    if data.lstrip()[:1] == b"(":
        for candidate in _sexp_readings(data):
            key = _guix_public_key(candidate)
            if key is not None:
                return key
        raise KeyFileError("not an Ed25519 Guix public key s-expression")
    name, raw = _nix_key_parts(data, "public")
    if len(raw) != 32:
        raise KeyFileError(f"Nix public key {name!r} is not 32 bytes long")
    return NixPublicKey(name, raw)


def parse_secret_key(text: str | bytes) -> SecretKey:
    """A secret key: a Nix secret key file or a Guix `signing-key.sec`."""
    data = _as_bytes(text, MAX_KEY_FILE_BYTES)
    if data.lstrip()[:1] == b"(":
        for candidate in _sexp_readings(data):
            key = _guix_secret_key(candidate)
            if key is not None:
                return key
        raise KeyFileError("not an Ed25519 Guix private-key s-expression")
    name, raw = _nix_key_parts(data, "secret")
    if len(raw) != 64:
        raise KeyFileError(f"Nix secret key {name!r} is not 64 bytes long")
    seed, public = raw[:32], raw[32:]
    # Nix signs with the stored public half, so a mismatch would make every signature invalid.
    if _ed25519_public(seed) != public:
        raise KeyFileError(f"Nix secret key {name!r}: its public half does not match its seed")
    return NixSecretKey(name, seed, public)


def read_secret_key(path: str | os.PathLike[str]) -> SecretKey:
    """A secret key file, refused when anyone but its owner may read or write it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
    except OSError as e:
        raise KeyFileError(f"cannot open secret key: {e.strerror}", item=str(path)) from e
    try:
        st = os.fstat(fd)
        if (st.st_mode & 0o170000) != 0o100000:
            raise KeyFileError("secret key is not a regular file", item=str(path))
        if st.st_mode & 0o077:
            raise KeyFileError(f"secret key is not private enough (mode {st.st_mode & 0o777:o}, "
                               "want 600 or 400)", item=str(path))
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise KeyFileError(f"cannot read secret key: {e.strerror}", item=str(path)) from e
    finally:
        os.close(fd)
    try:
        return parse_secret_key(data)
    except KeyFileError as e:
        raise KeyFileError(str(e), item=str(path)) from None


def parse_guix_acl(text: str | bytes) -> list[GuixPublicKey]:
    """The Ed25519 keys `/etc/guix/acl` authorizes.

    Guix writes the ACL with libgcrypt (`write-acl` in guix/pki.scm) and reads it back as one
    s-expression, so there is no comment syntax; an ACL that Guix itself would refuse (any entry
    not `(entry KEY (tag (guix import)))`) is refused. Entries with other key types (RSA) are
    valid for Guix but cannot sign anything incstore checks, so they are left out.
    """
    data = _as_bytes(text, MAX_ACL_BYTES)
    last_error = "not an s-expression"
    for tree in _sexp_readings(data):
        if not (isinstance(tree, list) and tree and tree[0] == b"acl"):
            last_error = "not an (acl ...) s-expression"
            continue
        keys: list[GuixPublicKey] = []
        for entry in tree[1:]:
            if not (isinstance(entry, list) and len(entry) == 3 and entry[0] == b"entry"
                    and entry[2] == [b"tag", [b"guix", b"import"]]):
                last_error = "an ACL entry is not (entry KEY (tag (guix import)))"
                break
            key = _guix_public_key(entry[1])
            if key is not None and key not in keys:
                keys.append(key)
        else:
            return keys
    raise KeyFileError(f"invalid Guix ACL: {last_error}")


_NIX_KEY_SETTINGS = {"trusted-public-keys", "binary-cache-public-keys"}  # the second is an alias


def parse_nix_conf_keys(text: str, initial: Iterable[NixPublicKey] = ()) -> list[NixPublicKey]:
    """The keys a nix.conf makes Nix trust, as Nix 2.8's config reader applies it.

    Lines are `name = value...` with `#` starting a comment anywhere; values are whitespace-
    separated. A plain `trusted-public-keys` replaces what came before, `extra-...` appends.
    `include` lines are not followed. `initial` is where the list starts: Nix's built-in
    default (cache.nixos.org-1) applies when no file sets the option.
    """
    if len(text) > MAX_NIX_CONF_BYTES:
        raise KeyFileError("nix.conf is too large")
    keys = list(initial)
    for line in text.split("\n"):
        tokens = line.split("#", 1)[0].split()
        if len(tokens) < 2 or tokens[1] != "=":
            continue  # Nix refuses such a line; not ours to judge, and it trusts nothing
        name = tokens[0]
        append = name.startswith("extra-")
        if (name[6:] if append else name) not in _NIX_KEY_SETTINGS:
            continue
        values = []
        for value in tokens[2:]:
            try:
                key = parse_public_key(value)
            except KeyFileError as e:
                raise KeyFileError(f"nix.conf {name}: {e}") from None
            if not isinstance(key, NixPublicKey):
                raise KeyFileError(f"nix.conf {name}: {value!r} is not a Nix public key")
            values.append(key)
        keys = keys + values if append else values
    return list(dict.fromkeys(keys))


# --- Nix signatures ---------------------------------------------------------------------------

_HEX_HASH_RE = re.compile(r"sha256:([0-9a-f]{64})")
_NIX32_HASH_RE = re.compile(r"sha256:([0-9a-df-np-sv-z]{52})")


def nix_fingerprint(store_path: str, nar_hash: str, nar_size: int,
                    references: Iterable[str]) -> bytes:
    """What Nix signs for a store item (ValidPathInfo::fingerprint).

    `nar_hash` is the DB's `sha256:<hex>` (a narinfo's `sha256:<nix32>` is accepted too);
    `references` are full store paths.
    """
    if (m := _HEX_HASH_RE.fullmatch(nar_hash)) is not None:
        digest = bytes.fromhex(m.group(1))
    elif (m := _NIX32_HASH_RE.fullmatch(nar_hash)) is not None:
        try:
            digest = nix32_decode(m.group(1))
        except ValueError as e:
            raise SignatureError(f"bad NAR hash {nar_hash!r}: {e}", item=store_path) from e
    else:
        raise SignatureError(f"NAR hash {nar_hash!r} is not sha256:<hex>", item=store_path)
    if nar_size <= 0:
        raise SignatureError("Nix refuses to sign an item with a zero NAR size", item=store_path)
    refs = sorted(set(references))
    for path in (store_path, *refs):
        if not path.startswith("/") or any(c in path for c in ";,\n"):
            raise SignatureError(f"not a store path: {path!r}", item=store_path)
    text = f"1;{store_path};sha256:{nix32_encode(digest)};{nar_size};{','.join(refs)}"
    return text.encode()


def nix_sign(secret: NixSecretKey, fingerprint: bytes) -> str:
    """`NAME:base64`, as Nix writes signatures into `Sig:` fields and the DB's `sigs` column."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    signature = Ed25519PrivateKey.from_private_bytes(secret.seed).sign(fingerprint)
    return f"{secret.name}:{base64.b64encode(signature).decode()}"


def nix_verify(sig: str, fingerprint: bytes, trusted_keys: Iterable[PublicKey]) -> str | None:
    """The name of the trusted key whose signature `sig` is over `fingerprint`, else None."""
    key = _nix_verify(sig, fingerprint, trusted_keys)
    return key.name if key is not None else None


def _ed25519_public(seed: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()


def _nix_verify(sig: str, data: bytes, trusted_keys: Iterable[PublicKey]) -> NixPublicKey | None:
    if len(sig) > MAX_SIGNATURE_BYTES:
        return None
    name, colon, encoded = sig.strip().partition(":")
    if not name or not colon:
        return None
    raw = _b64decode(encoded)
    if raw is None or len(raw) != 64:
        return None
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    for key in trusted_keys:
        if isinstance(key, NixPublicKey) and key.name == name:
            try:
                Ed25519PublicKey.from_public_bytes(key.key).verify(raw, data)
            except (InvalidSignature, ValueError):
                continue
            return key
    return None


# --- Guix signatures --------------------------------------------------------------------------

_GUIX_SIGNED_FIELDS = ("StorePath", "NarHash", "References")


def guix_sign_narinfo(secret: GuixSecretKey, text: str, host: str = "incstore") -> str:
    """`text` with the `Signature:` line `guix publish` would add for it (host is informative)."""
    if "Signature:" in text:
        raise SignatureError("narinfo already holds a Signature field")
    if not text.endswith("\n"):
        raise SignatureError("narinfo text must end with a newline")
    if not re.fullmatch(r"[A-Za-z0-9.\-_]{1,253}", host):
        raise SignatureError(f"signature host {host!r} is not a host name")
    fields = _recutils_fields(text)
    if fields is None or any(name not in dict(fields) for name in _GUIX_SIGNED_FIELDS):
        raise SignatureError("narinfo lacks StorePath, NarHash or References, so Guix would "
                             "treat it as unsigned")
    payload = _guix_signature_payload(secret, hashlib.sha256(text.encode()).digest())
    return f"{text}Signature: 1;{host};{payload}\n"


def guix_verify_narinfo(text: str, trusted_keys: Iterable[PublicKey]) -> GuixPublicKey | None:
    """The trusted key that signed this narinfo, by Guix's rules (guix/narinfo.scm), else None.

    The signed text is everything before the first `Signature:`; it must hold StorePath,
    NarHash and References; the signature's embedded hash must be that text's sha256 and its
    embedded key one of `trusted_keys`. Only read values from the signed text: the fields
    after the signature (URL, Compression, FileSize in newer `guix publish` output) are not.
    """
    if len(text) > MAX_NARINFO_BYTES:
        return None
    fields = _recutils_fields(text)
    if fields is None:
        return None
    value = next((v for name, v in fields if name == "Signature"), None)
    cut = text.find("Signature:")
    if value is None or cut < 0:
        return None
    signed = text[:cut]
    signed_fields = _recutils_fields(signed)
    if signed_fields is None or any(name not in dict(signed_fields)
                                    for name in _GUIX_SIGNED_FIELDS):
        return None
    parts = value.split(";")
    if len(parts) != 3 or parts[0] != "1":
        return None
    return _guix_verify_payload(parts[2], hashlib.sha256(signed.encode()).digest(), trusted_keys)


# --- detached signatures ----------------------------------------------------------------------


def sign_bytes(secret: SecretKey, data: bytes) -> str:
    """A one-line detached signature of `data` (see the module docstring for the format)."""
    if isinstance(secret, NixSecretKey):
        return f"ed25519 {nix_sign(secret, data)}"
    return f"guix-ecdsa {_guix_signature_payload(secret, hashlib.sha256(data).digest())}"


def verify_bytes(line: str, data: bytes, trusted_keys: Iterable[PublicKey]) -> PublicKey | None:
    """The trusted key whose detached signature `line` is over `data`, else None."""
    if len(line) > MAX_SIGNATURE_BYTES:
        return None
    kind, _, rest = line.strip().partition(" ")
    if kind == "ed25519":
        return _nix_verify(rest, data, trusted_keys)
    if kind == "guix-ecdsa":
        return _guix_verify_payload(rest, hashlib.sha256(data).digest(), trusted_keys)
    return None


# --- Guix's narinfo cache ---------------------------------------------------------------------
#
# What `guix substitute` keeps (guix/substitutes.scm, identical in Guix v1.4.0 = 8e2f32ce and
# master 43770a9d of 2026-03-21; the format has been version 2 since 1cf7e318, 2016-03-16):
#
# - Directory: %narinfo-cache-directory = $XDG_CACHE_HOME/guix/substitute when that variable is
#   set, else /var/guix/substitute/cache, for the daemon's substituter (v1.4.0 decides by
#   `(zero? (getuid))`, master by `_NIX_OPTIONS` being set); other callers (`guix challenge`
#   run by a user) use ~/.cache/guix/substitute instead.
# - File: <dir>/<bytevector->base32-string (sha256 (string->utf8 URL))>/<store hash part>
#   (narinfo-cache-file), where URL is the substitute URL exactly as configured (no trailing
#   slash normalisation) and base32 is (guix base32)'s RFC 4648 one: a-z2-7, lower case, no
#   padding, 52 characters. Not nix-base32.
# - Content: one `write`n Scheme datum (cache-narinfo!):
#     (narinfo (version 2) (cache-uri "URL") (date D) (ttl T) (value "NARINFO" | #f))
#   D is (current-time time-monotonic) seconds, which Guile takes from TAI: Unix time + 37.
#   T is the server's Cache-Control max-age, else 36 h for a hit and 2 min for a miss. #f marks
#   a miss (404 or 202 "baking", or any other error with a 1 min TTL). Readers (cached-narinfo)
#   drop an entry once D + T is in the past and ignore other versions. NARINFO is the narinfo
#   text byte for byte as the server sent it (narinfo->string writes narinfo-contents),
#   Signature line and the unsigned fields after it included.


_TAI_MINUS_UTC = 37  # leap seconds since 2017; Guile's time-monotonic is TAI


def substitute_cache_dirname(url: str) -> str:
    """The directory name `guix substitute` caches a substitute server's narinfos under."""
    digest = hashlib.sha256(url.encode()).digest()
    return base64.b32encode(digest).decode().rstrip("=").lower()


def read_substitute_cache_entry(text: str | bytes, *, now: float | None = None,
                                check_expiry: bool = True) -> str | None:
    """The narinfo text a `guix substitute` cache file holds, or None for a cached miss, an
    expired entry (unless `check_expiry` is off: an old entry is still the server's signed
    statement), another format version, or anything malformed."""
    try:
        if isinstance(text, bytes):
            if len(text) > MAX_NARINFO_BYTES * 2:
                return None
            text = text.decode()
        if len(text) > MAX_NARINFO_BYTES * 2:
            return None
        datum = _read_scheme_datum(text)
    except (ValueError, UnicodeDecodeError):
        return None
    match datum:
        case [_Sym("narinfo"), [_Sym("version"), 2], [_Sym("cache-uri"), str()],
              [_Sym("date"), int(date)], [_Sym("ttl"), int(ttl)], [_Sym("value"), value]]:
            pass
        case _:
            return None
    if not isinstance(value, str) or isinstance(date, bool) or isinstance(ttl, bool):
        return None
    tai_now = (time.time() if now is None else now) + _TAI_MINUS_UTC
    if check_expiry and tai_now - ttl > date:
        return None
    return value


# --- libgcrypt s-expressions ------------------------------------------------------------------

Sexp: TypeAlias = "bytes | list[Sexp]"

_SEXP_TOKEN_RE = re.compile(
    rb"[ \t\n\v\f\r]+"
    rb"|(?P<open>\()"
    rb"|(?P<close>\))"
    rb"|(?P<len>0|[1-9][0-9]{0,8})(?P<lenkind>[:\"#])"
    rb"|(?P<token>[A-Za-z\-./_:*+=][A-Za-z0-9\-./_:*+=]*)"
    rb"|(?P<hex>\#[0-9A-Fa-f \t\n\v\f\r]*\#)"
    rb"|(?P<quoted>\"(?:[^\"\\]|\\[\s\S])*\")"
)
_SEXP_ESCAPE_RE = re.compile(rb"\\(?:([0-7]{3})|x([0-9A-Fa-f]{2})|(\r\n?|\n\r?)|([\s\S]))")
_SEXP_SIMPLE_ESCAPES = {b"b": b"\b", b"t": b"\t", b"v": b"\v", b"n": b"\n", b"f": b"\f",
                        b"r": b"\r", b'"': b'"', b"'": b"'", b"\\": b"\\"}
_SEXP_WS_RE = re.compile(rb"[ \t\n\v\f\r]")


def _parse_sexp(data: bytes) -> Sexp:
    """One list in libgcrypt's syntax (advanced or canonical): atoms become bytes.

    Accepts what gcry_sexp_new accepts for keys and signatures (tokens, `N:verbatim`, `"quoted"`,
    `#hex#`), not display hints or base64 atoms, which nothing Guix writes uses. Raises
    ValueError; never recurses, so nesting cannot exhaust the stack.
    """
    stack: list[list[Sexp]] = []
    result: Sexp | None = None
    pos, end = 0, len(data)
    while pos < end:
        m = _SEXP_TOKEN_RE.match(data, pos)
        if m is None:
            raise ValueError(f"bad s-expression character at offset {pos}")
        pos = m.end()
        kind = m.lastgroup
        if kind is None:
            continue  # whitespace
        if result is not None:
            raise ValueError("data after the s-expression")
        atom: bytes
        if kind == "open":
            if len(stack) >= MAX_SEXP_DEPTH:
                raise ValueError("s-expression nested too deeply")
            stack.append([])
            continue
        if kind == "close":
            if not stack:
                raise ValueError("unbalanced ')'")
            done = stack.pop()
            if stack:
                stack[-1].append(done)
            else:
                result = done
            continue
        if kind == "lenkind":
            if m.group("lenkind") != b":":
                pos -= 1  # the length before a quoted or hex atom is optional and ignored
                continue
            length = int(m.group("len"))
            if length > end - pos:
                raise ValueError("verbatim atom runs past the end")
            atom = data[pos : pos + length]
            pos += length
        elif kind == "token":
            atom = m.group("token")
        elif kind == "hex":
            digits = _SEXP_WS_RE.sub(b"", m.group("hex")[1:-1])
            if len(digits) % 2:
                raise ValueError("odd number of hex digits")
            atom = bytes.fromhex(digits.decode())
        else:
            atom = _SEXP_ESCAPE_RE.sub(_sexp_unescape, m.group("quoted")[1:-1])
        if not stack:
            raise ValueError("atom outside a list")
        stack[-1].append(atom)
    if result is None:
        raise ValueError("incomplete s-expression")
    return result


def _sexp_unescape(m: re.Match[bytes]) -> bytes:
    octal, hexa, newline, other = m.groups()
    if octal is not None:
        return bytes([int(octal, 8) & 0xFF])
    if hexa is not None:
        return bytes([int(hexa, 16)])
    if newline is not None:
        return b""
    if other in _SEXP_SIMPLE_ESCAPES:
        return _SEXP_SIMPLE_ESCAPES[other]
    raise ValueError(f"bad escape in quoted string: {other!r}")


def _sexp_readings(data: bytes) -> list[Sexp]:
    """The s-expressions a key or ACL file can mean.

    Guile reads these files as text in the locale's encoding (UTF-8 in practice) and hands the
    string to libgcrypt as ISO-8859-1, so an atom libgcrypt printed as a quoted string with
    bytes >= 0xA1 lands on disk as UTF-8. Try that reading first, then the bytes as they are
    (canonical files, or files written in a Latin-1 locale).
    """
    attempts = []
    try:
        transcoded = data.decode("utf-8").encode("latin-1")
        if transcoded != data:
            attempts.append(transcoded)
    except (UnicodeDecodeError, UnicodeEncodeError):
        pass
    attempts.append(data)
    readings = []
    for attempt in attempts:
        try:
            readings.append(_parse_sexp(attempt))
        except ValueError:
            continue
    return readings


_TOKEN_SPECIALS = b"-./_:*+="


def _render_atom(atom: bytes) -> bytes:
    """An atom as libgcrypt's gcry_sexp_sprint(ADVANCED) writes it (suitable_encoding)."""
    if not atom:
        return b'""'
    if atom[0] & 0x80 or atom[0] == 0:
        return b"#" + atom.hex().upper().encode() + b"#"
    maybe_token = True
    for byte in atom:
        # NUL passes both tests because libgcrypt checks membership with strchr, which finds
        # the string's terminator; only the first byte is checked for NUL separately
        if (byte < 0x20 or 0x7F <= byte <= 0xA0) and byte not in b"\0\b\t\v\n\f\r":
            return b"#" + atom.hex().upper().encode() + b"#"
        if maybe_token and not (0x30 <= byte <= 0x39 or 0x41 <= byte <= 0x5A
                                or 0x61 <= byte <= 0x7A or byte in _TOKEN_SPECIALS + b"\0"):
            maybe_token = False
    if maybe_token and not atom[:1].isdigit():
        return atom
    escaped = bytearray(b'"')
    for byte in atom:
        char = bytes([byte])
        escape = next((k for k, v in _SEXP_SIMPLE_ESCAPES.items() if v == char), None)
        if escape is not None:
            escaped += b"\\" + escape
        elif byte < 0x20 or 0x7F <= byte <= 0xA0:
            escaped += b"\\x%02x" % byte
        else:
            escaped += char
    return bytes(escaped + b'"')


def _render_advanced(tree: Sexp) -> bytes:
    """`tree` laid out byte for byte as libgcrypt's advanced format (what Guix writes)."""
    events: list[tuple[int, bytes]] = []

    def flatten(node: Sexp) -> None:
        if isinstance(node, bytes):
            events.append((_ATOM, node))
            return
        events.append((_OPEN, b""))
        for child in node:
            flatten(child)
        events.append((_CLOSE, b""))

    flatten(tree)
    events.append((_STOP, b""))
    out = bytearray()
    indent = 0
    for (kind, atom), (following, _) in itertools.pairwise(events):
        if kind == _OPEN:
            if indent:
                out += b"\n" + b" " * indent
            out += b"("
            indent += 1
        elif kind == _CLOSE:
            out += b")"
            indent -= 1
            if following not in (_OPEN, _STOP):
                out += b"\n" + b" " * indent
        else:
            out += _render_atom(atom)
            if following != _CLOSE:
                out += b" "
    return bytes(out + b"\n")


_ATOM, _OPEN, _CLOSE, _STOP = range(4)


def _mpi_std(value: int) -> bytes:
    """A positive integer as libgcrypt's %m prints it: minimal big-endian two's complement."""
    return value.to_bytes(value.bit_length() // 8 + 1, "big")


def _mpi_usg(value: int) -> bytes:
    """An integer as libgcrypt's %M prints it: big-endian, no leading zero bytes."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _public_key_sexp(q: bytes) -> Sexp:
    return [b"public-key", [b"ecc", [b"curve", b"Ed25519"], [b"q", q]]]


def _guix_public_key(tree: Sexp) -> GuixPublicKey | None:
    """The key in `(public-key (ecc (curve Ed25519) (q Q)))`, exactly that shape, else None.

    Guix compares keys as whole s-expressions, so a key with extra fields could never match
    an ACL entry of this shape anyway.
    """
    match tree:
        case [b"public-key", [b"ecc", [b"curve", b"Ed25519"], [b"q", bytes(q)]]]:
            return GuixPublicKey(q) if _decode_point(q) is not None else None
    return None


def _guix_secret_key(tree: Sexp) -> GuixSecretKey | None:
    match tree:
        case [b"private-key", [b"ecc", [b"curve", b"Ed25519"], [b"q", bytes(q)], [b"d", bytes(d)]]]:
            pass
        case _:
            return None
    scalar = int.from_bytes(d, "big")
    # RFC 6979 feeds d to HMAC as 32 bytes, as libgcrypt does, so it must fit in them
    if not 0 < scalar < 1 << 256 or scalar % _N == 0 or _decode_point(q) is None:
        return None
    if _encode_point(_mul(scalar, _BASE)) != q:
        raise KeyFileError("Guix secret key: q is not d·G (the key file is damaged)")
    return GuixSecretKey(scalar, q)


def _guix_signature_payload(secret: GuixSecretKey, digest: bytes) -> str:
    r, s = _ecdsa_sign(secret.d, digest)
    tree: Sexp = [
        b"signature",
        [b"data", [b"flags", b"rfc6979"], [b"hash", b"sha256", digest]],
        [b"sig-val", [b"ecdsa", [b"r", _mpi_usg(r)], [b"s", _mpi_usg(s)]]],
        _public_key_sexp(secret.q),
    ]
    # Guix base64-encodes the UTF-8 of the Guile string libgcrypt's Latin-1 output became.
    text = _render_advanced(tree).decode("latin-1")
    return base64.b64encode(text.encode()).decode()


def _guix_verify_payload(payload: str, digest: bytes,
                         trusted_keys: Iterable[PublicKey]) -> GuixPublicKey | None:
    raw = _b64decode(payload)
    if raw is None or len(raw) > MAX_SIGNATURE_BYTES:
        return None
    try:
        tree = _parse_sexp(raw.decode("utf-8").encode("latin-1"))
    except (ValueError, UnicodeError):
        return None
    match tree:
        case [b"signature",
              [b"data", *flags, [b"hash", b"sha256", bytes(signed_digest)]],
              [b"sig-val", [b"ecdsa", [b"r", bytes(r)], [b"s", bytes(s)]]],
              key_tree]:
            pass
        case _:
            return None
    if flags not in ([], [[b"flags", b"rfc6979"]]) or signed_digest != digest:
        return None
    key = _guix_public_key(key_tree)
    if key is None or key not in set(k for k in trusted_keys if isinstance(k, GuixPublicKey)):
        return None
    if len(r) > 33 or len(s) > 33:
        return None
    if not _ecdsa_verify(key.q, digest, int.from_bytes(r, "big"), int.from_bytes(s, "big")):
        return None
    return key


# --- edwards25519 and ECDSA -------------------------------------------------------------------
#
# Twisted Edwards curve -x² + y² = 1 + D·x²·y² over GF(P), points in extended coordinates
# (X : Y : Z : T) with x = X/Z, y = Y/Z, x·y = T/Z; the a = -1 addition formulas are complete,
# so no special cases. ECDSA uses the affine x of k·G as libgcrypt does for this curve.
# `_mul` reduces its scalar mod N, which is exact for the base point; the verifier's scalars
# are already below N, as in libgcrypt, so a key with a small-order component is treated as
# libgcrypt treats it.

_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P
_D2 = 2 * _D % _P
_N = 2**252 + 27742317777372353535851937790883648493
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_QBITS = _N.bit_length()  # 253: libgcrypt truncates hashes and RFC 6979 values to this

_Point: TypeAlias = tuple[int, int, int, int]
_IDENTITY: _Point = (0, 1, 1, 0)
_GX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_GY = 46316835694926478169428394003475163141307993866256225615783033603165251855960
_BASE: _Point = (_GX, _GY, 1, _GX * _GY % _P)


def _add(p1: _Point, p2: _Point) -> _Point:
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    a = (y1 - x1) * (y2 - x2) % _P
    b = (y1 + x1) * (y2 + x2) % _P
    c = t1 * _D2 * t2 % _P
    d = 2 * z1 * z2 % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _double(p1: _Point) -> _Point:
    x1, y1, z1, _ = p1
    a = x1 * x1 % _P
    b = y1 * y1 % _P
    c = 2 * z1 * z1 % _P
    h = a + b
    e = h - (x1 + y1) * (x1 + y1) % _P
    g = a - b
    f = c + g
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


@lru_cache(maxsize=16)
def _comb(point: _Point) -> tuple[tuple[_Point, ...], ...]:
    """Row i holds j·16^i·point for j < 16, so a scalar multiple is 64 additions and no
    doublings. Built once per point (about 10 ms): the base point and the few trusted keys."""
    rows = []
    base = point
    for _ in range(64):
        row = [_IDENTITY, base]
        for _ in range(14):
            row.append(_add(row[-1], base))
        rows.append(tuple(row))
        base = _double(_double(_double(_double(base))))
    return tuple(rows)


def _mul(k: int, point: _Point) -> _Point:
    """(k mod N)·point: equal to k·point for the base point and the keys made from it."""
    k %= _N
    acc = _IDENTITY
    for row in _comb(point):
        if nibble := k & 15:
            acc = _add(acc, row[nibble])
        k >>= 4
    return acc


def _affine(point: _Point) -> tuple[int, int]:
    x, y, z, _ = point
    inv = pow(z, -1, _P)
    return x * inv % _P, y * inv % _P


def _encode_point(point: _Point) -> bytes:
    x, y = _affine(point)
    return (y | (x & 1) << 255).to_bytes(32, "little")


@lru_cache(maxsize=256)
def _decode_point(encoded: bytes) -> _Point | None:
    """RFC 8032 §5.1.3 point decoding; None when `encoded` is not a curve point."""
    if len(encoded) != 32:
        return None
    number = int.from_bytes(encoded, "little")
    y, sign = number & ((1 << 255) - 1), number >> 255
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if v * x * x % _P == (-u) % _P:
        x = x * _SQRT_M1 % _P
    elif v * x * x % _P != u:
        return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y, 1, x * y % _P


def _bits2int(data: bytes) -> int:
    return int.from_bytes(data, "big") >> max(0, 8 * len(data) - _QBITS)


def _rfc6979_nonces(d: int, digest: bytes) -> Iterable[int]:
    """RFC 6979 §3.2 candidates for k, HMAC-SHA256, qlen = 253, as libgcrypt derives them."""
    x = d.to_bytes(32, "big")  # libgcrypt uses the unreduced secret (its d exceeds n)
    h = (_bits2int(digest) % _N).to_bytes(32, "big")
    v, k = b"\x01" * 32, b"\x00" * 32
    k = hmac.digest(k, v + b"\x00" + x + h, "sha256")
    v = hmac.digest(k, v, "sha256")
    k = hmac.digest(k, v + b"\x01" + x + h, "sha256")
    v = hmac.digest(k, v, "sha256")
    while True:
        v = hmac.digest(k, v, "sha256")
        candidate = _bits2int(v)
        if 0 < candidate < _N:
            yield candidate
        k = hmac.digest(k, v + b"\x00", "sha256")
        v = hmac.digest(k, v, "sha256")


def _ecdsa_sign(d: int, digest: bytes) -> tuple[int, int]:
    e = _bits2int(digest)
    for k in _rfc6979_nonces(d, digest):
        r = _affine(_mul(k, _BASE))[0] % _N
        if r == 0:
            continue
        s = pow(k, -1, _N) * (e + d * r) % _N
        if s != 0:
            return r, s
    raise AssertionError("unreachable: RFC 6979 yields nonces forever")


def _ecdsa_verify(q: bytes, digest: bytes, r: int, s: int) -> bool:
    point = _decode_point(q)
    if point is None or not (0 < r < _N and 0 < s < _N):
        return False
    w = pow(s, -1, _N)
    total = _add(_mul(_bits2int(digest) * w % _N, _BASE), _mul(r * w % _N, point))
    return _affine(total)[0] % _N == r  # the identity's x is 0, never a valid r


# --- small readers ----------------------------------------------------------------------------


def _as_bytes(text: str | bytes, limit: int) -> bytes:
    if len(text) > limit:
        raise KeyFileError(f"key material is larger than {limit} bytes")
    if isinstance(text, bytes):
        return text
    try:
        return text.encode("latin-1")  # keeps canonical s-expressions read as Latin-1 intact
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


_NIX_KEY_NAME_RE = re.compile(r"[^\s:]{1,255}")


def _check_nix_key_name(name: str) -> None:
    if not _NIX_KEY_NAME_RE.fullmatch(name) or not name.isprintable():
        raise KeyFileError(f"invalid Nix key name {name!r} (no colon, no whitespace)")


def _nix_key_parts(data: bytes, what: str) -> tuple[str, bytes]:
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyFileError(f"Nix {what} key is not ASCII text") from None
    name, colon, encoded = text.partition(":")
    if not colon or not name:
        raise KeyFileError(f"Nix {what} key is not NAME:base64")
    _check_nix_key_name(name)
    raw = _b64decode(encoded)
    if raw is None:
        raise KeyFileError(f"Nix {what} key {name!r} is not valid base64")
    return name, raw


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


_RECUTILS_FIELD_START = re.compile(r"[A-Za-z%]")


def _recutils_fields(text: str) -> list[tuple[str, str]] | None:
    """Fields as Guix's recutils->alist reads a narinfo, or None where it would raise.

    One record: leading blank lines are skipped, the first blank line after a field ends it,
    `#` lines are comments, `+` lines continue the previous value. A field's value is the text
    after the first colon with leading whitespace removed.
    """
    fields: list[tuple[str, str]] = []
    for line in text.split("\n")[: -1 if text.endswith("\n") else None]:
        if not line:
            if fields:
                break
            continue
        if _RECUTILS_FIELD_START.match(line):
            name, colon, value = line.partition(":")
            if not colon:
                return None
            fields.append((name, value.lstrip()))
        elif line[0] == "#":
            continue
        elif line[0] == "+":
            if not fields:
                return None
            name, value = fields[-1]
            fields[-1] = (name, value + "\n" + line[2 if line.startswith("+ ") else 1 :])
        else:
            return None
    return fields


@dataclass(frozen=True, slots=True)
class _Sym:
    name: str


_SCHEME_TOKEN_RE = re.compile(
    r"\s+|(?P<open>\()|(?P<close>\))"
    r'|(?P<string>"(?:[^"\\]|\\[\s\S])*")'
    r'|(?P<atom>[^\s()";]+)'
)
_SCHEME_ESCAPE_RE = re.compile(
    r"\\(?:x([0-9A-Fa-f]{2})|u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{6})|\n[ \t]*|([\s\S]))")
_SCHEME_ESCAPES = {"a": "\a", "b": "\b", "t": "\t", "n": "\n", "v": "\v", "f": "\f",
                   "r": "\r", "0": "\0", '"': '"', "\\": "\\"}
_SCHEME_INT_RE = re.compile(r"-?[0-9]{1,30}")
_SCHEME_SYMBOL_RE = re.compile(r"[A-Za-z!$%&*/<=>?^_~][A-Za-z0-9!$%&*/<=>?^_~+\-.@]*")

_Datum: TypeAlias = "_Sym | int | bool | str | list[_Datum]"


def _read_scheme_datum(text: str) -> _Datum:
    """The one datum Guile's `write` produced (lists, symbols, integers, strings, booleans)."""
    stack: list[list[_Datum]] = []
    result: _Datum | None = None
    pos = 0
    while pos < len(text):
        m = _SCHEME_TOKEN_RE.match(text, pos)
        if m is None:
            raise ValueError(f"unexpected character at offset {pos}")
        pos = m.end()
        kind = m.lastgroup
        if kind is None:
            continue
        if result is not None:
            raise ValueError("data after the datum")
        item: _Datum
        if kind == "open":
            if len(stack) >= MAX_SEXP_DEPTH:
                raise ValueError("nested too deeply")
            stack.append([])
            continue
        if kind == "close":
            if not stack:
                raise ValueError("unbalanced ')'")
            done = stack.pop()
            if stack:
                stack[-1].append(done)
            else:
                result = done
            continue
        if kind == "string":
            item = _SCHEME_ESCAPE_RE.sub(_scheme_unescape, m.group("string")[1:-1])
        else:
            atom = m.group("atom")
            if atom in ("#f", "#false", "#t", "#true"):
                item = atom in ("#t", "#true")
            elif _SCHEME_INT_RE.fullmatch(atom):
                item = int(atom)
            elif _SCHEME_SYMBOL_RE.fullmatch(atom):
                item = _Sym(atom)
            else:
                raise ValueError(f"unsupported datum {atom[:40]!r}")
        if not stack:
            raise ValueError("atom outside a list")
        stack[-1].append(item)
    if result is None:
        raise ValueError("incomplete datum")
    return result


def _scheme_unescape(m: re.Match[str]) -> str:
    x2, u4, u6, other = m.groups()
    code = x2 or u4 or u6
    if code is not None:
        value = int(code, 16)
        if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
            raise ValueError("escape names no character")
        return chr(value)
    if other is None:
        return ""  # a backslash-newline line continuation
    if other not in _SCHEME_ESCAPES:
        raise ValueError(f"unknown string escape \\{other}")
    return _SCHEME_ESCAPES[other]


__all__ = [
    "GuixPublicKey",
    "GuixSecretKey",
    "NixPublicKey",
    "NixSecretKey",
    "PublicKey",
    "SecretKey",
    "generate_guix_key",
    "generate_nix_key",
    "guix_sign_narinfo",
    "guix_verify_narinfo",
    "nix_fingerprint",
    "nix_sign",
    "nix_verify",
    "parse_guix_acl",
    "parse_nix_conf_keys",
    "parse_public_key",
    "parse_secret_key",
    "read_secret_key",
    "read_substitute_cache_entry",
    "sign_bytes",
    "substitute_cache_dirname",
    "verify_bytes",
]
