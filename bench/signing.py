"""How long signing and checking take per item: incstore's pure-Python Guix signatures (ECDSA
over Ed25519's curve, as libgcrypt does it) and Nix's Ed25519, beside `openssl` signing the
same text when it is installed. A restore with trust roots checks one signature per item it
extracts, a signed save makes one per item it writes.

    python3 bench/signing.py [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from incstore import signature

TEXT = (
    "StorePath: /gnu/store/0000000000000000000000000000000a-hello-2.12\n"
    "NarHash: sha256:1sg9f58l1jj88w6pdrfdpj5x9b1zrwszk84j81zvby36q9whhhqa\n"
    "NarSize: 1234\n"
    "References: 0000000000000000000000000000000b-glibc-2.35\n"
)


def per_call(fn: object, rounds: int) -> float:
    assert callable(fn)
    fn(0)  # tables built once
    start = time.perf_counter()
    for i in range(rounds):
        fn(i)
    return (time.perf_counter() - start) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=50)
    rounds = parser.parse_args().rounds
    guix = signature.parse_secret_key(signature.generate_guix_key()[0])
    assert isinstance(guix, signature.GuixSecretKey)
    signed = signature.guix_sign_narinfo(guix, TEXT)
    rows = [
        ("guix sign (incstore)", per_call(
            lambda i: signature.guix_sign_narinfo(guix, TEXT + f"X-N: {i}\n"), rounds)),
        ("guix verify (incstore)", per_call(
            lambda i: signature.guix_verify_narinfo(signed, [guix.public_key]), rounds)),
    ]
    if shutil.which("openssl"):
        with tempfile.TemporaryDirectory() as tmp:
            key = Path(tmp) / "k.pem"
            subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)],
                           check=True, capture_output=True)
            (Path(tmp) / "t").write_text(TEXT)
            rows.append(("ed25519 sign (openssl process)", per_call(
                lambda i: subprocess.run(
                    ["openssl", "pkeyutl", "-sign", "-inkey", str(key), "-rawin", "-in",
                     str(Path(tmp) / "t")], check=True, capture_output=True),
                max(5, rounds // 10))))
    print("| operation | ms per item |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1000:.2f} |")


if __name__ == "__main__":
    main()
