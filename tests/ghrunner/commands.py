"""Workflow commands on a step's output, file commands, and secret masking, as the runner does them.

- ``::name key=value,key=value::data`` (and the legacy ``##[name key=value;...]data``) lines on
  stdout *or* stderr, with ``%25``/``%0D``/``%0A`` escapes in the data and additionally
  ``%3A``/``%2C`` in properties (actions/runner ``src/Runner.Common/ActionCommand.cs``).
- The ``GITHUB_ENV``/``GITHUB_OUTPUT``/``GITHUB_STATE`` files: ``name=value`` lines and
  ``name<<DELIMITER`` heredocs (``FileCommandManager.cs``'s ``EnvFileKeyValuePairs``).
- The secret masker: every registered value (and each of its lines, and its common encodings) is
  replaced by ``***``.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.parse
from dataclasses import dataclass, field

REGISTERED_COMMANDS = frozenset({
    "add-mask", "debug", "warning", "error", "notice", "group", "endgroup", "echo",
    "stop-commands", "set-output", "save-state", "set-env", "add-path", "add-matcher",
    "remove-matcher",
})

_ESCAPE_DATA = (("\r", "%0D"), ("\n", "%0A"), ("%", "%25"))
_ESCAPE_PROPERTY = (("\r", "%0D"), ("\n", "%0A"), (":", "%3A"), (",", "%2C"), ("%", "%25"))
_ESCAPE_LEGACY = ((";", "%3B"), ("\r", "%0D"), ("\n", "%0A"), ("]", "%5D"), ("%", "%25"))


def _unescape(text: str, mappings: tuple[tuple[str, str], ...]) -> str:
    for token, replacement in mappings:
        text = text.replace(replacement, token)
    return text


def _escape(text: str, mappings: tuple[tuple[str, str], ...]) -> str:
    for token, replacement in reversed(mappings):
        text = text.replace(token, replacement)
    return text


def escape_data(text: str) -> str:
    """What @actions/core's issueCommand does to a command's message."""
    return _escape(text, _ESCAPE_DATA)


def escape_property(text: str) -> str:
    return _escape(text, _ESCAPE_PROPERTY)


def format_command(name: str, message: str = "", **properties: str) -> str:
    """``::name k=v,...::message``, escaped the way @actions/core writes it."""
    props = ",".join(f"{k}={escape_property(str(v))}" for k, v in properties.items() if v)
    return f"::{name}{' ' + props if props else ''}::{escape_data(message)}"


@dataclass
class Command:
    name: str
    data: str
    properties: dict[str, str] = field(default_factory=dict)

    def prop(self, key: str) -> str | None:
        """Properties are looked up case-insensitively, as the runner's dictionary does."""
        for k, v in self.properties.items():
            if k.lower() == key.lower():
                return v
        return None


def parse_command(line: str, registered: frozenset[str] | set[str] = REGISTERED_COMMANDS
                  ) -> Command | None:
    """ActionCommand.TryParseV2, then the legacy TryParse."""
    return _parse_v2(line, registered) or _parse_legacy(line, registered)


def _parse_v2(line: str, registered: frozenset[str] | set[str]) -> Command | None:
    message = line.lstrip()
    if not message.startswith("::"):
        return None
    end = message.find("::", 2)
    if end < 0:
        return None
    info = message[2:end]
    space = info.find(" ")
    name = info if space < 0 else info[:space]
    if name not in registered:
        return None
    cmd = Command(name, _unescape(message[end + 2:], _ESCAPE_DATA))
    if space > 0:
        for prop in info[space + 1:].strip().split(","):
            if not prop:
                continue
            pair = [p for p in prop.split("=", 1) if p]
            if len(pair) == 2:
                cmd.properties[pair[0]] = _unescape(pair[1], _ESCAPE_PROPERTY)
    return cmd


def _parse_legacy(line: str, registered: frozenset[str] | set[str]) -> Command | None:
    start = line.find("##[")
    if start < 0:
        return None
    rb = line.find("]", start)
    if rb < 0:
        return None
    info = line[start + 3:rb]
    space = info.find(" ")
    name = info if space < 0 else info[:space]
    if name not in registered:
        return None
    cmd = Command(name, _unescape(line[rb + 1:], _ESCAPE_LEGACY))
    if space > 0:
        for prop in info[space + 1:].split(";"):
            if not prop:
                continue
            pair = [p for p in prop.split("=", 1) if p]
            if len(pair) == 2:
                cmd.properties[pair[0]] = _unescape(pair[1], _ESCAPE_LEGACY)
    return cmd


class FileCommandError(Exception):
    """A malformed GITHUB_ENV/GITHUB_OUTPUT file (the step then fails)."""


def parse_env_file(text: str) -> list[tuple[str, str]]:
    """``name=value`` and ``name<<DELIM`` ... ``DELIM`` pairs, in order, LF line endings."""
    pairs: list[tuple[str, str]] = []
    lines = text.split("\n")
    # A trailing newline does not start an empty last line
    has_final_newline = text.endswith("\n")
    if has_final_newline:
        lines.pop()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line == "":
            continue
        eq, heredoc = line.find("="), line.find("<<")
        if eq >= 0 and (heredoc < 0 or eq < heredoc):
            key, value = line.split("=", 1)
            if not key:
                raise FileCommandError(f"Invalid format '{line}'. Name must not be empty")
            pairs.append((key, value))
        elif heredoc >= 0 and (eq < 0 or heredoc < eq):
            key, delimiter = line.split("<<", 1)
            if not key or not delimiter:
                raise FileCommandError(f"Invalid format '{line}'. Name must not be empty and "
                                       f"delimiter must not be empty")
            body: list[str] = []
            while True:
                if i >= len(lines):
                    raise FileCommandError(f"Invalid value. Matching delimiter not found "
                                           f"'{delimiter}'")
                candidate = lines[i]
                is_last = i == len(lines) - 1
                if candidate == delimiter:
                    i += 1
                    break
                if is_last and not has_final_newline:
                    raise FileCommandError("Invalid value. EOF marker missing new line.")
                body.append(candidate)
                i += 1
            pairs.append((key, "\n".join(body)))
        else:
            raise FileCommandError(f"Invalid format '{line}'")
    return pairs


class SecretMasker:
    """Replaces registered secrets (and their lines and usual encodings) with ``***``."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        if not value:
            return
        with self._lock:
            for v in {value, *(s.strip() for s in value.replace("\r", "\n").split("\n"))}:
                if not v:
                    continue
                self._values.add(v)
                for enc in _encodings(v):
                    if enc:
                        self._values.add(enc)

    @property
    def values(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._values)

    def mask(self, text: str) -> str:
        values = sorted(self.values, key=len, reverse=True)
        for v in values:
            if v in text:
                text = text.replace(v, "***")
        return text


def _encodings(value: str) -> list[str]:
    raw = value.encode()
    encoded = [
        base64.b64encode(raw).decode().rstrip("="),
        json.dumps(value)[1:-1],
        urllib.parse.quote(value, safe=""),
    ]
    # A value of 1-2 characters would mask too much in its encoded forms
    return [e for e in encoded if e != value and len(e) >= 3]
