"""Trust: which keys a restore believes, and what each manifest and item is vouched for by.

Hashes prove integrity, not origin: whoever can write the chunk store can write a manifest
whose hashes match their own chunks. Once the user names a trust root (`--trusted-key`,
`--trust-guix-acl`, `--trust-nix-conf`, INCSTORE_TRUSTED_KEYS), a restore believes only:

- a manifest whose detached signature (`<manifest>.sig`, one line per signer) verifies under a
  trusted key over the statement `incstore-manifest-signature-v1` + the sha256 of the
  manifest's exact bytes; everything the restore uses is inside those bytes, its name and
  creation time included, so it cannot be renamed, edited or replayed as another name;
- else, item by item, a signature that covers the item's path, NAR hash, NAR size and
  references: a Nix `Sig` over its fingerprint (from the manifest or the chunk's narinfo), or a
  Guix `Signature:` on the chunk's narinfo or on the upstream narinfo kept beside it
  (`guix/<key>.narinfo`), whose fields must equal the manifest's. Fields no such signature
  covers (deriver, registration time, derivation outputs, Nix `ultimate` and `ca`) are then
  not taken from the manifest.

An item that is not vouched for is neither extracted nor registered. The check reads
signatures and narinfos only; it runs in the plan, before anything is written.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from incstore import regularfile
from incstore.chunkstore import ChunkStore, describes, signed_fields
from incstore.errors import IncstoreError, KeyFileError, ManifestError, SignatureError
from incstore.manifest import Manifest
from incstore.storepath import StorePath

if TYPE_CHECKING:  # the signature module (and its curve tables) loads only when trust is used
    from incstore.signature import PublicKey, SecretKey

STATEMENT = b"incstore-manifest-signature-v1\n"
MAX_SIG_LINES = 16
DEFAULT_GUIX_ACL = Path("/etc/guix/acl")


def describe(key: PublicKey) -> str:
    """How messages name a key: a Nix key by its name, a Guix key by its q (shortened)."""
    from incstore.signature import NixPublicKey

    if isinstance(key, NixPublicKey):
        return key.name
    return f"guix:{key.q.hex()[:16]}"


@dataclass(frozen=True)
class Roots:
    """The public keys a restore trusts, and where they came from."""

    keys: tuple[PublicKey, ...] = ()
    sources: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.sources)

    def to_json(self) -> dict[str, Any]:
        return {"keys": [describe(k) for k in self.keys], "sources": list(self.sources)}


def _read_key_file(path: Path, limit: int) -> bytes:
    try:
        return regularfile.read(path, limit)
    except OSError as e:
        raise KeyFileError(f"cannot read: {e.strerror or e}", item=str(path)) from None


def nix_conf_path() -> Path:
    return Path(os.environ.get("NIX_CONF_DIR", "/etc/nix")) / "nix.conf"


def load_roots(trusted: Sequence[str] = (), *, env: str | None = None,
               guix_acl: Path | None = None, nix_conf: Path | None = None) -> Roots:
    """Trust roots from `--trusted-key` values (a `NAME:base64` string, a Nix public key file,
    or a Guix `signing-key.pub`), INCSTORE_TRUSTED_KEYS (`env`: space-separated, like Nix's
    trusted-public-keys), a Guix ACL file and nix.conf. A root that is named but holds no key
    still makes trust active: nothing then verifies, which is what the user asked for."""
    if not (trusted or (env or "").split() or guix_acl or nix_conf):
        return Roots()
    from incstore import signature

    keys: list[PublicKey] = []
    sources: list[str] = []
    for value in [*trusted, *(env or "").split()]:
        path = Path(value)
        if ":" not in value or value.startswith(("/", ".", "~")) or path.is_file():
            data = _read_key_file(path.expanduser(), signature.MAX_KEY_FILE_BYTES)
            keys.append(signature.parse_public_key(data))
            sources.append(f"key file {value}")
        else:
            keys.append(signature.parse_public_key(value))
            sources.append(f"key {value.split(':', 1)[0]}")
    if guix_acl is not None:
        keys += signature.parse_guix_acl(_read_key_file(guix_acl, signature.MAX_ACL_BYTES))
        sources.append(f"Guix ACL {guix_acl}")
    if nix_conf is not None:
        text = _read_key_file(nix_conf, signature.MAX_NIX_CONF_BYTES).decode("utf-8", "replace")
        keys += signature.parse_nix_conf_keys(text)
        sources.append(f"nix.conf {nix_conf}")
    return Roots(tuple(keys), tuple(sources))


# manifest signatures -------------------------------------------------------------------


def manifest_statement(data: bytes) -> bytes:
    return STATEMENT + hashlib.sha256(data).hexdigest().encode() + b"\n"


def sign_manifest(secret: SecretKey, data: bytes) -> bytes:
    """The `.sig` file for a manifest's exact bytes."""
    from incstore import signature

    return (signature.sign_bytes(secret, manifest_statement(data)) + "\n").encode()


def manifest_signer(data: bytes, sig: bytes | None, roots: Roots) -> PublicKey | None:
    from incstore import signature

    if not sig or len(sig) > MAX_SIG_LINES * signature.MAX_SIGNATURE_BYTES:
        return None
    statement = manifest_statement(data)
    for line in sig.decode("ascii", "replace").splitlines()[:MAX_SIG_LINES]:
        key = signature.verify_bytes(line, statement, roots.keys)
        if key is not None:
            return key
    return None


# items ---------------------------------------------------------------------------------


def _nix_sigs_verify(sigs: Iterable[str], fingerprint: bytes, keys: Sequence[PublicKey]) -> bool:
    from incstore import signature

    return any(signature.nix_verify(s, fingerprint, keys) for s in sigs)


def item_vouched(manifest: Manifest, n: int, chunks: ChunkStore, roots: Roots
                 ) -> tuple[str | None, str | None]:
    """(None, deriver) if item `n` carries a signature by a trusted key over its path, NAR
    hash and size and references; else (why not, None). The deriver is the one a trusted
    Guix narinfo signature covers (it signs every field before it, `Deriver:` included, and
    the daemon registers that deriver when it substitutes the same narinfo); a Nix
    signature's fingerprint does not cover one."""
    from incstore import signature

    path = manifest.paths[n]
    nix_keys = [k for k in roots.keys if isinstance(k, signature.NixPublicKey)]
    guix_keys = [k for k in roots.keys if isinstance(k, signature.GuixPublicKey)]
    item = manifest.item(n)
    fingerprint = signature.nix_fingerprint(path, manifest.nar_hash(n), manifest.nar_size(n),
                                            manifest.references(n))
    if nix_keys and _nix_sigs_verify(item.sigs, fingerprint, nix_keys):
        return None, None
    key = manifest.chunk_key(n)
    texts = []
    for name in (chunks.narinfo_name(key),
                 *([chunks.upstream_name(key)] if item.upstream_narinfo else [])):
        try:
            texts.append(chunks.backend.read(name).decode("utf-8"))
        except (FileNotFoundError, IncstoreError, UnicodeDecodeError):
            continue
    for text in texts:
        sigs = [line[5:] for line in text.splitlines() if line.startswith("Sig: ")]
        if nix_keys and _nix_sigs_verify(sigs, fingerprint, nix_keys):
            return None, None
        if guix_keys and signature.guix_verify_narinfo(text, guix_keys) is not None and \
                describes(text, path, manifest.nar_hash(n), manifest.nar_size(n),
                          manifest.references(n)):
            return None, _signed_deriver(text, manifest.store_dir)
    return "no signature by a trusted key covers it", None


def _signed_deriver(text: str, store_dir: str) -> str | None:
    """The `Deriver:` of a signed Guix narinfo (a base name) as a store path, if it is a
    valid derivation name."""
    try:
        deriver = StorePath.parse(f"{store_dir}/{signed_fields(text).get('Deriver', '')}",
                                  store_dir)
    except ManifestError:
        return None
    return str(deriver) if deriver.is_derivation else None


@dataclass(frozen=True)
class Policy:
    """What a restore requires: the roots, and for manifests, which name and how fresh."""

    roots: Roots = field(default_factory=Roots)
    expected_name: str | None = None
    max_age: float | None = None  # seconds
    require_manifest: bool = False  # refuse rather than fall back to item signatures


@dataclass
class Verdict:
    """The outcome of checking a manifest and the items a restore would extract."""

    active: bool = False
    signer: str | None = None  # key that signed the manifest, if one did and it is trusted
    problem: str | None = None  # why the manifest is not trusted
    refused: dict[int, str] = field(default_factory=dict)  # item index -> reason
    # item index -> the deriver a trusted signature covers (items vouched for one by one)
    derivers: dict[int, str] = field(default_factory=dict)

    @property
    def per_item(self) -> bool:
        return self.active and self.signer is None

    def errors(self, manifest: Manifest) -> list[IncstoreError]:
        return [SignatureError(f"not trusted: {why}", item=manifest.paths[n])
                for n, why in sorted(self.refused.items())]

    def to_json(self, roots: Roots) -> dict[str, Any]:
        return {"active": self.active, **roots.to_json(), "manifest_signed_by": self.signer,
                "manifest_problem": self.problem, "refused": len(self.refused)}


def judge(policy: Policy, manifest: Manifest, data: bytes, sig: bytes | None,
          chunks: ChunkStore, indices: Iterable[int], *, now: float | None = None) -> Verdict:
    """Check the manifest, then (if it is not trusted) each of `indices` on its own."""
    if not policy.roots.active:
        return Verdict()
    verdict = Verdict(active=True)
    key = manifest_signer(data, sig, policy.roots)
    now = time.time() if now is None else now
    if key is not None:
        # a trusted signature on the wrong name or on a stale manifest is a replay: refuse it
        # whole rather than fall back to the items' own signatures
        if policy.expected_name is not None and manifest.name != policy.expected_name:
            raise SignatureError(f"the manifest was signed for the name {manifest.name!r}; "
                                 "refusing it under another name (a replay)",
                                 item=policy.expected_name)
        if policy.max_age is not None and now - _created(manifest) > policy.max_age:
            raise SignatureError(f"the signed manifest was created {manifest.created}, longer "
                                 "ago than --max-age (a rollback?)",
                                 item=manifest.name or "manifest")
        verdict.signer = describe(key)
        return verdict
    verdict.problem = "has no valid signature by a trusted key" if sig else "is not signed"
    if policy.require_manifest:
        raise SignatureError(f"manifest not trusted: {verdict.problem}",
                             item=manifest.name or "manifest")
    for n in indices:
        why, deriver = item_vouched(manifest, n, chunks, policy.roots)
        if why is not None:
            verdict.refused[n] = why
        elif deriver is not None:
            verdict.derivers[n] = deriver
    return verdict


def _created(manifest: Manifest) -> float:
    from incstore.manifest import saved_at

    return saved_at(manifest, 0)
