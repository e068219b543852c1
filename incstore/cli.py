"""Command line: click options in, one library call, output out. The only module using click.

Every `IncstoreError` ends here, in `main`, as one line on stderr and its own exit code.
Progress goes to stderr (a counter on a TTY, nothing in CI logs); `--json` prints one stable
document to stdout.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from incstore import __version__, manifest, units
from incstore.chunkstore import ChunkStore
from incstore.errors import IncstoreError, StoreError

if TYPE_CHECKING:
    from incstore.restore import RestorePlan

# each command imports the modules it needs when it runs: a run pays only for its own
# (save and restore are what CI waits for; the signature code is loaded only with keys)
DEFAULT_LEVEL = 2  # incstore.save.DEFAULT_LEVEL (a test keeps them equal)
DEFAULT_GRACE = 3600  # incstore.gc.DEFAULT_GRACE
DEFAULT_GUIX_ACL = "/etc/guix/acl"  # incstore.trust.DEFAULT_GUIX_ACL


def default_cache() -> str:
    return os.environ.get("INCSTORE_CACHE") or str(Path.home() / ".cache" / "incstore")


def _progress(total: int, verb: str) -> Callable[[str, str], None] | None:
    """A one-line counter on a TTY; failures are always printed, one line each."""
    done = 0
    tty = sys.stderr.isatty()

    def report(event: str, detail: str) -> None:
        nonlocal done
        if event == "failed":
            click.echo(f"\rerror: {one_line(detail)}", err=True)
            return
        done += 1
        if tty:
            click.echo(f"\r{verb} {done}/{total}", err=True, nl=done == total)

    return report


def _emit(as_json: bool, doc: dict[str, Any], human: str | Iterable[str]) -> None:
    """The JSON document, or the human text (a string, or lines made as they are written: a
    plan of 200,000 items is not built twice in memory)."""
    out = click.get_text_stream("stdout")
    if as_json:
        json.dump(doc, out, indent=2, sort_keys=True)
        out.write("\n")
    elif isinstance(human, str):
        click.echo(human)
    else:
        for line in human:
            out.write(line + "\n")
    out.flush()


def _finish(error: IncstoreError | None) -> None:
    if error is not None:
        raise error


prefix_option = click.option(
    "--prefix", type=click.Path(path_type=Path), default=Path("/"), show_default=True,
    help="Physical root: items under PREFIX/gnu/store, the DB under PREFIX/var/guix/db.",
)
cache_option = click.option(
    "--cache", default=None, metavar="DIR|s3://BUCKET/PREFIX",
    help="Chunk store: a directory, or s3://BUCKET/PREFIX with endpoint and credentials from "
    "the AWS_* environment [default: $INCSTORE_CACHE, else ~/.cache/incstore].",
)
fsync_option = click.option(
    "--fsync", is_flag=True,
    help="Make every file written durable before it is named (an fsync or syncfs), beyond what "
    "the daemons guarantee: for a long-lived store or chunk store on a machine that may lose "
    "power. By default a kill -9 anywhere is safe and the DB and manifests are synced, but "
    "store files and chunks are left to the page cache, as guix-daemon and Nix leave them.")
jobs_option = click.option("--jobs", type=click.IntRange(1, 64), default=os.cpu_count() or 2,
                           show_default="number of cores", help="Parallel workers.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


@click.group()
@click.version_option(__version__, prog_name="incstore")
def cli() -> None:
    """A content-addressed, incremental store cache for Guix and Nix in CI."""


def _load_manifest(manifest_path: Path | None, name: str | None, cache: str, *,
                   signed: bool) -> tuple[manifest.Manifest, bytes, bytes | None]:
    from incstore.restore import load_manifest

    if (manifest_path is None) == (name is None):
        raise click.UsageError("give exactly one of --manifest FILE and --name NAME")
    return load_manifest(cache, name=name, path=manifest_path, signed=signed)


name_option = click.option(
    "--name", default=None, metavar="NAME",
    help="A manifest recorded inside the chunk store under this name (manifests/NAME.json).",
)


@cli.command()
@click.option("--db", "db_path", type=click.Path(path_type=Path), required=True,
              help="The daemon DB to read (e.g. /var/guix/db/db.sqlite).")
@prefix_option
@cache_option
@click.option("--manifest", "manifest_path", type=click.Path(path_type=Path), default=None,
              help="Where to write the manifest.")
@name_option
@click.option("--closure-of", multiple=True, metavar="STORE_PATH",
              help="Save only the closure of these items (repeatable).")
@click.option("--exclude-db", multiple=True, type=click.Path(path_type=Path),
              metavar="OTHER_DB", help="Leave out paths valid in this other daemon DB "
              "(e.g. the one the Guix binary tarball ships; repeatable).")
@jobs_option
@click.option("--level", type=click.IntRange(-7, 19), default=DEFAULT_LEVEL, show_default=True,
              help="zstd compression level (at most 19: higher levels need windows larger than "
              "restores accept).")
@click.option("--carry-days", type=click.FloatRange(0), default=0, show_default=True,
              help="Keep items of the previous manifest of the same name (or file) that the "
              "store lacks, while their chunks are held, for this many days after they were "
              "last seen in a saved store (a failed restore must not shrink the cache).")
@click.option("--sign-key", type=click.Path(path_type=Path), default=None, metavar="FILE",
              envvar="INCSTORE_SIGN_KEY_FILE", show_envvar=True,
              help="Sign narinfos and the manifest with this secret key file (a Nix key from "
              "`incstore keygen` or nix-store --generate-binary-cache-key, or a Guix "
              "signing-key.sec); it must not be readable by group or others.")
@fsync_option
@click.option("--dry-run", is_flag=True, help="Print what would be written and stop.")
@json_option
def save(db_path: Path, prefix: Path, cache: str | None, manifest_path: Path | None,
         name: str | None, closure_of: tuple[str, ...], exclude_db: tuple[Path, ...], jobs: int,
         level: int, carry_days: float, sign_key: Path | None, fsync: bool, dry_run: bool,
         as_json: bool) -> None:
    """Save the store's valid paths into the chunk store and write a manifest."""
    from incstore.save import execute_save, plan_save, previous_manifest

    if manifest_path is None and name is None:
        raise click.UsageError("give --manifest FILE, --name NAME, or both")
    if name is not None:
        manifest.check_name(name)
    cache = cache or default_cache()
    previous = previous_manifest(cache, name, manifest_path)
    plan = plan_save(db_path, prefix, cache, closure_of, exclude_db, previous=previous,
                     carry_days=carry_days)
    if dry_run:
        doc = plan.to_json()
        _emit(as_json, doc, f"would write {len(doc['write'])} chunk(s), reuse "
                            f"{len(doc['reuse'])}, of {doc['items']} item(s)")
        return
    secret = None
    if sign_key is not None:
        from incstore import signature

        secret = signature.read_secret_key(sign_key)
    result = execute_save(plan, manifest_path, name=name, jobs=jobs, level=level,
                          progress=_progress(len(plan.to_write), "saved"), sign_key=secret,
                          fsync=fsync)
    doc = result.to_json()
    where = " and ".join(w for w in (str(manifest_path) if manifest_path else "",
                                     f"manifests/{name}.json" if name else "") if w)
    if result.not_written is not None:
        where = f"{where} not written: {result.not_written}"
    _emit(as_json, doc, f"saved {doc['items']} item(s): {doc['written']} new chunk(s) "
                        f"({doc['chunk_bytes_written']} bytes), {doc['reused']} already stored; "
                        f"manifest {where}")
    _finish(result.error())


@cli.command()
@click.option("--manifest", "manifest_path", type=click.Path(path_type=Path), default=None,
              help="The manifest to restore.")
@name_option
@cache_option
@prefix_option
@click.option("--db", "db_path", type=click.Path(path_type=Path), default=None,
              help="The daemon DB to register into [default: PREFIX/var/guix/db/db.sqlite].")
@click.option("--db-out", type=click.Path(path_type=Path), default=None,
              help="Write the registered DB here and leave the target DB untouched.")
@click.option("--db-mode", type=click.Choice(["auto", "swap", "in-place"]), default="auto",
              show_default=True,
              help="swap: register in a copy of the DB swapped in under the daemon's big-lock "
              "(refused while a daemon session runs); in-place: register inside the live DB "
              "in transactions (the daemon may keep running); auto: swap if no session runs, "
              "else in-place.")
@click.option("--in-place", is_flag=True, help="Same as --db-mode in-place.")
@click.option("--owner", default=None, metavar="USER[:GROUP]",
              help="Owner of restored files [default: the daemon's user: root, or the user an "
              "unprivileged daemon runs as].")
@click.option("--trusted-key", "trusted_keys", multiple=True, metavar="KEY",
              help="Trust this key: NAME:base64, a Nix public key file, or a Guix "
              "signing-key.pub (repeatable; also INCSTORE_TRUSTED_KEYS, space-separated). "
              "With any trust root, only what a trusted key signed is restored.")
@click.option("--trust-guix-acl", is_flag=False, flag_value=DEFAULT_GUIX_ACL,
              default=None, metavar="[FILE]",
              help=f"Trust the keys the Guix daemon trusts (default {DEFAULT_GUIX_ACL}).")
@click.option("--trust-nix-conf", is_flag=True,
              help="Trust nix.conf's trusted-public-keys ($NIX_CONF_DIR/nix.conf).")
@click.option("--max-age", default=None, metavar="DURATION",
              help="Refuse a signed manifest created longer ago than this (e.g. 30d), to limit "
              "a rollback to an older signed manifest.")
@click.option("--require-signed-manifest", is_flag=True,
              help="With trust roots: refuse the restore unless the manifest itself is signed "
              "by a trusted key (no falling back to item signatures).")
@click.option("--deduplicate/--no-deduplicate", default=None,
              help="Hard-link identical files through the store's .links, as the daemon does "
              "[default: on for Guix (files of 8 KiB and more), off for Nix].")
@jobs_option
@fsync_option
@click.option("--dry-run", is_flag=True, help="Print the plan and stop.")
@json_option
def restore(manifest_path: Path | None, name: str | None, cache: str | None, prefix: Path,
            db_path: Path | None, db_out: Path | None, db_mode: str, in_place: bool,
            owner: str | None, trusted_keys: tuple[str, ...], trust_guix_acl: str | None,
            trust_nix_conf: bool, max_age: str | None, require_signed_manifest: bool,
            deduplicate: bool | None, jobs: int, fsync: bool, dry_run: bool,
            as_json: bool) -> None:
    """Extract the manifest's missing items, verify them and register them."""
    from incstore import trust
    from incstore.restore import execute_restore, plan_restore
    from incstore.store import parse_owner

    if db_out and (in_place or db_mode != "auto"):
        raise click.UsageError("--db-out excludes --in-place and --db-mode")
    try:
        age = units.parse_duration(max_age) if max_age is not None else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-age") from None
    roots = trust.load_roots(trusted_keys, env=os.environ.get("INCSTORE_TRUSTED_KEYS"),
                             guix_acl=Path(trust_guix_acl) if trust_guix_acl else None,
                             nix_conf=trust.nix_conf_path() if trust_nix_conf else None)
    if require_signed_manifest and not roots.active:
        raise click.UsageError("--require-signed-manifest needs a trust root (--trusted-key...)")
    cache = cache or default_cache()
    loaded, data, sig = _load_manifest(manifest_path, name, cache, signed=roots.active)
    policy = trust.Policy(roots, expected_name=name, max_age=age,
                          require_manifest=require_signed_manifest)
    plan = plan_restore(loaded, prefix, cache, db_path=db_path, db_out=db_out,
                        db_mode="in-place" if in_place else db_mode,  # type: ignore[arg-type]
                        owner=parse_owner(owner) if owner else None, policy=policy,
                        data=data, sig=sig, deduplicate=deduplicate)
    if dry_run:
        doc = plan.to_json()

        def human() -> Iterator[str]:
            for action in ("extract", "replace", "present"):
                for path in doc[action]:
                    yield f"{action:8} {path}"
            for r in doc["refused"]:
                yield f"refused  {one_line(r)}"
            yield (f"would extract {len(doc['extract']) + len(doc['replace'])} of "
                   f"{doc['items']} item(s) into {doc['store']}; {_trust_line(plan)}")

        _emit(as_json, doc, human())
        return
    result = execute_restore(plan, jobs=jobs, fsync=fsync,
                             progress=_progress(len(plan.to_extract), "restored"))
    doc = result.to_json()
    for warning in result.warnings:
        click.echo(f"warning: {one_line(warning)}", err=True)
    linked = doc["deduplicated"]
    saved = (f"; {linked['files']} file(s) hard-linked, {linked['bytes']:,} bytes saved"
             if linked and linked["files"] else "")
    _emit(as_json, doc, f"restored {doc['extracted']} item(s), {doc['present']} already present, "
                        f"registered {doc['registered']} in {doc['db']}{saved}; "
                        f"{_trust_line(plan)}")
    _finish(result.error())


def _trust_line(plan: RestorePlan) -> str:
    verdict = plan.trust
    if not verdict.active:
        return "trusted: no (no trust root given: hashes were checked, origin was not)"
    if verdict.signer:
        return f"trusted: yes (manifest signed by {verdict.signer})"
    refused = f", {len(verdict.refused)} refused" if verdict.refused else ""
    return (f"trusted: {'no' if verdict.refused else 'yes'} (the manifest {verdict.problem}; "
            f"items checked one by one{refused})")


@cli.command()
@cache_option
@click.option("--keep-days", type=click.FloatRange(0), default=None,
              help="Drop manifests not saved for this many days.")
@click.option("--max-bytes", type=click.IntRange(0), default=None,
              help="Then drop the oldest manifests while the chunks take more than this.")
@click.option("--grace-minutes", type=click.FloatRange(0), default=DEFAULT_GRACE / 60,
              show_default=True, help="Never sweep a chunk written or reused this recently.")
@click.option("--dry-run", is_flag=True, help="Print what would go and stop.")
@json_option
def gc(cache: str | None, keep_days: float | None, max_bytes: int | None,
       grace_minutes: float, dry_run: bool, as_json: bool) -> None:
    """Drop old manifests and sweep the chunks no kept manifest needs."""
    from incstore.gc import execute_gc, plan_gc

    plan = plan_gc(cache or default_cache(), keep_days=keep_days, max_bytes=max_bytes,
                   grace_seconds=grace_minutes * 60)
    if dry_run:
        doc = plan.to_json()
        _emit(as_json, doc, "\n".join(
            [f"drop manifest {n}" for n in doc["drop_manifests"]]
            + [f"sweep chunk {k}" for k in doc["sweep_chunks"]]
            + [f"would free {doc['bytes_before'] - doc['bytes_after']} bytes"]))
        return
    for name, why in sorted(plan.invalid.items()):
        click.echo(f"warning: manifest {one_line(name)} cannot be read, so it keeps nothing: "
                   f"{one_line(why)}", err=True)
    if plan.blocked_by:
        click.echo(f"warning: nothing swept: manifest {plan.blocked_by[0]} was written by a "
                   "newer incstore", err=True)
    result = execute_gc(plan)
    doc = result.to_json()
    _emit(as_json, doc, f"dropped {len(result.dropped)} manifest(s), swept {len(result.swept)} "
                        f"chunk(s); {doc['bytes_after']} bytes kept\n"
                        f"digest {result.digest} changed={'true' if result.changed else 'false'}")


@cli.command("check")
@cache_option
@click.option("--manifest", "manifest_paths", multiple=True, type=click.Path(path_type=Path),
              help="Check this manifest file too (repeatable); named manifests are always checked.")
@click.option("--full", is_flag=True, help="Decompress every chunk and check its NAR sha256.")
@jobs_option
@json_option
def check_cmd(cache: str | None, manifest_paths: tuple[Path, ...], full: bool, jobs: int,
              as_json: bool) -> None:
    """Check that every chunk a manifest references is there and intact."""
    from incstore.check import check
    from incstore.named import read_named

    cache = cache or default_cache()
    named = read_named(ChunkStore(cache))
    manifests = {**named.manifests, **{str(p): manifest.load(p) for p in manifest_paths}}
    report = check(cache, manifests, full=full, jobs=jobs, unreadable=named.invalid)
    doc = report.to_json()
    _emit(as_json, doc, "\n".join(
        [*(f"missing: {e}" for e in doc["missing"]), *(f"corrupt: {e}" for e in doc["corrupt"]),
         *(f"damaged: {e}" for e in doc["other"]),
         *(f"unreadable manifest: {one_line(n)}: {one_line(w)}"
           for n, w in sorted(doc["unreadable_manifests"].items())),
         *(f"orphan:  {k}" for k in doc["orphans"]),
         *(f"quarantined: {k}" for k in doc["quarantined"]),
         f"checked {doc['checked']} chunk(s): {'ok' if doc['ok'] else 'DAMAGED'}, "
         f"{len(doc['orphans'])} orphan(s)"]))
    _finish(report.error())


@cli.command("stats")
@cache_option
@json_option
def stats_cmd(cache: str | None, as_json: bool) -> None:
    """Items and bytes per manifest, unique versus shared, and their overlap."""
    from incstore.named import read_named
    from incstore.stats import stats

    chunks = ChunkStore(cache or default_cache())
    held = chunks.chunk_bytes()
    named = read_named(chunks)
    for name, why in sorted(named.invalid.items()):
        click.echo(f"warning: manifest {one_line(name)} cannot be read: {one_line(why)}",
                   err=True)
    report = stats(named.manifests, held)
    doc = report.to_json()
    names = sorted(doc["manifests"])
    lines = [f"{'manifest':24} {'items':>6} {'chunk bytes':>14} {'unique':>14} {'shared':>14}"]
    for n in names:
        m = doc["manifests"][n]
        lines.append(f"{n:24} {m['items']:>6} {m['chunk_bytes']:>14,} {m['unique_bytes']:>14,} "
                     f"{m['shared_bytes']:>14,}")
    lines.append(f"chunk store holds {held:,} bytes of chunks")
    if len(names) > 1:
        lines.append("overlap (chunk bytes in common):")
        lines.append(" " * 24 + "".join(f"{n[:14]:>15}" for n in names))
        lines += [f"{a:24}" + "".join(f"{doc['overlap'][a][b]:>15,}" for b in names)
                  for a in names]
    _emit(as_json, doc, "\n".join(lines))


@cli.command("catalogue")
@cache_option
@click.argument("out", type=click.Path(path_type=Path, dir_okay=False))
@json_option
def catalogue_cmd(cache: str | None, out: Path, as_json: bool) -> None:
    """Write an SQLite catalogue of the chunk store to OUT: manifests, items, references and
    chunks, with full-text search on item names (needs the catalogue extra, sqlite-utils)."""
    from incstore.catalogue import write

    report = write(cache or default_cache(), out)
    doc = report.to_json()
    for name in report.unreadable:
        click.echo(f"warning: manifest {one_line(name)} cannot be read (listed in "
                   "unreadable_manifests)", err=True)
    _emit(as_json, doc, f"wrote {out}: {doc['manifests']} manifest(s), {doc['items']} item(s), "
                        f"{doc['chunks']} chunk(s)")


@cli.command("diff")
@cache_option
@click.argument("a")
@click.argument("b")
@json_option
def diff_cmd(cache: str | None, a: str, b: str, as_json: bool) -> None:
    """Compare two manifests (files, or names in the chunk store)."""
    from incstore.stats import diff

    chunks = ChunkStore(cache or default_cache())

    def load(ref: str) -> manifest.Manifest:
        path = Path(ref)
        if path.is_file():
            return manifest.load(path)
        return chunks.load_manifest(ref)

    report = diff(load(a), load(b))
    doc = report.to_json()
    _emit(as_json, doc, "\n".join(
        [*(f"- {p}" for p in report.only_a), *(f"+ {p}" for p in report.only_b),
         f"{len(report.only_a)} only in {a} ({report.bytes_only_a:,} bytes), "
         f"{len(report.only_b)} only in {b} ({report.bytes_only_b:,} bytes), "
         f"{len(report.common)} in both ({report.bytes_common:,} bytes)"]))


@cli.command()
@click.argument("name")
@click.argument("secret_file", type=click.Path(path_type=Path))
@click.argument("public_file", type=click.Path(path_type=Path))
@click.option("--guix", "guix_format", is_flag=True,
              help="Write a Guix key pair (signing-key.sec / signing-key.pub s-expressions) "
              "instead of a Nix one; NAME is then ignored.")
def keygen(name: str, secret_file: Path, public_file: Path, guix_format: bool) -> None:
    """Write a signing key pair: Nix's format (NAME:base64, as nix-store
    --generate-binary-cache-key writes it) unless --guix; the files get the modes that tool
    gives them (Nix: secret 0600, public 0644; Guix: secret 0400, public 0444)."""
    from incstore import signature

    signature.write_key_pair(name, secret_file, public_file, guix=guix_format)
    secret_mode, public_mode = signature.KEY_MODES["guix" if guix_format else "nix"]
    click.echo(f"wrote {secret_file} (secret, mode {secret_mode:04o}) and {public_file} "
               f"(public, mode {public_mode:04o})", err=True)


@cli.command()
@click.option("--flavour", type=click.Choice(["guix", "nix"]), default="guix",
              show_default=True, help="Which kind of store to demonstrate.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Keep the demo's files here instead of a temporary directory.")
@click.option("--items", type=click.IntRange(2, 10000), default=24, show_default=True)
@json_option
def demo(flavour: str, workdir: Path | None, items: int, as_json: bool) -> None:
    """Build a sample store, save it, restore it into an empty prefix, and verify it."""
    from incstore import db
    from incstore.demo import run_demo
    from incstore.sample import SampleSpec
    from incstore.store import Store

    spec = SampleSpec(items=items)
    with tempfile.TemporaryDirectory(prefix="incstore-demo-") as tmp:
        where = workdir or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        report = run_demo(where, db.FLAVOURS[flavour], spec)
        doc = report.to_json()
        store = Store(where / "restored", db.FLAVOURS[flavour])
        human = "\n".join([
            f"sample {flavour} store: {report.items} items, {report.nar_bytes} NAR bytes "
            f"in {where / 'source'}",
            f"save:    {report.chunks_written} chunks written, {report.chunk_bytes} bytes "
            f"(zstd) in {where / 'cache'}",
            f"save #2: {report.second_save_written} chunks written (nothing changed)",
            f"restore: {report.restored} items extracted, verified and registered in "
            f"{store.default_db}",
            f"verify:  {report.verify.checked} items checked, "
            f"{len(report.verify.problems)} problem(s); DBs equal: {report.db_equal}",
            "demo OK" if report.ok else "demo FAILED",
            *report.verify.problems[:20],
        ])
        _emit(as_json, doc, human)
        if not report.ok:
            sys.exit(1)


def one_line(text: str) -> str:
    """Text safe to print as one line: control characters (a newline in a path from a manifest,
    say, which could forge a CI annotation) are shown escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def main() -> NoReturn:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"incstore: usage error: {one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except IncstoreError as e:
        click.echo(f"incstore: error: {one_line(str(e))}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        # an I/O failure nothing more specific caught (out of descriptors, disk full...)
        where = f" ({e.filename})" if e.filename else ""
        click.echo(f"incstore: error: {one_line(f'{e.strerror or e}{where}')}", err=True)
        sys.exit(StoreError.exit_code)
    except Exception as e:  # a bug: one line, and the traceback only on request
        if os.environ.get("INCSTORE_DEBUG"):
            raise
        click.echo(f"incstore: internal error: {one_line(f'{type(e).__name__}: {e}')} "
                   "(a bug; INCSTORE_DEBUG=1 shows the traceback)", err=True)
        sys.exit(1)
    sys.exit(0)
