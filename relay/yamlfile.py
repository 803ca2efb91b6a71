"""Read YAML while keeping line numbers, so every problem names file, line and key.

Both `relay.yaml` (settings) and `rules.yaml` (rules) are read through `load()`,
which returns a `Node` tree. Each accessor (`mapping`, `sequence`, `as_str`, ...)
returns the value or, when the value is wrong, records a `Problem` on the
shared `Doc` and returns None, so one pass reports every problem at once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import yaml

from relay.errors import ConfigError, Problem

_LEADING_ZERO = re.compile(r"[-+]?0[0-9_]+")
MAX_NODES = 100_000  # values in a file with its aliases written out (the shipped rules: ~100)
MAX_BYTES = 1 << 20  # the shipped rules: 5 KB. PyYAML reads about 1 MB a second

_TYPE_NAMES = {
    "tag:yaml.org,2002:str": "a string",
    "tag:yaml.org,2002:int": "an integer",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "true/false",
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:map": "a mapping",
    "tag:yaml.org,2002:seq": "a list",
}


class Doc:
    """One YAML file being read, and the problems found in it so far."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.problems: list[Problem] = []

    def problem(self, line: int | None, key: str, message: str) -> None:
        self.problems.append(Problem(file=self.name, line=line, key=key, message=message))

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


@dataclass(frozen=True, slots=True)
class Node:
    """A YAML node with its place: the document, the dotted key path and the line."""

    doc: Doc
    key: str
    node: yaml.Node

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def problem(self, message: str) -> None:
        self.doc.problem(self.line, self.key, message)

    def kind(self) -> str:
        return _TYPE_NAMES.get(self.node.tag, self.node.tag)

    def child(self, key: str, node: yaml.Node) -> Node:
        path = f"{self.key}.{key}" if self.key else key
        return Node(self.doc, path, node)

    def is_text(self, text: str) -> bool:
        """Is this the single value `text` (quoted or not)?"""
        return isinstance(self.node, yaml.ScalarNode) and self.node.value == text

    def is_null(self) -> bool:
        return self.node.tag == "tag:yaml.org,2002:null"

    def mapping(
        self, allowed: Collection[str] | None = None, required: Collection[str] = ()
    ) -> dict[str, Node] | None:
        """The mapping's entries; unknown, duplicate and missing keys are problems."""
        if not isinstance(self.node, yaml.MappingNode):
            self.problem(f"expected a mapping, got {self.kind()}")
            return None
        entries: dict[str, Node] = {}
        for key_node, value_node in self.node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                Node(self.doc, self.key, key_node).problem("keys must be plain names")
                continue
            name = str(key_node.value)
            child = self.child(name, value_node)
            if name in entries:
                Node(self.doc, child.key, key_node).problem("duplicate key")
            elif allowed is not None and name not in allowed:
                valid = ", ".join(sorted(allowed))
                Node(self.doc, child.key, key_node).problem(f"unknown key (valid: {valid})")
            else:
                entries[name] = child
        for name in required:
            if name not in entries:
                self.problem(f"missing required key {name!r}")
        return entries

    def sequence(self) -> list[Node] | None:
        if not isinstance(self.node, yaml.SequenceNode):
            self.problem(f"expected a list, got {self.kind()}")
            return None
        return [Node(self.doc, f"{self.key}[{i}]", item) for i, item in enumerate(self.node.value)]

    def scalar(self) -> object:
        """The node's plain Python value, or None (with a problem) for a mapping or list."""
        if not isinstance(self.node, yaml.ScalarNode):
            self.problem(f"expected a single value, got {self.kind()}")
            return None
        loader = yaml.SafeLoader("")
        try:
            return loader.construct_object(self.node, deep=True)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:  # e.g. a date like 2020-99-99
            self.problem(f"unreadable value: {exc}")
            return None
        finally:
            loader.dispose()

    def _plain(self) -> tuple[bool, object]:
        """(True, value) for a readable scalar; (False, None) once a problem is recorded."""
        if not isinstance(self.node, yaml.ScalarNode):
            self.problem(f"expected a single value, got {self.kind()}")
            return False, None
        before = len(self.doc.problems)
        value = self.scalar()
        return len(self.doc.problems) == before, value

    def as_str(self, *, allow_empty: bool = False) -> str | None:
        ok, value = self._plain()
        if not ok:
            return None
        if not isinstance(value, str):
            self.problem(f"expected a string, got {self.kind()}")
            return None
        if not allow_empty and not value.strip():
            self.problem("must not be empty")
            return None
        return value

    def as_bool(self) -> bool | None:
        ok, value = self._plain()
        if not ok:
            return None
        if not isinstance(value, bool):
            self.problem(f"expected true or false, got {self.kind()}")
            return None
        return value

    def as_number(
        self, *, minimum: float | None = None, maximum: float | None = None, integer: bool = False
    ) -> float | None:
        ok, value = self._plain()
        if not ok:
            return None
        wanted = "an integer" if integer else "a number"
        text = str(self.node.value)
        plain = isinstance(self.node, yaml.ScalarNode) and self.node.style is None
        if plain and _LEADING_ZERO.fullmatch(text):
            # YAML 1.1 reads 0025 as octal 21 (a port or a delay gone wrong), 0587 as text.
            read = f"the octal number {value}" if isinstance(value, int) else "text"
            digits = text.lstrip("+-").replace("_", "").lstrip("0") or "0"
            self.problem(f"{text} has a leading zero: YAML reads it as {read}; write {digits}")
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(f"expected {wanted}, got {self.kind()}")
            return None
        if integer and not isinstance(value, int):
            self.problem(f"expected {wanted}, got {value!r}")
            return None
        if not math.isfinite(value):  # NaN passes every comparison; inf parks a retry for good
            self.problem(f"expected a finite number, got {value!r}")
            return None
        if minimum is not None and value < minimum:
            self.problem(f"must be at least {minimum:g}, got {value!r}")
            return None
        if maximum is not None and value > maximum:
            self.problem(f"must be at most {maximum:g}, got {value!r}")
            return None
        return value

    def as_int(self, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
        value = self.as_number(minimum=minimum, maximum=maximum, integer=True)
        return None if value is None else int(value)

    def as_choice(self, choices: Collection[str]) -> str | None:
        if self.node.tag == "tag:yaml.org,2002:bool":  # YAML reads off, no, on, yes so
            valid = ", ".join(choices)
            self.problem(
                f"{self.node.value} is read as true or false: quote it, or one of: {valid}"
            )
            return None
        value = self.as_str()
        if value is not None and value not in choices:
            self.problem(f"{value!r} is not one of: {', '.join(choices)}")
            return None
        return value


def parse(text: str, name: str) -> tuple[Doc, Node | None]:
    """Compose `text`; a syntax error becomes a problem with its line, and the root is None."""
    doc = Doc(name)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        # The parser's errors: the line of what is wrong, and of the block it breaks. The
        # scanner's (an unclosed quote, a key without its colon) are found at a later token,
        # lines on: there the line where the scalar or key began is the one to fix.
        mark, began = exc.problem_mark, exc.context_mark
        if began is not None and isinstance(exc, yaml.scanner.ScannerError):
            mark = began
        line = mark.line + 1 if mark is not None else None
        context = exc.context or ""
        if context and began is not None and began.line + 1 != line:
            context += f" that began at line {began.line + 1}"
        what = f"{exc.problem} ({context})" if context else exc.problem
        doc.problem(line, "", f"YAML syntax error: {what or exc}")
        return doc, None
    except RecursionError:
        doc.problem(None, "", "YAML nested too deeply")
        return doc, None
    except yaml.YAMLError as exc:
        doc.problem(None, "", f"YAML error: {exc}")
        return doc, None
    if root is None:
        doc.problem(1, "", "the file is empty")
        return doc, None
    try:
        size = _expanded_size(root, {})
    except RecursionError:
        doc.problem(None, "", "YAML nested too deeply")
        return doc, None
    if size > MAX_NODES:  # aliases of aliases: 25 lines can stand for millions of values
        doc.problem(
            None, "", f"YAML with aliases expanded is over {MAX_NODES:,} values: write it out"
        )
        return doc, None
    return doc, Node(doc, "", root)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many nodes `node` stands for once every alias is written out (an alias is the
    same node object as its anchor, so `sizes` counts each object once)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, sizes) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    sizes[id(node)] = size
    return size


def load(path: Path) -> tuple[Doc, Node | None]:
    """Read and compose the file at `path`; an unreadable file is a problem, not a crash."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_BYTES + 1)
    except OSError as exc:
        doc = Doc(str(path))
        doc.problem(None, "", f"cannot read the file: {exc}")
        return doc, None
    if len(data) > MAX_BYTES:
        doc = Doc(str(path))
        doc.problem(None, "", f"over {MAX_BYTES:,} bytes: not a relay.yaml or rules file")
        return doc, None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        doc = Doc(str(path))
        line = data.count(b"\n", 0, exc.start) + 1
        doc.problem(line, "", f"not UTF-8: byte 0x{data[exc.start]:02x} ({exc.reason})")
        return doc, None
    return parse(text, str(path))
