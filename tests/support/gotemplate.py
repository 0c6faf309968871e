"""A small interpreter of Go's text/template, enough for the Ollama templates in afina's catalog.

Ollama renders a Modelfile's TEMPLATE with Go's text/template; a test cannot run Ollama, so this
implements the subset the catalog's templates use, with Go's semantics: ``{{-``/``-}}`` trim the
adjacent text's whitespace; ``if``/``else if``/``else``/``end``; ``range`` over a list (with
``$i, $x :=``); ``$x :=`` declares and ``$x =`` assigns (to the nearest declaration); ``.Field``,
``$.Field``, ``$x.Field``; string and integer literals; ``eq ne and or not len slice`` and
parentheses. Truth is Go's: false, 0, "", nil and empty lists are false. ``ollama_prompt`` prepares the
data the way Ollama's ``collate`` does (``.System`` joins the system messages; ``.Messages`` keeps them).
Anything else raises, so a template using more than this fails the test instead of passing silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+)')


@dataclass
class _Node:
    kind: str  # text, output, if, range, assign
    value: Any = None
    branches: list[tuple[str | None, list[_Node]]] = field(default_factory=list)
    body: list[_Node] = field(default_factory=list)


def _segments(template: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", s) pieces, with the trim markers applied to the text around them."""
    pieces: list[tuple[str, str]] = []
    position = 0
    trim_next = False
    for match in _ACTION.finditer(template):
        text = template[position:match.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if match.group(1):
            text = text.rstrip(" \t\r\n")
        pieces.append(("text", text))
        pieces.append(("action", match.group(2)))
        trim_next = bool(match.group(3))
        position = match.end()
    tail = template[position:]
    pieces.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    return pieces


def _parse(pieces: list[tuple[str, str]], index: int, stop: tuple[str, ...]) -> tuple[list[_Node], int, str]:
    nodes: list[_Node] = []
    while index < len(pieces):
        kind, text = pieces[index]
        index += 1
        if kind == "text":
            if text:
                nodes.append(_Node("text", text))
            continue
        word = text.split(None, 1)[0] if text else ""
        if word in ("end", "else") and word in stop:
            return nodes, index, text
        if word == "if":
            node = _Node("if")
            condition: str | None = text[2:].strip()
            while True:
                body, index, closer = _parse(pieces, index, ("else", "end"))
                node.branches.append((condition, body))
                if closer == "end":
                    break
                rest = closer[4:].strip()
                condition = rest[2:].strip() if rest.startswith("if ") else None
            nodes.append(node)
        elif word == "range":
            body, index, closer = _parse(pieces, index, ("end",))
            nodes.append(_Node("range", text[5:].strip(), body=body))
        elif re.match(r"\$\w*(\s*,\s*\$\w*)?\s*:?=", text):
            nodes.append(_Node("assign", text))
        elif word in ("end", "else", "with", "define", "template", "block"):
            raise ValueError(f"unsupported or unbalanced action {{{{ {text} }}}}")
        else:
            nodes.append(_Node("output", text))
    if stop:
        raise ValueError(f"missing {{{{ end }}}} (expected one of {stop})")
    return nodes, index, ""


class _Scope:
    def __init__(self, parent: _Scope | None = None) -> None:
        self.parent = parent
        self.names: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.parent
        raise NameError(f"undefined variable {name}")

    def set(self, name: str, value: Any) -> None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.names:
                scope.names[name] = value
                return
            scope = scope.parent
        raise NameError(f"assignment to undeclared variable {name}")


def _truth(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, list | tuple | dict) and not value)


def _field(value: Any, path: str) -> Any:
    for name in filter(None, path.split(".")):
        if not isinstance(value, dict) or name not in value:
            raise KeyError(f"no field {name} in {value!r}")
        value = value[name]
    return value


_FUNCTIONS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a),
    "len": len,
    "slice": lambda items, start=0, end=None: items[start:end],
}


def _evaluate(expression: str, dot: Any, scope: _Scope) -> Any:
    tokens = _TOKEN.findall(expression)
    value, rest = _command(tokens, dot, scope)
    if rest:
        raise ValueError(f"cannot parse {expression!r}")
    return value


def _command(tokens: list[str], dot: Any, scope: _Scope) -> tuple[Any, list[str]]:
    """A command (a function and its arguments, or one operand) up to a closing parenthesis."""
    if tokens and tokens[0] in ("and", "or") or tokens and tokens[0] in _FUNCTIONS:
        name, tokens = tokens[0], tokens[1:]
        args = []
        while tokens and tokens[0] != ")":
            value, tokens = _operand(tokens, dot, scope)
            args.append(value)
        if name == "and":
            return next((arg for arg in args if not _truth(arg)), args[-1]), tokens
        if name == "or":
            return next((arg for arg in args if _truth(arg)), args[-1]), tokens
        return _FUNCTIONS[name](*args), tokens
    return _operand(tokens, dot, scope)


def _operand(tokens: list[str], dot: Any, scope: _Scope) -> tuple[Any, list[str]]:
    token, tokens = tokens[0], tokens[1:]
    if token == "(":
        value, tokens = _command(tokens, dot, scope)
        if not tokens or tokens[0] != ")":
            raise ValueError("unbalanced parenthesis")
        return value, tokens[1:]
    if token.startswith('"'):
        return bytes(token[1:-1], "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8"), tokens
    if re.fullmatch(r"-?\d+", token):
        return int(token), tokens
    if token == ".":
        return dot, tokens
    if token.startswith("."):
        return _field(dot, token), tokens
    if token.startswith("$"):
        name, _, path = token.partition(".")
        return _field(scope.get(name), path), tokens
    raise ValueError(f"unsupported token {token!r}")


def _run(nodes: list[_Node], dot: Any, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.value)
        elif node.kind == "output":
            value = _evaluate(node.value, dot, scope)
            out.append("" if value is None else str(value))
        elif node.kind == "assign":
            target, operator, expression = re.match(r"(\$\w*)\s*(:?=)\s*(.*)", node.value, re.S).groups()
            value = _evaluate(expression, dot, scope)
            if operator == ":=":
                scope.names[target] = value
            else:
                scope.set(target, value)
        elif node.kind == "if":
            for condition, body in node.branches:
                if condition is None or _truth(_evaluate(condition, dot, scope)):
                    _run(body, dot, _Scope(scope), out)
                    break
        elif node.kind == "range":
            names, _, expression = node.value.rpartition(":=")
            variables = [name.strip() for name in names.split(",")] if names else []
            for index, item in enumerate(_evaluate(expression.strip(), dot, scope)):
                inner = _Scope(scope)
                if len(variables) == 2:
                    inner.names[variables[0]], inner.names[variables[1]] = index, item
                elif len(variables) == 1:
                    inner.names[variables[0]] = item
                _run(node.body, item, inner, out)


def render_go_template(template: str, data: dict[str, Any]) -> str:
    nodes, _, _ = _parse(_segments(template), 0, ())
    root = _Scope()
    root.names["$"] = data
    out: list[str] = []
    _run(nodes, data, root, out)
    return "".join(out)


def ollama_prompt(template: str, messages: list[dict[str, str]]) -> str:
    """The prompt Ollama builds for a chat: ``.System`` joins the system messages, ``.Messages`` holds them all
    (consecutive messages of one role merged, as Ollama's ``collate`` does)."""
    system = "\n\n".join(message["content"] for message in messages if message["role"] == "system")
    collated: list[dict[str, str]] = []
    for message in messages:
        if collated and collated[-1]["Role"] == message["role"]:
            collated[-1]["Content"] += "\n\n" + message["content"]
        else:
            collated.append({"Role": message["role"], "Content": message["content"]})
    return render_go_template(template, {"System": system, "Messages": collated})
