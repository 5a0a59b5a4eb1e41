"""YAML loading that remembers where every value came from.

`load_yaml(text)` returns the plain Python data and a `YamlSource` that maps a location
path (``("lora", "rank", 2)``) to the 1-based line it was written on, so validation errors
can say ``lora.rank[2] (line 12): ...``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

Loc = tuple[str | int, ...]


class YamlSyntaxError(ValueError):
    """The text is not YAML at all; carries the line and column of the problem."""

    def __init__(self, message: str, line: int | None, column: int | None):
        self.line, self.column = line, column
        where = f"line {line}, column {column}: " if line else ""
        super().__init__(f"{where}{message}")


@dataclass(frozen=True)
class YamlSource:
    """The composed node tree of a YAML document, for looking up line numbers."""

    root: yaml.Node | None

    def line_of(self, loc: Loc) -> int | None:
        """1-based line of the deepest node along `loc` that exists in the document."""
        node = self.root
        line = node.start_mark.line + 1 if node is not None else None
        for part in loc:
            child = _child(node, part)
            if child is None:
                break
            node = child
            line = node.start_mark.line + 1
        return line


def _child(node: yaml.Node | None, part: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                # An unknown key is best pointed at by the key itself, a value by its value.
                return value if not _is_leaf_key_lookup(value) else key
        return None
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
        return node.value[part] if 0 <= part < len(node.value) else None
    return None


def _is_leaf_key_lookup(value: yaml.Node) -> bool:
    # Empty values ("key:" with nothing after it) start on the next line; use the key's line.
    return isinstance(value, yaml.ScalarNode) and value.value == "" and value.tag.endswith("null")


def load_yaml(text: str) -> tuple[Any, YamlSource]:
    """Parse YAML text safely; raise `YamlSyntaxError` with a line number if it is not YAML."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        column = mark.column + 1 if mark else None
        raise YamlSyntaxError(str(exc.problem or exc.context or exc), line, column) from None
    except yaml.YAMLError as exc:  # pragma: no cover - yaml raises marked errors in practice
        raise YamlSyntaxError(str(exc), None, None) from None
    return data, YamlSource(node)
