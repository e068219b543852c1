"""Units: durations and sizes as users write them (`30d`, `12h`, `8GB`, `7.5GiB`), the one
parser of each for the command line and the actions' inputs."""

from __future__ import annotations

import re

_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw]?)")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?")
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_duration(text: str, *, default_unit: str = "s") -> float:
    """`90`, `90s`, `15m`, `12h`, `30d`, `2w` to seconds; a bare number is in
    `default_unit`. ValueError otherwise."""
    m = _DURATION_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a duration: {text!r} (e.g. 3600, 12h, 30d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or default_unit]


def parse_size(text: str) -> int:
    """`8000000000`, `8GB`, `8G`, `7.5GiB`, `500 MB` to bytes. ValueError otherwise."""
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a size: {text!r} (e.g. 8GB, 7.5GiB, 8000000000)")
    unit = (m.group(2) or "").lower().removesuffix("b")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])
