"""The GitHub Actions expression language (``${{ }}``), as the runner evaluates it.

Follows actions/runner's ``src/Sdk/Expressions``: values are null, booleans, numbers (doubles),
strings, objects and arrays; ``==``/``!=``/``<``/``>``/``<=``/``>=`` coerce mismatched types to
numbers (``''`` and ``null`` are 0, ``true`` is 1, a non-numeric string is NaN, and NaN compares
false to everything), strings compare case-insensitively, objects and arrays only by identity;
``&&`` and ``||`` return an operand, not a boolean; property look-ups are case-insensitive and
yield null when absent; ``a.*`` and ``a[*]`` filter arrays.

The status functions (``success()``, ``failure()``, ``always()``, ``cancelled()``) and
``hashFiles()`` need the runner's state, so the caller passes them in an :class:`Evaluator`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Value = Any  # None | bool | float | str | dict[str, Value] | list[Value]

CONTEXT_NAMES = frozenset({
    "github", "env", "vars", "job", "jobs", "steps", "runner", "secrets", "strategy", "matrix",
    "needs", "inputs",
})
STATUS_FUNCTIONS = frozenset({"success", "failure", "cancelled", "always"})


class ExpressionError(Exception):
    """A parse or evaluation error, worded like the runner's."""


class FilteredArray(list[Any]):
    """The result of a ``.*`` or ``[*]`` projection (flattens once more when indexed again)."""


class CaseSensitiveDict(dict[str, Any]):
    """An object whose keys compare case-sensitively (the ``env`` context on Linux)."""


# --- lexer ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Token:
    kind: str  # 'num' 'str' 'ident' 'kw' 'op' 'eof'
    text: str
    value: Value = None
    pos: int = 0


_PUNCT = ("==", "!=", "<=", ">=", "&&", "||", "(", ")", "[", "]", ",", ".", "!", "<", ">", "*")
_WORD = re.compile(r"[A-Za-z0-9_\-.+]+")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def parse_number(text: str) -> float:
    """ExpressionUtility.ParseNumber: decimal (with exponent), 0x hex, 0o octal, else NaN."""
    s = text.strip()
    if not s:
        return 0.0
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", s):
        return float(s)
    if re.fullmatch(r"0x[0-9a-fA-F]+", s):
        n = int(s[2:], 16)
        return float(n) if n <= 0x7FFFFFFF else math.nan
    if re.fullmatch(r"0o[0-7]+", s):
        n = int(s[2:], 8)
        return float(n) if n <= 0x7FFFFFFF else math.nan
    if s in ("Infinity", "+Infinity"):
        return math.inf
    if s == "-Infinity":
        return -math.inf
    return math.nan


def tokenize(expr: str) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c.isspace():
            i += 1
            continue
        if c == "'":
            j, out = i + 1, []
            while True:
                if j >= n:
                    raise ExpressionError(f"Unexpected symbol: '{expr[i:]}'. Located at position "
                                          f"{i + 1} within expression: {expr}")
                if expr[j] == "'":
                    if j + 1 < n and expr[j + 1] == "'":
                        out.append("'")
                        j += 2
                        continue
                    break
                out.append(expr[j])
                j += 1
            tokens.append(Token("str", expr[i:j + 1], "".join(out), i))
            i = j + 1
            continue
        # A dereference: '.' followed by a property name or '*' (not a number like .5)
        prev = tokens[-1] if tokens else None
        after_value = prev is not None and (prev.kind in ("ident", "kw", "str", "num")
                                            or prev.text in (")", "]", "*"))
        if c == "." and after_value:
            tokens.append(Token("op", ".", None, i))
            i += 1
            m = _IDENT.match(expr, i) or re.compile(r"[A-Za-z0-9_\-]+").match(expr, i)
            if m:
                tokens.append(Token("ident", m.group(), m.group(), i))
                i = m.end()
            continue
        starts_number = c in "-+." and i + 1 < n and (expr[i + 1].isdigit() or expr[i + 1] == ".")
        if c.isdigit() or starts_number:
            m = _WORD.match(expr, i)
            assert m
            word = m.group()
            num = parse_number(word)
            if math.isnan(num) and word not in ("NaN",):
                raise ExpressionError(f"Unexpected symbol: '{word}'. Located at position {i + 1} "
                                      f"within expression: {expr}")
            tokens.append(Token("num", word, num, i))
            i = m.end()
            continue
        if c.isalpha() or c == "_":
            m = _IDENT.match(expr, i)
            assert m
            word = m.group()
            if word in ("true", "false", "null", "NaN", "Infinity"):
                value: Value = {"true": True, "false": False, "null": None,
                                "NaN": math.nan, "Infinity": math.inf}[word]
                tokens.append(Token("kw", word, value, i))
            else:
                tokens.append(Token("ident", word, word, i))
            i = m.end()
            continue
        for p in _PUNCT:
            if expr.startswith(p, i):
                tokens.append(Token("op", p, None, i))
                i += len(p)
                break
        else:
            raise ExpressionError(f"Unexpected symbol: '{c}'. Located at position {i + 1} within "
                                  f"expression: {expr}")
    tokens.append(Token("eof", "", None, n))
    return tokens


# --- AST -------------------------------------------------------------------------------------

@dataclass
class Node:
    pass


@dataclass
class Literal(Node):
    value: Value


@dataclass
class Named(Node):
    name: str


@dataclass
class Wildcard(Node):
    pass


@dataclass
class Index(Node):
    target: Node
    index: Node


@dataclass
class Not(Node):
    operand: Node


@dataclass
class Binary(Node):
    op: str
    left: Node
    right: Node


@dataclass
class Call(Node):
    name: str
    args: list[Node] = field(default_factory=list)


FUNCTION_ARITY: dict[str, tuple[int, int]] = {
    "contains": (2, 2), "startswith": (2, 2), "endswith": (2, 2), "format": (1, 255),
    "join": (1, 2), "tojson": (1, 1), "fromjson": (1, 1), "hashfiles": (1, 255),
    "success": (0, 0), "failure": (0, 0), "cancelled": (0, 0), "always": (0, 0),
    "case": (3, 255),
}


class Parser:
    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.tokens = tokenize(expr)
        self.pos = 0

    def peek(self) -> Token:
        return self.tokens[self.pos]

    def take(self) -> Token:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def error(self, tok: Token) -> ExpressionError:
        what = tok.text or "end of expression"
        return ExpressionError(f"Unexpected symbol: '{what}'. Located at position {tok.pos + 1} "
                               f"within expression: {self.expr}")

    def expect(self, text: str) -> None:
        tok = self.take()
        if tok.text != text or tok.kind not in ("op",):
            raise self.error(tok)

    def parse(self) -> Node:
        if self.peek().kind == "eof":
            raise ExpressionError("Expected an expression")
        node = self.parse_or()
        if self.peek().kind != "eof":
            raise self.error(self.peek())
        return node

    def _binary(self, ops: tuple[str, ...], sub: Callable[[], Node]) -> Node:
        node = sub()
        while self.peek().kind == "op" and self.peek().text in ops:
            op = self.take().text
            node = Binary(op, node, sub())
        return node

    def parse_or(self) -> Node:
        return self._binary(("||",), self.parse_and)

    def parse_and(self) -> Node:
        return self._binary(("&&",), self.parse_eq)

    def parse_eq(self) -> Node:
        return self._binary(("==", "!="), self.parse_cmp)

    def parse_cmp(self) -> Node:
        return self._binary(("<", "<=", ">", ">="), self.parse_unary)

    def parse_unary(self) -> Node:
        if self.peek().kind == "op" and self.peek().text == "!":
            self.take()
            return Not(self.parse_unary())
        return self.parse_postfix()

    def parse_postfix(self) -> Node:
        node = self.parse_primary()
        while True:
            tok = self.peek()
            if tok.kind == "op" and tok.text == ".":
                self.take()
                nxt = self.take()
                if nxt.kind == "op" and nxt.text == "*":
                    node = Index(node, Wildcard())
                elif nxt.kind in ("ident", "kw"):
                    node = Index(node, Literal(nxt.text))
                else:
                    raise self.error(nxt)
            elif tok.kind == "op" and tok.text == "[":
                self.take()
                if self.peek().kind == "op" and self.peek().text == "*":
                    self.take()
                    node = Index(node, Wildcard())
                else:
                    node = Index(node, self.parse_or())
                self.expect("]")
            else:
                return node

    def parse_primary(self) -> Node:
        tok = self.take()
        if tok.kind in ("num", "str", "kw"):
            return Literal(tok.value)
        if tok.kind == "op" and tok.text == "(":
            node = self.parse_or()
            self.expect(")")
            return node
        if tok.kind == "ident":
            if self.peek().kind == "op" and self.peek().text == "(":
                self.take()
                args: list[Node] = []
                if not (self.peek().kind == "op" and self.peek().text == ")"):
                    args.append(self.parse_or())
                    while self.peek().kind == "op" and self.peek().text == ",":
                        self.take()
                        args.append(self.parse_or())
                self.expect(")")
                name = tok.text.lower()
                if name not in FUNCTION_ARITY:
                    raise ExpressionError(f"Unrecognized function: '{tok.text}'. Located at "
                                          f"position {tok.pos + 1} within expression: {self.expr}")
                lo, hi = FUNCTION_ARITY[name]
                if not lo <= len(args) <= hi:
                    kind = "Too few" if len(args) < lo else "Too many"
                    raise ExpressionError(f"{kind} parameters supplied: '{tok.text}'. Located at "
                                          f"position {tok.pos + 1} within expression: {self.expr}")
                return Call(name, args)
            if tok.text.lower() not in CONTEXT_NAMES:
                raise ExpressionError(f"Unrecognized named-value: '{tok.text}'. Located at "
                                      f"position {tok.pos + 1} within expression: {self.expr}")
            return Named(tok.text.lower())
        raise self.error(tok)


def parse(expr: str) -> Node:
    return Parser(expr).parse()


def uses_status_function(node: Node) -> bool:
    if isinstance(node, Call):
        return node.name in STATUS_FUNCTIONS or any(uses_status_function(a) for a in node.args)
    if isinstance(node, Binary):
        return uses_status_function(node.left) or uses_status_function(node.right)
    if isinstance(node, Not):
        return uses_status_function(node.operand)
    if isinstance(node, Index):
        return uses_status_function(node.target) or uses_status_function(node.index)
    return False


# --- values ----------------------------------------------------------------------------------

def kind(v: Value) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, Mapping):
        return "object"
    if isinstance(v, list | tuple):
        return "array"
    return "object"


def canonical(v: Value) -> Value:
    """Integers become doubles, tuples lists, as the runner's canonical values."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return float(v)
    if isinstance(v, tuple):
        return list(v)
    return v


def is_truthy(v: Value) -> bool:
    k = kind(v)
    if k == "null":
        return False
    if k == "boolean":
        return bool(v)
    if k == "number":
        return not (float(v) == 0 or math.isnan(float(v)))
    if k == "string":
        return str(v) != ""
    return True


def number_to_string(x: float) -> str:
    """.NET's ToString("G15") for a double."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0:
        return "0"
    s = f"{x:.15g}"
    if "e" in s:
        mantissa, exp = s.split("e")
        sign = exp[0]
        digits = exp[1:].lstrip("0").rjust(2, "0")
        s = f"{mantissa}E{sign}{digits}"
    return s


def to_string(v: Value) -> str:
    """EvaluationResult.ConvertToString: what ``${{ }}`` inserts into a string."""
    k = kind(v)
    if k == "null":
        return ""
    if k == "boolean":
        return "true" if v else "false"
    if k == "number":
        return number_to_string(float(v))
    if k == "string":
        return str(v)
    return "Object" if k == "object" else "Array"


def to_number(v: Value) -> float:
    k = kind(v)
    if k == "null":
        return 0.0
    if k == "boolean":
        return 1.0 if v else 0.0
    if k == "number":
        return float(v)
    if k == "string":
        return parse_number(v)
    return math.nan


def _coerce(left: Value, right: Value) -> tuple[Value, Value, str, str]:
    lk, rk = kind(left), kind(right)
    if lk == rk:
        return left, right, lk, rk
    if lk == "number" and rk == "string":
        return left, to_number(right), lk, "number"
    if lk == "string" and rk == "number":
        return to_number(left), right, "number", rk
    if lk in ("boolean", "null"):
        return _coerce(to_number(left), right)
    if rk in ("boolean", "null"):
        return _coerce(left, to_number(right))
    return left, right, lk, rk


def _upper(s: str) -> str:
    return s.upper()


def abstract_equal(left: Value, right: Value) -> bool:
    left, right, lk, rk = _coerce(left, right)
    if lk != rk:
        return False
    if lk == "null":
        return True
    if lk == "number":
        return not (math.isnan(left) or math.isnan(right)) and float(left) == float(right)
    if lk == "string":
        return _upper(left) == _upper(right)
    if lk == "boolean":
        return bool(left) == bool(right)
    return left is right


def _compare(left: Value, right: Value) -> int | None:
    """-1, 0, 1, or None when not comparable (different kinds after coercion, NaN, objects)."""
    left, right, lk, rk = _coerce(left, right)
    if lk != rk:
        return None
    if lk == "number":
        a, b = float(left), float(right)
        if math.isnan(a) or math.isnan(b):
            return None
        return (a > b) - (a < b)
    if lk == "string":
        s, t = _upper(left), _upper(right)
        return (s > t) - (s < t)
    if lk == "boolean":
        return int(bool(left)) - int(bool(right))
    return None


def to_json(v: Value, indent: int = 0) -> str:
    """The runner's toJSON: two-space indentation, ``"key": value``."""
    pad = "  " * indent
    k = kind(v)
    if k == "object":
        if not v:
            return "{}"
        items = [f'{pad}  {json.dumps(str(key), ensure_ascii=False)}: {to_json(val, indent + 1)}'
                 for key, val in v.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if k == "array":
        if not v:
            return "[]"
        items = [f"{pad}  {to_json(val, indent + 1)}" for val in v]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    if k == "string":
        return json.dumps(v, ensure_ascii=False)
    if k == "number":
        x = float(v)
        if math.isnan(x) or math.isinf(x):
            return json.dumps(number_to_string(x))
        return number_to_string(x)
    if k == "boolean":
        return "true" if v else "false"
    return "null"


def from_json(text: str) -> Value:
    try:
        return _canonical_tree(json.loads(text))
    except ValueError as e:
        raise ExpressionError(f"Error reading JToken from JsonReader: {e}") from None


def _canonical_tree(v: Value) -> Value:
    if isinstance(v, dict):
        return {k: _canonical_tree(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_canonical_tree(x) for x in v]
    return canonical(v)


def format_string(fmt: str, args: Sequence[Value]) -> str:
    """format('{0} {{literal}}', x): the runner's Format function."""
    out: list[str] = []
    i, n = 0, len(fmt)
    while i < n:
        c = fmt[i]
        if c == "{":
            if i + 1 < n and fmt[i + 1] == "{":
                out.append("{")
                i += 2
                continue
            end = fmt.find("}", i)
            spec = fmt[i + 1:end] if end > 0 else ""
            if end < 0 or not spec.isdigit():
                raise ExpressionError(f"The following format string is invalid: {fmt}")
            idx = int(spec)
            if idx >= len(args):
                raise ExpressionError(f"The following format string references more arguments "
                                      f"than were supplied: {fmt}")
            out.append(to_string(args[idx]))
            i = end + 1
        elif c == "}":
            if i + 1 < n and fmt[i + 1] == "}":
                out.append("}")
                i += 2
                continue
            raise ExpressionError(f"The following format string is invalid: {fmt}")
        else:
            out.append(c)
            i += 1
    return "".join(out)


# --- evaluation -------------------------------------------------------------------------------

@dataclass
class Evaluator:
    """Contexts (``github``, ``env``, ``steps``...) plus the runner-dependent functions."""

    contexts: Mapping[str, Value]
    status: Callable[[str], bool] = lambda name: name in ("success", "always")
    hash_files: Callable[[list[str]], str] | None = None

    def evaluate(self, expr: str | Node) -> Value:
        node = parse(expr) if isinstance(expr, str) else expr
        return self._eval(node)

    def _eval(self, node: Node) -> Value:
        if isinstance(node, Literal):
            return node.value
        if isinstance(node, Named):
            return _lookup_ci(self.contexts, node.name)
        if isinstance(node, Not):
            return not is_truthy(self._eval(node.operand))
        if isinstance(node, Binary):
            return self._binary(node)
        if isinstance(node, Index):
            return self._index(node)
        if isinstance(node, Call):
            return self._call(node)
        raise ExpressionError(f"cannot evaluate {node!r}")

    def _binary(self, node: Binary) -> Value:
        if node.op == "&&":
            left = self._eval(node.left)
            return left if not is_truthy(left) else self._eval(node.right)
        if node.op == "||":
            left = self._eval(node.left)
            return left if is_truthy(left) else self._eval(node.right)
        left, right = self._eval(node.left), self._eval(node.right)
        if node.op == "==":
            return abstract_equal(left, right)
        if node.op == "!=":
            return not abstract_equal(left, right)
        c = _compare(left, right)
        if node.op == "<":
            return c is not None and c < 0
        if node.op == ">":
            return c is not None and c > 0
        if node.op == "<=":
            return abstract_equal(left, right) or (c is not None and c < 0)
        if node.op == ">=":
            return abstract_equal(left, right) or (c is not None and c > 0)
        raise ExpressionError(f"unknown operator {node.op}")

    def _index(self, node: Index) -> Value:
        target = self._eval(node.target)
        wildcard = isinstance(node.index, Wildcard)
        key = None if wildcard else self._eval(node.index)
        if isinstance(target, FilteredArray):
            result = FilteredArray()
            for item in target:
                if isinstance(item, Mapping):
                    if wildcard:
                        result.extend(item.values())
                    elif kind(key) not in ("object", "array"):
                        found = _get(item, to_string(key))
                        if found is not _MISSING:
                            result.append(found)
                elif isinstance(item, list):
                    if wildcard:
                        result.extend(item)
                    else:
                        i = _int_index(key)
                        if i is not None and i < len(item):
                            result.append(item[i])
            return result
        if isinstance(target, Mapping):
            if wildcard:
                return FilteredArray(target.values())
            if kind(key) in ("object", "array"):
                return None
            found = _get(target, to_string(key))
            return None if found is _MISSING else found
        if isinstance(target, list):
            if wildcard:
                return FilteredArray(target)
            i = _int_index(key)
            return target[i] if i is not None and i < len(target) else None
        return FilteredArray() if wildcard else None

    def _call(self, node: Call) -> Value:
        name = node.name
        if name in STATUS_FUNCTIONS:
            return self.status(name)
        args = node.args
        if name == "case":
            if len(args) % 2 == 0:
                raise ExpressionError("case requires an odd number of arguments")
            for i in range(0, len(args) - 1, 2):
                pred = self._eval(args[i])
                if not isinstance(pred, bool):
                    raise ExpressionError("case predicate must evaluate to a boolean value")
                if pred:
                    return self._eval(args[i + 1])
            return self._eval(args[-1])
        values = [self._eval(a) for a in args]
        if name == "contains":
            hay, needle = values
            if kind(hay) in ("null", "boolean", "number", "string"):
                if kind(needle) in ("null", "boolean", "number", "string"):
                    return _upper(to_string(needle)) in _upper(to_string(hay))
                return False
            if isinstance(hay, list):
                return any(abstract_equal(needle, item) for item in hay)
            return False
        if name in ("startswith", "endswith"):
            a, b = values
            prim = ("null", "boolean", "number", "string")
            if kind(a) in prim and kind(b) in prim:
                s, t = _upper(to_string(a)), _upper(to_string(b))
                return s.startswith(t) if name == "startswith" else s.endswith(t)
            return False
        if name == "format":
            return format_string(to_string(values[0]), values[1:])
        if name == "join":
            items = values[0]
            sep = ","
            if len(values) > 1 and kind(values[1]) in ("null", "boolean", "number", "string"):
                sep = to_string(values[1])
            if isinstance(items, list):
                return sep.join(to_string(x) for x in items)
            if kind(items) in ("null", "boolean", "number", "string"):
                return to_string(items)
            return ""
        if name == "tojson":
            return to_json(values[0])
        if name == "fromjson":
            text = to_string(values[0])
            if not text.strip():
                raise ExpressionError("Empty string is not a valid JSON value")
            return from_json(text)
        if name == "hashfiles":
            if self.hash_files is None:
                raise ExpressionError("hashFiles is not available in this context")
            return self.hash_files([to_string(v) for v in values])
        raise ExpressionError(f"Unrecognized function: '{name}'")


_MISSING = object()


def _get(obj: Mapping[str, Value], key: str) -> Value:
    if key in obj:
        return obj[key]
    if isinstance(obj, CaseSensitiveDict):
        return _MISSING
    upper = key.upper()
    for k, v in obj.items():
        if k.upper() == upper:
            return v
    return _MISSING


def _lookup_ci(obj: Mapping[str, Value], key: str) -> Value:
    found = _get(obj, key)
    return None if found is _MISSING else found


def _int_index(key: Value) -> int | None:
    n = to_number(key)
    if math.isnan(n) or n < 0:
        return None
    n = math.floor(n)
    return int(n) if n <= 0x7FFFFFFF else None


# --- templates ----------------------------------------------------------------------------------

_OPEN, _CLOSE = "${{", "}}"


def split_template(text: str) -> list[tuple[str, str]]:
    """Split a string into ('text', s) and ('expr', s) parts, honouring quotes inside ``${{ }}``."""
    parts: list[tuple[str, str]] = []
    i = 0
    while True:
        start = text.find(_OPEN, i)
        if start < 0:
            if i < len(text):
                parts.append(("text", text[i:]))
            return parts
        if start > i:
            parts.append(("text", text[i:start]))
        j = start + len(_OPEN)
        in_string = False
        while j < len(text):
            if text[j] == "'":
                in_string = not in_string
            elif not in_string and text.startswith(_CLOSE, j):
                break
            j += 1
        else:
            raise ExpressionError("The expression is not closed. An unescaped ${{ sequence was "
                                  "found, but the closing }} sequence was not found.")
        parts.append(("expr", text[start + len(_OPEN):j].strip()))
        i = j + len(_CLOSE)


def has_expression(text: str) -> bool:
    return _OPEN in text


def evaluate_template(text: str, ev: Evaluator) -> Value:
    """A scalar in a workflow: one lone ``${{ expr }}`` yields its value, else a string."""
    parts = split_template(text)
    if len(parts) == 1 and parts[0][0] == "expr":
        return ev.evaluate(parts[0][1])
    return "".join(s if k == "text" else to_string(ev.evaluate(s)) for k, s in parts)


def evaluate_to_string(value: Value, ev: Evaluator, what: str = "value") -> str:
    """A workflow scalar that must end up a string (env values, inputs, run scripts)."""
    if isinstance(value, str):
        result = evaluate_template(value, ev) if has_expression(value) else value
    else:
        result = canonical(value)
    if kind(result) in ("object", "array"):
        raise ExpressionError(f"A {'mapping' if kind(result) == 'object' else 'sequence'} was "
                              f"not expected ({what})")
    return to_string(result)


def condition_expression(condition: Value) -> str | None:
    """The expression the runner evaluates for ``if:``: ``success() && (...)`` when no status
    function appears, ``success()`` when empty; None for text around ``${{ }}`` (a string)."""
    if condition is None:
        return "success()"
    if isinstance(condition, bool):
        text = "true" if condition else "false"
    elif isinstance(condition, int | float):
        text = number_to_string(float(condition))
    else:
        text = str(condition).strip()
        if not text:
            return "success()"
        parts = split_template(text)
        if len(parts) == 1 and parts[0][0] == "expr":
            text = parts[0][1]
        elif has_expression(text):
            return None
    if uses_status_function(parse(text)):
        return text
    return f"success() && ({text})"


def evaluate_condition(condition: Value, ev: Evaluator) -> bool:
    expr = condition_expression(condition)
    if expr is None:
        # e.g. "${{ a }} == b": the template yields a non-empty string, so it always holds
        return is_truthy(evaluate_template(str(condition).strip(), ev))
    return is_truthy(ev.evaluate(expr))
