from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from incstore.errors import ManifestError
from incstore.storepath import StorePath, nix32_decode, nix32_encode

from .conftest import needs_nix


def test_nix32_of_empty_sha256_is_the_known_value() -> None:
    # the nix32 sha256 of the empty string, as printed by `nix-hash --type sha256 --flat --base32`
    digest = hashlib.sha256(b"").digest()
    assert nix32_encode(digest) == "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"


@needs_nix
def test_nix32_agrees_with_nix_hash() -> None:
    for data in (b"a", b"incstore", bytes(range(256))):
        hexdigest = hashlib.sha256(data).hexdigest()
        out = subprocess.run([shutil.which("nix-hash") or "nix-hash", "--type", "sha256",
                              "--to-base32", hexdigest], capture_output=True, text=True, check=True)
        assert nix32_encode(bytes.fromhex(hexdigest)) == out.stdout.strip()


@given(st.binary(min_size=1, max_size=40))
def test_nix32_round_trip(data: bytes) -> None:
    assert nix32_decode(nix32_encode(data)) == data


def test_parse_valid_path() -> None:
    sp = StorePath.parse("/gnu/store/" + "a" * 32 + "-hello-2.12.1", "/gnu/store")
    assert sp.hash_part == "a" * 32
    assert sp.name == "hello-2.12.1"
    assert str(sp) == "/gnu/store/" + "a" * 32 + "-hello-2.12.1"
    assert not sp.is_derivation


@pytest.mark.parametrize(
    "path",
    [
        "/nix/store/" + "a" * 32 + "-x",  # another store
        "/gnu/store/" + "e" * 32 + "-x",  # 'e' is not in the alphabet
        "/gnu/store/" + "a" * 31 + "-x",
        "/gnu/store/" + "a" * 32 + "-",
        "/gnu/store/" + "a" * 32 + "-.hidden",
        "/gnu/store/" + "a" * 32 + "-x/../../etc",
        "/gnu/store/" + "a" * 32 + "-x/y",
        "/gnu/store/../etc/" + "a" * 32 + "-x",
        "/gnu/store/" + "a" * 32 + "-x\x00y",
        "/gnu/store/" + "a" * 32 + "-" + "n" * 212,
    ],
)
def test_parse_rejects_malformed_paths(path: str) -> None:
    with pytest.raises(ManifestError):
        StorePath.parse(path, "/gnu/store")
