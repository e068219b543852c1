"""Store path: a validated absolute path `<store dir>/<32 nix-base32 chars>-<name>`.

A `StorePath` is the only way paths from a DB or a manifest enter the program, so every later
step may rely on the hash part being a safe chunk key and the name being a safe file name.
Also here: nix-base32, the encoding of store hashes and of narinfo hashes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from incstore.errors import ManifestError

NIX32_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
HASH_PART_LEN = 32
_NAME_RE = re.compile(r"[A-Za-z0-9+\-._?=]+")
_HASH_RE = re.compile(f"[{NIX32_ALPHABET}]{{{HASH_PART_LEN}}}")
_STORE_DIR_RE = re.compile(r"(/[A-Za-z0-9+\-._]+)+")
# A chunk key: a store hash part, optionally with a suffix that tells apart two different NARs
# of one store path (non-reproducible builds saved by different workflows).
KEY_RE = re.compile(f"[{NIX32_ALPHABET}]{{{HASH_PART_LEN}}}(\\.[{NIX32_ALPHABET}]{{8,52}})?")
MAX_NAME_LEN = 211  # Nix's limit: the base name must fit in 255 bytes with room for suffixes
# `<hash part>-<name>` as `StorePath.parse` accepts it, for readers that check many at once
STORE_NAME_PATTERN = (f"[{NIX32_ALPHABET}]{{{HASH_PART_LEN}}}-(?!\\.)"
                      f"[A-Za-z0-9+\\-._?=]{{1,{MAX_NAME_LEN}}}")


def nix32_encode(data: bytes) -> str:
    """Nix's base32: its own alphabet, little-endian bit order, most significant character first."""
    length = (len(data) * 8 - 1) // 5 + 1
    number = int.from_bytes(data, "little")
    return "".join(NIX32_ALPHABET[(number >> (5 * k)) & 31] for k in range(length - 1, -1, -1))


def nix32_decode(text: str) -> bytes:
    nbytes = len(text) * 5 // 8
    number = 0
    for char in text:
        digit = NIX32_ALPHABET.find(char)
        if digit < 0:
            raise ValueError(f"invalid nix-base32 character {char!r}")
        number = (number << 5) | digit
    if number >> (nbytes * 8):
        raise ValueError("nix-base32 value has excess bits")
    return number.to_bytes(nbytes, "little")


def validate_store_dir(store_dir: str) -> str:
    if not _STORE_DIR_RE.fullmatch(store_dir) or ".." in store_dir.split("/"):
        raise ManifestError(f"invalid store directory {store_dir!r}")
    return store_dir


@dataclass(frozen=True, order=True)
class StorePath:
    """A parsed store path; `str()` gives it back exactly as the daemon DB spells it."""

    store_dir: str
    hash_part: str
    name: str

    @classmethod
    def parse(cls, path: str, store_dir: str) -> StorePath:
        prefix = store_dir + "/"
        if not path.startswith(prefix):
            raise ManifestError(f"not in the store directory {store_dir}", item=path)
        base = path[len(prefix) :]
        hash_part, dash, name = base.partition("-")
        if (
            not dash
            or not _HASH_RE.fullmatch(hash_part)
            or not _NAME_RE.fullmatch(name)
            or name.startswith(".")
            or len(name) > MAX_NAME_LEN
        ):
            raise ManifestError("malformed store path", item=path)
        return cls(store_dir, hash_part, name)

    @property
    def basename(self) -> str:
        return f"{self.hash_part}-{self.name}"

    @property
    def is_derivation(self) -> bool:
        return self.name.endswith(".drv")

    def __str__(self) -> str:
        return f"{self.store_dir}/{self.hash_part}-{self.name}"
