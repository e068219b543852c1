"""YAML as GitHub reads workflows: the YAML 1.2 core schema (``on``/``yes``/``no`` are strings,
``1:20`` is a string, ``0o17``/``0x1f`` are integers), with PyYAML's safe loader underneath."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]


class CoreSchemaLoader(yaml.SafeLoader):  # type: ignore[misc]
    """yaml.SafeLoader restricted to the YAML 1.2 core schema's implicit types."""


CoreSchemaLoader.yaml_implicit_resolvers = {}
_RESOLVERS = [
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", [*list("~nN"), ""]),
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$",
     list("-+0123456789")),
    ("tag:yaml.org,2002:float",
     r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
     r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", list("-+0123456789.")),
]
for _tag, _pattern, _first in _RESOLVERS:
    CoreSchemaLoader.add_implicit_resolver(_tag, re.compile(_pattern), _first)


def _construct_int(loader: CoreSchemaLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text)


CoreSchemaLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_yaml(source: str | Path) -> Any:
    """Parse YAML text, or the file at a Path."""
    text = source.read_text() if isinstance(source, Path) else source
    return yaml.load(text, Loader=CoreSchemaLoader)
