"""Demo: the verb behind `incstore demo`, a full save and restore on a generated sample store.

It needs no Guix or Nix: it builds a sample store with a real daemon DB in a work directory,
saves it into a chunk store, restores it into an empty prefix, verifies the restored store, and
compares the two DBs row by row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from incstore import db, manifest, sample
from incstore.restore import execute_restore, plan_restore
from incstore.save import execute_save, plan_save
from incstore.store import Store
from incstore.verify import VerifyReport, verify_store


@dataclass
class DemoReport:
    workdir: Path
    flavour: str
    items: int
    chunks_written: int
    chunk_bytes: int
    nar_bytes: int
    restored: int
    second_save_written: int
    verify: VerifyReport
    db_equal: bool

    @property
    def ok(self) -> bool:
        return self.verify.ok and self.db_equal and self.restored == self.items

    def to_json(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "flavour": self.flavour,
            "items": self.items,
            "chunks_written": self.chunks_written,
            "chunk_bytes": self.chunk_bytes,
            "nar_bytes": self.nar_bytes,
            "restored": self.restored,
            "second_save_written": self.second_save_written,
            "verify": self.verify.to_json(),
            "db_equal": self.db_equal,
            "ok": self.ok,
        }


def rows(db_path: Path) -> dict[str, db.PathInfo]:
    return db.read_snapshot(db_path).infos


def run_demo(workdir: Path, flavour: db.Flavour, spec: sample.SampleSpec) -> DemoReport:
    source, target, cache = workdir / "source", workdir / "restored", workdir / "cache"
    infos = sample.build(source, flavour, spec)
    src_db = Store(source, flavour).default_db
    first = execute_save(plan_save(src_db, source, cache), workdir / "manifest.json")
    second = execute_save(plan_save(src_db, source, cache), workdir / "manifest-2.json")
    loaded = manifest.load(workdir / "manifest.json")
    restored = execute_restore(plan_restore(loaded, target, cache))
    dst_store = Store(target, flavour)
    report = verify_store(dst_store, dst_store.default_db)
    return DemoReport(
        workdir=workdir,
        flavour=flavour.name,
        items=len(infos),
        chunks_written=len(first.written),
        chunk_bytes=first.bytes_written,
        nar_bytes=sum(i.nar_size for i in infos),
        restored=len(restored.registered),
        second_save_written=len(second.written),
        verify=report,
        db_equal=rows(src_db) == rows(dst_store.default_db),
    )
