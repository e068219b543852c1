"""A many-small-items, Guix-shaped store built from this machine's own files, for the bench.

Real Guix stores that CI caches hold thousands of items, most of them tiny, and most of the
bytes in a few: one a user measured has 2,076 items, 565 MB of NAR and about 33,000 files. This
module builds stores of that shape, with the item count as a parameter:

- **Large items**, a fixed set whatever the count (`LargeSpec`): real shared libraries, groups
  of real binaries, and real Python module trees from this machine, laid out as Guix outputs
  (`lib/`, `bin/`, `lib/python3.11/site-packages/`).
- **Small items**, as many as the count asks, generated in "units" the way Guix makes them:
  a package's `.drv` (an ATerm derivation naming its input derivations, sources and outputs,
  with its DerivationOutputs rows), its `-builder` script, patches, its output when built (a
  wrapper script, a slice of a real binary, a real man page, real licence and source texts),
  fixed-output source derivations, `module-import`/`-compiled` trees, `-guile-builder` files,
  single source files, and profiles (`manifest`, `etc/profile`, a symlink forest into other
  items) with their hook outputs (`ca-certificate-bundle`, `info-dir`, ...).

References form a DAG (an item only references earlier ones; outputs often reference
themselves), outputs name their `.drv` as deriver, and everything is registered in a daemon DB
created from the real Guix schema 7 with true NAR sha256 and sizes (bench/daemondb.py,
bench/narhash.py). Item `i` depends only on the seed and on items before it, so the store of N
items is the first N items of any larger one.

Building is deterministic for a seed on a given machine. `cached(spec)` keeps each built store
under bench/out/stores/, keyed by its parameters; the large items are built once and hard-linked
into every store.

    python3 bench/guixstore.py --items 2076      # build (or reuse) and print its shape
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import daemondb, narhash
from bench.daemondb import Registration

# Bump when the generator changes what it writes: cached stores are keyed by it.
GENERATOR = 1
OUT = Path(__file__).resolve().parent / "out"
STORES = OUT / "stores"
STORE_DIR = "/gnu/store"
T0 = 1_700_000_000
NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
PYTHON_LIB = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"


def nix32(data: bytes) -> str:
    """Nix's base32 (its alphabet, little-endian bit order), as store hash parts use."""
    n = int.from_bytes(data, "little")
    length = (len(data) * 8 - 1) // 5 + 1
    return "".join(NIX32[(n >> (5 * k)) & 31] for k in range(length - 1, -1, -1))


def store_path(rng: random.Random, name: str) -> str:
    return f"{STORE_DIR}/{nix32(rng.randbytes(20))}-{name}"


# -- canonical writes --------------------------------------------------------------------------

def _file(path: Path, data: bytes, executable: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o555 if executable else 0o444)
    os.utime(path, (1, 1))


def _link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)
    os.utime(path, (1, 1), follow_symlinks=False)


def _seal(root: Path) -> None:
    """Canonical metadata on a finished item's directories (0555, mtime 1), deepest first, so
    writing under them is done before they turn read-only."""
    if root.is_symlink() or not root.is_dir():
        return
    for dirpath, _dirs, _files in os.walk(root, topdown=False):
        os.chmod(dirpath, 0o555)
        os.utime(dirpath, (1, 1))


def canonicalise(root: Path) -> None:
    """Canonical metadata on a copied tree: files 0444 or 0555, directories 0555, mtime 1."""
    for dirpath, dirs, files in os.walk(root, topdown=False):
        for name in files + dirs:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if not stat.S_ISLNK(st.st_mode) and not stat.S_ISDIR(st.st_mode):
                os.chmod(full, 0o555 if st.st_mode & stat.S_IXUSR else 0o444)
            os.utime(full, (1, 1), follow_symlinks=False)
    _seal(root)


def _count_entries(root: Path) -> int:
    if root.is_symlink() or not root.is_dir():
        return 1
    return 1 + sum(len(d) + len(f) for _, d, f in os.walk(root))


# -- material from this machine ----------------------------------------------------------------

class Pools:
    """Real files of this machine the small items are made of, in a stable order."""

    @cached_property
    def texts(self) -> list[Path]:
        """Source texts: the Python standard library and C headers, under 12 KB."""
        found = [p for top in sorted(PYTHON_LIB.iterdir())
                 if top.name not in ("site-packages", "test", "idlelib")
                 for p in ([top] if top.suffix == ".py" else top.rglob("*.py"))
                 if "test" not in p.parts and "tests" not in p.parts]
        found += list(Path("/usr/include").rglob("*.h"))
        return sorted(p for p in found if p.is_file() and not p.is_symlink()
                      and 300 < p.stat().st_size < 12_000)

    @cached_property
    def manpages(self) -> list[Path]:
        man = Path("/usr/share/man")
        return sorted(p for p in man.glob("man[1-8]/*.gz") if p.is_file()
                      and not p.is_symlink() and p.stat().st_size < 16_000)

    @cached_property
    def binaries(self) -> list[Path]:
        return sorted(p for p in Path("/usr/bin").iterdir() if p.is_file()
                      and not p.is_symlink() and 20_000 < p.stat().st_size < 2_000_000)

    @cached_property
    def licences(self) -> list[Path]:
        lic = Path("/usr/share/common-licenses")
        return sorted(p for p in lic.iterdir() if p.is_file() and not p.is_symlink()) \
            if lic.is_dir() else []

    @cached_property
    def packages(self) -> list[tuple[str, str]]:
        """(name, version) of this machine's Debian packages, spelled as store names."""
        out: list[tuple[str, str]] = []
        status = Path("/var/lib/dpkg/status")
        text = status.read_text(errors="replace") if status.exists() else ""
        for block in text.split("\n\n"):
            fields = dict(re.findall(r"^(Package|Version): (.+)$", block, re.M))
            if "Package" not in fields or "Version" not in fields:
                continue
            version = fields["Version"].split(":")[-1].split("-")[0].split("+")[0]
            version = re.sub(r"[^A-Za-z0-9.]", ".", version).strip(".") or "1.0"
            out.append((re.sub(r"[^A-Za-z0-9+._-]", "-", fields["Package"]), version))
        return sorted(set(out)) or [(f"pkg{i}", f"1.{i}") for i in range(500)]

    @cached_property
    def certificates(self) -> bytes:
        bundle = Path("/etc/ssl/certs/ca-certificates.crt")
        return bundle.read_bytes() if bundle.exists() else b"-----BEGIN CERTIFICATE-----\n"

    def text(self, rng: random.Random, limit: int = 12_000) -> bytes:
        data = rng.choice(self.texts).read_bytes() if self.texts else b"text\n" * 100
        return data[:limit]

    def elf(self, rng: random.Random, size: int) -> bytes:
        """`size` bytes from a real binary: compresses like compiled code does."""
        data = rng.choice(self.binaries).read_bytes()
        start = rng.randrange(0, max(1, len(data) - size))
        return data[start : start + size]

    def manpage(self, rng: random.Random) -> bytes:
        return rng.choice(self.manpages).read_bytes() if self.manpages else b"\x1f\x8b"

    def licence(self, rng: random.Random) -> bytes:
        return rng.choice(self.licences).read_bytes() if self.licences else b"GPL\n"


POOLS = Pools()


# -- large items -------------------------------------------------------------------------------

@dataclass(frozen=True)
class LargeSpec:
    """The fixed set of large items: how many bytes and files they hold at most."""

    nar_bytes: int = 541_000_000
    files: int = 26_500
    max_items: int = 40
    max_item_bytes: int = 120 << 20
    min_item_bytes: int = 3 << 20


@dataclass(frozen=True)
class _Candidate:
    name: str
    kind: str  # "lib", "tools" or "py"
    sources: tuple[Path, ...]


def _tree_stats(path: Path) -> tuple[int, int]:
    """(bytes, entries) of a file or tree, leaving out compiled Python as the copy does."""
    if path.is_file():
        return path.stat().st_size, 1
    size = count = 0
    for dirpath, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        count += len(dirs) + len(files)
        size += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in files
                    if not f.endswith(".pyc"))
    return size, count


def _candidates() -> list[_Candidate]:
    out: list[_Candidate] = []
    for lib_dir in (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu")):
        if lib_dir.is_dir():
            for p in sorted(lib_dir.iterdir()):
                if p.is_file() and not p.is_symlink() and ".so" in p.name:
                    stem, _, ver = p.name.partition(".so")
                    out.append(_Candidate(f"{stem}-{ver.strip('.') or '1.0'}", "lib", (p,)))
    bins = sorted(p for p in Path("/usr/bin").iterdir()
                  if p.is_file() and not p.is_symlink() and p.stat().st_size > 100_000)
    for i in range(0, len(bins), 6):
        out.append(_Candidate(f"{bins[i].name}-tools-{i // 6}.0", "tools", tuple(bins[i : i + 6])))
    site = PYTHON_LIB / "site-packages"
    trees = [p for p in sorted(site.iterdir()) if p.is_dir()
             and not p.name.endswith((".dist-info", ".egg-info")) and p.name != "__pycache__"]
    trees += [p for p in sorted(PYTHON_LIB.iterdir()) if p.is_dir() and p.name not in
              ("site-packages", "test", "__pycache__") and not p.name.startswith("config-")]
    out += [_Candidate(f"python-{p.name.lower()}-1.0", "py", (p,)) for p in trees]
    return [c for c in out if re.fullmatch(r"[A-Za-z0-9+._-]+", c.name)]


def _choose_large(spec: LargeSpec, seed: int) -> list[tuple[_Candidate, int, int]]:
    """A seeded, greedy pick of candidates filling the byte and file budgets."""
    cands = _candidates()
    random.Random(f"{seed}/large").shuffle(cands)
    chosen: list[tuple[_Candidate, int, int]] = []
    nbytes = files = 0
    for cand in cands:
        if len(chosen) == spec.max_items or spec.nar_bytes - nbytes < spec.min_item_bytes:
            break
        size, count = map(sum, zip(*(_tree_stats(s) for s in cand.sources), strict=True))
        if not spec.min_item_bytes <= size <= spec.max_item_bytes:
            continue
        if nbytes + size > spec.nar_bytes or files + count > spec.files:
            continue
        chosen.append((cand, size, count))
        nbytes += size
        files += count
    return chosen


def _copy_large(cand: _Candidate, dest: Path, rng: random.Random) -> None:
    dest.mkdir()
    for src in cand.sources:
        if cand.kind == "py":
            target = dest / "lib" / PYTHON_LIB.name / "site-packages" / src.name
            shutil.copytree(src, target, symlinks=True,
                            ignore=shutil.ignore_patterns("*.pyc", "__pycache__"))
        elif cand.kind == "lib":
            (dest / "lib").mkdir(exist_ok=True)
            shutil.copyfile(src, dest / "lib" / src.name)
            os.chmod(dest / "lib" / src.name, 0o555)
            link = src.name.split(".so")[0] + ".so"
            if link != src.name:
                os.symlink(src.name, dest / "lib" / link)
        else:
            (dest / "bin").mkdir(exist_ok=True)
            shutil.copyfile(src, dest / "bin" / src.name)
            os.chmod(dest / "bin" / src.name, 0o555)
    doc = dest / "share" / "doc" / cand.name
    doc.mkdir(parents=True)
    (doc / "COPYING").write_bytes(POOLS.licence(rng))
    canonicalise(dest)


def _exposed(root: Path) -> list[str]:
    """Relative paths a profile may link to: the item's bin/, lib/ and share/doc entries."""
    out: list[str] = []
    for sub in ("bin", "lib", "share/doc"):
        d = root / sub
        if d.is_dir():
            out += sorted(f"{sub}/{n}" for n in os.listdir(d))[:12]
    return out


@dataclass
class LargeSet:
    """The built large items: where they are and how they are registered."""

    root: Path  # a prefix holding gnu/store/<items>
    items: list[Registration]
    exposed: dict[str, list[str]]
    entries: int


def large_set(spec: LargeSpec, seed: int) -> LargeSet:
    """Build the large items once (bench/out/stores/large-*) and reuse them afterwards."""
    key = hashlib.sha256(repr((GENERATOR, seed, spec)).encode()).hexdigest()[:12]
    root = STORES / f"large-{key}"
    index = root / "large.json"
    if not index.exists():
        tmp = root.with_name(root.name + ".tmp")
        daemondb.remove_tree(tmp)
        store = tmp / STORE_DIR.lstrip("/")
        store.mkdir(parents=True)
        rng = random.Random(f"{seed}/large-items")
        regs: list[dict[str, object]] = []
        exposed: dict[str, list[str]] = {}
        entries = 0
        for n, (cand, _size, _count) in enumerate(_choose_large(spec, seed)):
            path = store_path(rng, cand.name)
            physical = store / path.rsplit("/", 1)[1]
            _copy_large(cand, physical, rng)
            earlier = [str(r["path"]) for r in regs]
            refs = set(rng.sample(earlier, min(len(earlier), rng.randint(0, 4))))
            if rng.random() < 0.5:
                refs.add(path)  # RUNPATHs and shebangs make many outputs name themselves
            nar_hash, nar_size = narhash.digest(physical)
            regs.append(asdict(Registration(path, nar_hash, nar_size, T0 + n, None,
                                            tuple(sorted(refs)))))
            exposed[path] = _exposed(physical)
            entries += _count_entries(physical)
        (tmp / "large.json").write_text(json.dumps(
            {"items": regs, "exposed": exposed, "entries": entries}, indent=1))
        daemondb.remove_tree(root)
        os.rename(tmp, root)
    doc = json.loads(index.read_text())
    items = [Registration(**{**r, "references": tuple(r["references"]),
                             "outputs": tuple(map(tuple, r["outputs"]))}) for r in doc["items"]]
    return LargeSet(root, items, doc["exposed"], doc["entries"])


def _hardlink_tree(src: Path, dest: Path) -> None:
    """Copy a canonical tree by hard-linking its files: instant, and no extra disk."""
    if src.is_symlink():
        _link(dest, os.readlink(src))
        return
    if src.is_file():
        os.link(src, dest)
        return
    for dirpath, dirs, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dest / rel).mkdir()
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            s = os.path.join(dirpath, name)
            if os.path.islink(s):
                _link(dest / rel / name, os.readlink(s))
            else:
                os.link(s, dest / rel / name)
    _seal(dest)


# -- small items -------------------------------------------------------------------------------

class _Full(Exception):
    """The store has all the items it was asked for."""


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def aterm(outputs: list[tuple[str, str, str, str]], input_drvs: list[tuple[str, list[str]]],
          input_srcs: list[str], builder: str, args: list[str],
          env: list[tuple[str, str]]) -> bytes:
    """A derivation in the ATerm form Guix and Nix write to `.drv` files."""
    outs = ",".join(f"({_q(i)},{_q(p)},{_q(a)},{_q(h)})" for i, p, a, h in sorted(outputs))
    drvs = ",".join(f"({_q(p)},[{','.join(map(_q, sorted(o)))}])" for p, o in sorted(input_drvs))
    srcs = ",".join(map(_q, sorted(input_srcs)))
    env_s = ",".join(f"({_q(k)},{_q(v)})" for k, v in sorted(env))
    return (f"Derive([{outs}],[{drvs}],[{srcs}],{_q('x86_64-linux')},{_q(builder)},"
            f"[{','.join(map(_q, args))}],[{env_s}])").encode()


_HOOKS = ["ca-certificate-bundle", "info-dir", "fonts-dir", "manual-database", "glib-schemas",
          "gtk-icon-themes", "xdg-desktop-database", "xdg-mime-database", "emacs-subdirs",
          "gdk-pixbuf-loaders", "texlive-configuration", "ghc-package-cache"]
_MODULES = ["guix/build/utils", "guix/build/gnu-build-system", "guix/build/gremlin",
            "guix/elf", "guix/build/syscalls", "guix/build/union", "guix/records",
            "guix/build/python-build-system", "guix/build/cmake-build-system", "guix/search-paths",
            "guix/build/glib-or-gtk-build-system", "gnu/build/linux-container", "guix/sets",
            "guix/build/copy-build-system", "guix/build/profiles", "guix/diagnostics",
            "guix/i18n", "guix/colors", "guix/memoization", "guix/build/meson-build-system",
            "gnu/build/install", "guix/build/bournish", "guix/build/json", "guix/base32"]
# What a unit of the store is, and how often: tuned so that a 2,076-item store has the shape
# of the one a user measured (most items under 10 KB, ~16 files per item counting large ones).
_UNITS = {"package": 40, "origin": 14, "patch": 8, "guile_builder": 7, "source": 8,
          "modules": 5, "profile": 5}


@dataclass
class _Gen:
    """Generates small items unit by unit, each unit from its own seeded generator."""

    seed: int
    store: Path
    count: int
    regs: list[Registration]
    exposed: dict[str, list[str]]
    outputs: list[str] = field(default_factory=list)  # runtime-referenceable items
    drvs: list[str] = field(default_factory=list)
    core: list[str] = field(default_factory=list)  # the outputs nearly everything uses
    entries: int = 0

    def run(self) -> None:
        self.outputs = [r.path for r in self.regs]
        self.core = self.outputs[:6]
        unit = 0
        kinds, weights = list(_UNITS), list(_UNITS.values())
        try:
            # the bootstrap unit: what every fixed-output derivation names
            rng = random.Random(f"{self.seed}/unit-boot")
            self.mirrors = self._single(rng, "mirrors", b"((gnu \"https://ftpmirror.gnu.org/\""
                                        b" \"https://ftp.gnu.org/gnu/\"))\n", [])
            self.camirrors = self._single(rng, "content-addressed-mirrors",
                                          POOLS.text(rng, 3000), [])
            while True:
                rng = random.Random(f"{self.seed}/unit-{unit}")
                unit += 1
                getattr(self, "_" + rng.choices(kinds, weights)[0])(rng)
        except _Full:
            pass

    # -- primitives --

    def _add(self, path: str, write: Callable[[Path], None], refs: list[str],
             deriver: str | None = None, outputs: tuple[tuple[str, str], ...] = ()) -> str:
        if len(self.regs) >= self.count:
            raise _Full
        physical = self.store / path.rsplit("/", 1)[1]
        write(physical)
        _seal(physical)
        nar_hash, nar_size = narhash.digest(physical)
        self.regs.append(Registration(path, nar_hash, nar_size, T0 + len(self.regs), deriver,
                                      tuple(sorted(set(refs))), outputs))
        self.entries += _count_entries(physical)
        return path

    def _single(self, rng: random.Random, name: str, data: bytes, refs: list[str],
                executable: bool = False) -> str:
        path = store_path(rng, name)
        return self._add(path, lambda p: _file(p, data, executable), refs)

    def _pick(self, rng: random.Random, pool: list[str], lo: int, hi: int) -> list[str]:
        """Some earlier items, biased to recent ones as a build graph's inputs are."""
        if not pool:
            return []
        k = min(len(pool), rng.randint(lo, hi))
        recent = pool[-200:]
        return sorted({rng.choice(recent) if rng.random() < 0.6 else rng.choice(pool)
                       for _ in range(k)})

    def _runtime(self, rng: random.Random, lo: int, hi: int) -> list[str]:
        core = [rng.choice(self.core)] if self.core and rng.random() < 0.8 else []
        return sorted(set(core + self._pick(rng, self.outputs, lo, hi)))

    def _drv(self, rng: random.Random, name: str, outputs: list[tuple[str, str]],
             input_drvs: list[str], input_srcs: list[str], builder_file: str | None,
             extra_env: tuple[tuple[str, str], ...] = (), fixed: str | None = None) -> str:
        """A `.drv` item; `outputs` are (id, path) and need not be in the store."""
        guile = (self.core[0] if self.core else f"{STORE_DIR}/guile") + "/bin/guile"
        if fixed is not None:
            outs = [("out", outputs[0][1], "sha256", fixed)]
            builder, args = "builtin:download", []
        else:
            outs = [(i, p, "", "") for i, p in outputs]
            builder = guile
            args = ["--no-auto-compile", builder_file] if builder_file else ["-c", "(exit 0)"]
        env = [*outputs, *extra_env]
        drv_inputs = [(d, ["out"]) for d in input_drvs]
        text = aterm(outs, drv_inputs, input_srcs + ([builder_file] if builder_file else []),
                     builder, args, env)
        path = store_path(rng, f"{name}.drv")
        refs = input_drvs + input_srcs + ([builder_file] if builder_file else [])
        self._add(path, lambda p: _file(p, text), refs, outputs=tuple(sorted(outputs)))
        self.drvs.append(path)
        return path

    # -- units --

    def _name(self, rng: random.Random) -> tuple[str, str]:
        return rng.choice(POOLS.packages)

    def _patch(self, rng: random.Random, name: str | None = None) -> str:
        pkg = name or self._name(rng)[0]
        topic = rng.choice(["fix-build", "CVE-2023-" + str(rng.randint(1000, 49999)),
                            "gcc-14", "reproducible", "search-paths", "no-network-tests",
                            "python-3.11", "skip-tests", "riscv64-support", "glibc-2.38"])
        source = POOLS.text(rng, 9000).decode(errors="replace").splitlines()
        hunks = [f"Fix {topic} for Guix.\n", f"--- a/{pkg}/src/main.c",
                 f"+++ b/{pkg}/src/main.c"]
        at = 0
        while at < len(source) - 8 and len(hunks) < 200:
            at += rng.randint(5, 60)
            ctx = source[at : at + 6]
            hunks.append(f"@@ -{at},6 +{at},7 @@")
            hunks += [" " + ln for ln in ctx[:3]]
            hunks += ["-" + ln for ln in ctx[3:4]]
            hunks += ["+" + ln.replace("usr", "gnu/store") for ln in ctx[3:4]]
            hunks += ["+" + f"/* {topic} */"]
            hunks += [" " + ln for ln in ctx[4:6]]
        return self._single(rng, f"{pkg}-{topic}.patch", ("\n".join(hunks) + "\n").encode(), [])

    def _builder_text(self, rng: random.Random, name: str, ver: str, mentions: list[str]) -> bytes:
        inputs = " ".join(f'(cons "{m.split("-", 1)[1]}" "{m}")' for m in mentions)
        flags = " ".join(f'"--{rng.choice(["enable", "disable", "with", "without"])}-'
                         f'{rng.choice(["nls", "static", "shared", "tests", "docs", "gtk"])}"'
                         for _ in range(rng.randint(0, 6)))
        return (f"(begin (use-modules (guix build gnu-build-system) (guix build utils) "
                f"(srfi srfi-1)) (define %outputs (list (cons \"out\" ((@ (guile) getenv) "
                f"\"out\")))) (gnu-build #:name \"{name}-{ver}\" #:source (assoc-ref %build-inputs "
                f"\"source\") #:system \"x86_64-linux\" #:outputs %outputs #:inputs (list "
                f"{inputs}) #:search-paths '() #:phases %standard-phases #:locale "
                f"\"C.UTF-8\" #:configure-flags (list {flags}) #:make-flags '() #:out-of-source? "
                f"#f #:tests? #{'t' if rng.random() < 0.7 else 'f'} #:parallel-build? #t "
                f"#:strip-binaries? #t #:validate-runpath? #t))\n").encode()

    def _output_tree(self, rng: random.Random, root: Path, path: str, name: str, ver: str,
                     refs: list[str]) -> list[str]:
        """A built package's output: one of a few real-looking layouts; returns what a profile
        may link to."""
        shape = rng.choices(["tool", "lib", "data", "python"], [35, 25, 20, 20])[0]
        shell = (refs[0] if refs else path) + "/bin/bash"
        doc = root / "share" / "doc" / f"{name}-{ver}"
        if rng.random() < 0.6:
            _file(doc / rng.choice(["COPYING", "LICENSE", "README", "NEWS"]),
                  POOLS.licence(rng) if rng.random() < 0.5 else POOLS.text(rng, 6000))
        if shape == "tool":
            wrapper = (f"#!{shell}\nexport PATH=\"{':'.join(r + '/bin' for r in refs)}"
                       f"${{PATH:+:}}$PATH\"\nexec -a \"$0\" \"{path}/bin/.{name}-real\" "
                       f"\"$@\"\n").encode()
            _file(root / "bin" / name, wrapper, executable=True)
            _file(root / "bin" / f".{name}-real", POOLS.elf(rng, rng.randint(3_000, 40_000)),
                  executable=True)
            _file(root / "share" / "man" / "man1" / f"{name}.1.gz", POOLS.manpage(rng))
        elif shape == "lib":
            so = f"lib{name}.so.{ver.split('.')[0]}"
            _file(root / "lib" / f"{so}.0.0", POOLS.elf(rng, rng.randint(4_000, 60_000)), True)
            _link(root / "lib" / so, f"{so}.0.0")
            _link(root / "lib" / f"lib{name}.so", f"{so}.0.0")
            _file(root / "include" / f"{name}.h", POOLS.text(rng, 8000))
            _file(root / "lib" / "pkgconfig" / f"{name}.pc",
                  f"prefix={path}\nlibdir=${{prefix}}/lib\nincludedir=${{prefix}}/include\n\n"
                  f"Name: {name}\nVersion: {ver}\nLibs: -L${{libdir}} -l{name}\n".encode())
        elif shape == "data":
            share = root / "share" / name
            for i in range(rng.randint(1, 20)):
                _file(share / f"{name}-{i}.{rng.choice(['scm', 'el', 'txt', 'xml'])}",
                      POOLS.text(rng, rng.randint(300, 5000)))
        else:
            site = root / "lib" / PYTHON_LIB.name / "site-packages"
            mod = name.replace("-", "_").replace(".", "_")
            for i in range(rng.randint(1, 24)):
                _file(site / mod / ("__init__.py" if i == 0 else f"mod{i}.py"),
                      POOLS.text(rng, rng.randint(200, 8000)))
            info = site / f"{mod}-{ver}.dist-info"
            _file(info / "METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n"
                  .encode())
            _file(info / "top_level.txt", f"{mod}\n".encode())
        return _exposed(root)

    def _package(self, rng: random.Random) -> None:
        name, ver = self._name(rng)
        patches = [self._patch(rng, name) for _ in range(rng.choice([0, 0, 0, 1, 1, 2]))]
        source_drv = self._origin(rng, name, ver)
        runtime = self._runtime(rng, 1, 5)
        builder = self._single(rng, f"{name}-{ver}-builder",
                               self._builder_text(rng, name, ver, runtime), runtime)
        outputs = [("out", store_path(rng, f"{name}-{ver}"))]
        for extra in ("doc", "lib", "debug", "static"):
            if rng.random() < 0.06:
                outputs.append((extra, store_path(rng, f"{name}-{ver}-{extra}")))
        inputs = sorted({*self._pick(rng, self.drvs, 2, 14), source_drv})
        drv = self._drv(rng, f"{name}-{ver}", outputs, inputs, patches, builder,
                        (("name", f"{name}-{ver}"),))
        if rng.random() < 0.55:  # built (or substituted): its outputs are in the store
            for oid, opath in outputs:
                refs = runtime + ([opath] if rng.random() < 0.4 else [])
                if oid != "out":
                    refs = [r for r in refs if r != opath][:1]
                shown: list[str] = []

                def write(p: Path, opath: str = opath, refs: list[str] = refs,
                          shown: list[str] = shown) -> None:
                    p.mkdir()
                    shown += self._output_tree(rng, p, opath, name, ver, refs)

                self._add(opath, write, refs, deriver=drv)
                self.exposed[opath] = shown
                self.outputs.append(opath)

    def _origin(self, rng: random.Random, name: str | None = None,
                ver: str | None = None) -> str:
        """A fixed-output source derivation; its tarball is sometimes in the store too."""
        if name is None or ver is None:
            name, ver = self._name(rng)
        tarball = f"{name}-{ver}.tar.{rng.choice(['gz', 'xz', 'bz2'])}"
        out = store_path(rng, tarball)
        sha = rng.randbytes(32).hex()
        drv = self._drv(rng, tarball, [("out", out)], [], [self.mirrors, self.camirrors], None,
                        (("url", f'"mirror://gnu/{name}/{tarball}"'), ("preferLocalBuild", "1"),
                         ("impureEnvVars", "http_proxy https_proxy LC_ALL LC_MESSAGES LANG"),
                         ("mirrors", self.mirrors),
                         ("content-addressed-mirrors", self.camirrors)), fixed=sha)
        if rng.random() < 0.12:
            data = b"".join(POOLS.manpage(rng) for _ in range(rng.randint(1, 40)))
            self._add(out, lambda p: _file(p, data), [], deriver=drv)
            self.outputs.append(out)
        return drv

    def _guile_builder(self, rng: random.Random) -> None:
        name, ver = self._name(rng)
        mentions = self._runtime(rng, 0, 3)
        text = (f"(begin (use-modules (guix build utils)) (mkdir-p %output) (copy-recursively "
                f"\"{mentions[0] if mentions else STORE_DIR}\" %output) (setenv \"PATH\" "
                f"\"{':'.join(m + '/bin' for m in mentions)}\") (invoke \"{name}\" "
                f"\"--version\"))\n").encode()
        kind = rng.choice(["guile-builder", "builder", "check-builder"])
        builder = self._single(rng, f"{name}-{ver}-{kind}", text, mentions)
        if rng.random() < 0.5:
            self._drv(rng, f"{name}-{ver}-check", [("out", store_path(rng, f"{name}-check"))],
                      self._pick(rng, self.drvs, 1, 4), [], builder)

    def _source(self, rng: random.Random) -> None:
        path = rng.choice(POOLS.texts) if POOLS.texts else Path("x.scm")
        name = re.sub(r"[^A-Za-z0-9+._-]", "-", path.name)
        self._single(rng, name, POOLS.text(rng), [], executable=rng.random() < 0.1)

    def _modules(self, rng: random.Random) -> None:
        mods = rng.sample(_MODULES, rng.randint(3, 14))

        def tree(suffix: str, compiled: bool) -> Callable[[Path], None]:
            def write(p: Path) -> None:
                p.mkdir()
                for m in mods:
                    data = (POOLS.elf(rng, rng.randint(2_000, 30_000)) if compiled
                            else POOLS.text(rng, rng.randint(1_000, 12_000)))
                    _file(p / f"{m}{suffix}", data)
            return write

        src = self._add(store_path(rng, "module-import"), tree(".scm", False), [])
        out = store_path(rng, "module-import-compiled")
        drv = self._drv(rng, "module-import-compiled", [("out", out)],
                        self._pick(rng, self.drvs, 1, 3), [src], None)
        self._add(out, tree(".go", True), [], deriver=drv)

    def _profile(self, rng: random.Random) -> None:
        packages = [p for p in self._pick(rng, self.outputs, 3, 40) if self.exposed.get(p)]
        hooks = []
        for hook in rng.sample(_HOOKS, rng.randint(2, 5)):
            out = store_path(rng, hook)
            drv = self._drv(rng, hook, [("out", out)], self._pick(rng, self.drvs, 1, 3), [],
                            None)
            data = (POOLS.certificates if hook == "ca-certificate-bundle"
                    else POOLS.text(rng, rng.randint(200, 6000)))
            sub = {"ca-certificate-bundle": "etc/ssl/certs/ca-certificates.crt",
                   "info-dir": "share/info/dir", "manual-database": "share/man/index.db",
                   "fonts-dir": "share/fonts/truetype/fonts.dir"}.get(hook, f"share/{hook}/cache")

            def write_hook(p: Path, sub: str = sub, data: bytes = data) -> None:
                _file(p / sub, data)

            self._add(out, write_hook, [], deriver=drv)
            self.exposed[out] = [sub]
            hooks.append(out)
        entries = "\n".join(
            f'     ("{p.split("-", 1)[1].rsplit("-", 1)[0]}"\n      "{p.rsplit("-", 1)[-1]}"\n'
            f'      "out"\n      "{p}"\n      (propagated-inputs ())\n      (search-paths ())\n'
            f"      (properties ()))" for p in packages)
        manifest = (";; This file was automatically generated and is for internal use only.\n"
                    ";; It cannot be passed to the '--manifest' option.\n\n(manifest\n"
                    f"  (version 4)\n  (packages\n    ({entries.strip()})))\n").encode()
        out = store_path(rng, "profile")

        def write(p: Path) -> None:
            p.mkdir()
            _file(p / "manifest", manifest)
            _file(p / "etc" / "profile", (
                "# Source this file to define all the relevant environment variables in Bash\n"
                f"# for this profile.\nGUIX_PROFILE=\"{out}\" ; \\\n"
                f"export PATH=\"${{GUIX_PROFILE:-{out}}}/bin${{PATH:+:}}$PATH\"\n"
                f"export INFOPATH=\"${{GUIX_PROFILE:-{out}}}/share/info\"\n").encode())
            # a union of the packages' trees, as Guix's profile builder makes it: a link
            # per entry, never one inside a directory that is already a link
            made: set[str] = set()
            for pkg in [*packages, *hooks]:
                for rel in self.exposed.get(pkg, []):
                    parts = rel.split("/")
                    ancestors = {"/".join(parts[:i]) for i in range(1, len(parts))}
                    if rel in made or ancestors & made or any(
                            m.startswith(rel + "/") for m in made):
                        continue
                    made.add(rel)
                    _link(p / rel, f"{pkg}/{rel}")

        manifest_drv = self._drv(rng, "profile", [("out", out)],
                                 self._pick(rng, self.drvs, 2, 6), [], None)
        self._add(out, write, [*packages, *hooks], deriver=manifest_drv)


# -- the store ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoreSpec:
    """What to build: the item count, the seed, and the fixed large items."""

    items: int
    seed: int = 7
    large: LargeSpec = LargeSpec()

    def key(self) -> str:
        digest = hashlib.sha256(repr((GENERATOR, self)).encode()).hexdigest()[:10]
        return f"guix-{self.items}-s{self.seed}-{digest}"


@dataclass(frozen=True)
class Summary:
    """The shape of a built store."""

    items: int
    large_items: int
    nar_bytes: int
    large_nar_bytes: int
    entries: int  # files, directories and symlinks under gnu/store, item roots included
    under_10k: int  # items whose NAR is under 10 KiB
    drv_items: int
    build_seconds: float

    def line(self) -> str:
        return (f"{self.items:,} items ({self.large_items} large), "
                f"{self.nar_bytes / 1e6:,.0f} MB of NAR ({self.large_nar_bytes / 1e6:,.0f} MB "
                f"in the large ones), {self.entries:,} files, {self.under_10k:,} items under "
                f"10 KiB, {self.drv_items:,} .drv")


def build(prefix: Path, spec: StoreSpec) -> Summary:
    """Build the store of `spec` under `prefix` (gnu/store and var/guix/db/db.sqlite)."""
    start = time.perf_counter()
    large = large_set(spec.large, spec.seed)
    store = prefix / STORE_DIR.lstrip("/")
    store.mkdir(parents=True)
    keep = min(len(large.items), spec.items // 2)
    regs = list(large.items[:keep])
    for reg in regs:
        name = reg.path.rsplit("/", 1)[1]
        _hardlink_tree(large.root / STORE_DIR.lstrip("/") / name, store / name)
    entries = sum(_count_entries(store / r.path.rsplit("/", 1)[1]) for r in regs)
    gen = _Gen(spec.seed, store, spec.items, regs, dict(large.exposed))
    gen.run()
    daemondb.create(daemondb.db_path(prefix), regs)
    return Summary(
        items=len(regs), large_items=keep, nar_bytes=sum(r.nar_size for r in regs),
        large_nar_bytes=sum(r.nar_size for r in regs[:keep]), entries=entries + gen.entries,
        under_10k=sum(r.nar_size < 10 << 10 for r in regs),
        drv_items=sum(r.path.endswith(".drv") for r in regs),
        build_seconds=round(time.perf_counter() - start, 1))


def cached(spec: StoreSpec) -> tuple[Path, Summary]:
    """The store of `spec`, built once under bench/out/stores/ and reused (read-only: the
    scenarios restore into other directories and never write to it)."""
    prefix = STORES / spec.key()
    summary = prefix / "summary.json"
    if not summary.exists():
        tmp = prefix.with_name(prefix.name + ".tmp")
        daemondb.remove_tree(tmp)
        result = build(tmp, spec)
        (tmp / "summary.json").write_text(json.dumps(asdict(result), indent=1))
        daemondb.remove_tree(prefix)
        os.rename(tmp, prefix)
    return prefix, Summary(**json.loads(summary.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2076)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--selfcheck", type=int, default=0, metavar="N",
                        help="also check N items' NAR hashes against incstore and nix-store")
    args = parser.parse_args()
    prefix, summary = cached(StoreSpec(args.items, args.seed))
    print(f"{prefix}\n{summary.line()}\nbuilt in {summary.build_seconds} s")
    if args.selfcheck:
        names = sorted(os.listdir(prefix / "gnu/store"))
        rng = random.Random(0)
        narhash.selfcheck([str(prefix / "gnu/store" / n)
                           for n in rng.sample(names, min(args.selfcheck, len(names)))])


if __name__ == "__main__":
    main()
