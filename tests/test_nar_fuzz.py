"""Fuzz target for the NAR parser: mutated archives (flipped, cut, spliced, length-inflated)
must either restore to a tree whose NAR is the input, or fail with NarFormatError, and never
write outside the directory they are restored into. Bounded: a fixed number of examples."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from incstore import nar
from incstore.errors import NarFormatError

from .test_nar import archive, encode, restore_bytes, trees

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("length"), st.integers(0, 10_000), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("splice"), st.integers(0, 10_000), st.sampled_from(
        [b"..", b"/", b".", b"", b"../../etc/passwd", b"a\0b"])),
)


def mutate(data: bytes, ops: list[tuple]) -> bytes:  # type: ignore[type-arg]
    buf = bytearray(data)
    for op in ops:
        at = op[1] % max(1, len(buf))
        if op[0] == "flip":
            if buf:
                buf[at] ^= op[2]
        elif op[0] == "cut":
            del buf[at:]
        elif op[0] == "insert":
            buf[at:at] = op[2]
        elif op[0] == "length":
            at -= at % 8
            buf[at : at + 8] = op[2].to_bytes(8, "little")
        else:
            at -= at % 8
            name = op[2]
            buf[at:at] = len(name).to_bytes(8, "little") + name + b"\0" * ((8 - len(name) % 8) % 8)
    return bytes(buf)


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(tree=trees, ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_nars_never_crash_or_escape(tree: tuple, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    data = mutate(archive(encode(tree)), ops)
    base = Path(tempfile.mkdtemp(prefix="incstore-fuzz-"))
    try:
        jail = base / "jail"
        jail.mkdir()
        try:
            digest = restore_bytes(data, jail / "item")
        except NarFormatError as e:
            assert "\n" not in str(e)
        else:
            assert nar.dump_bytes(jail / "item") == data
            assert digest.size == len(data)
        assert sorted(os.listdir(base)) == ["jail"]
        assert os.listdir(jail) in ([], ["item"])
    finally:
        for root, dirs, _ in os.walk(base):
            for d in dirs:
                if not os.path.islink(os.path.join(root, d)):
                    os.chmod(os.path.join(root, d), 0o700)
        shutil.rmtree(base)
