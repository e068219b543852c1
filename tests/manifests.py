"""Manifest documents for tests: read a version-2 manifest as one dict per item (references
as paths) so that tests can tamper with it readably, and write such a dict back in the
version-2 array form, keeping whatever order and oddities the test put in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from incstore.manifest import ITEM_FIELDS


def to_dicts(doc: dict[str, Any]) -> dict[str, Any]:
    items = doc["items"]
    everything = [i[0] for i in items] + list(doc["external"])
    out = dict(doc)
    out["items"] = []
    for raw in items:
        fields = dict(zip(ITEM_FIELDS, raw, strict=True))
        out["items"].append({
            "path": fields["path"],
            "nar_hash": fields["nar_hash"],
            "nar_size": fields["nar_size"],
            "references": [everything[r] for r in fields["references"]],
            "deriver": fields["deriver"],
            "registration_time": fields["registration_time"],
            "derivation_outputs": [{"id": o[0], "path": o[1]}
                                   for o in fields["derivation_outputs"]],
            "chunk": {"key": fields["chunk_key"], "size": fields["chunk_size"],
                      "xxh3_128": fields["chunk_xxh3_128"]},
            "seen": fields["seen"],
            "extra": fields["extra"],
        })
    return out


def to_arrays(doc: dict[str, Any]) -> dict[str, Any]:
    """Back to the version-2 form. A reference to a path that is neither an item nor external
    becomes an index past both (what a manifest that is not closed looks like)."""
    items = doc["items"]
    order = {i["path"]: n for n, i in enumerate(items)}
    for n, path in enumerate(doc["external"]):
        order.setdefault(path, len(items) + n)
    beyond = len(items) + len(doc["external"])

    def index(path: str) -> int:
        nonlocal beyond
        if path not in order:
            order[path] = beyond
            beyond += 1
        return order[path]

    out = dict(doc)
    out["items"] = [[
        i["path"], i["nar_hash"], i["nar_size"], sorted(index(r) for r in i["references"]),
        i["deriver"], i["registration_time"],
        [[o["id"], o["path"]] for o in i["derivation_outputs"]],
        i["chunk"]["key"], i["chunk"]["size"], i["chunk"]["xxh3_128"], i["seen"], i["extra"],
    ] for i in items]
    return out


def load(path: Path) -> dict[str, Any]:
    return to_dicts(json.loads(path.read_text()))


def dump(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(to_arrays(doc)))
