"""YAML loading that remembers where every value came from.

`load_yaml(text)` returns the plain Python data and a `YamlSource` that maps a location
path (``("lora", "rank", 2)``) to the 1-based line it was written on, so validation errors
can say ``lora.rank[2] (line 12): ...``.

Manifests come from anywhere, so loading is bounded: plain JSON-like values only (no
`!!set`, `!!binary`, `!!omap`, `!!pairs`: a set's order would change job ids between runs),
nesting at most `MAX_DEPTH` deep, integers of at most `MAX_INT_DIGITS` digits, strings that
are valid Unicode (no lone surrogates from `"\\ud800"` escapes), and no key written twice in one
mapping (YAML would keep the last silently): `YamlDuplicateKeyError` lists each with both lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from storage.errors import DomainError

Loc = tuple[str | int, ...]
MAX_DEPTH = 64
MAX_INT_DIGITS = 64
REFUSED_TAGS = ("set", "binary", "omap", "pairs")


class YamlSyntaxError(DomainError):
    """The text is not YAML at all; carries the line and column of the problem."""

    def __init__(self, message: str, line: int | None, column: int | None):
        self.line, self.column = line, column
        where = f"line {line}, column {column}: " if line else ""
        super().__init__(f"{where}{message}")


class YamlDuplicateKeyError(YamlSyntaxError):
    """Keys written twice in one mapping; `duplicates` holds (location, line, line first written)."""

    def __init__(self, duplicates: list[tuple[Loc, int, int]]):
        self.duplicates = duplicates
        loc, line, first = duplicates[0]
        more = f" (and {len(duplicates) - 1} more)" if len(duplicates) > 1 else ""
        super().__init__(f"the key {str(loc[-1])[:40]!r} is written twice, on line {first} and line {line}{more}", None, None)
        self.line = line


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


class _ManifestLoader(yaml.SafeLoader):
    """SafeLoader limited to the values a manifest can hold; refusals carry the line."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """PyYAML's constructors raise plain ValueError, IndexError, AttributeError… on odd scalars
        (`!!int ""`, `!!timestamp x`): report them as YAML errors at the value's line."""
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of a value constructor is bad input
            tag = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {str(node.value)[:40]!r} as {tag}: {exc}", node.start_mark) from None

    def construct_yaml_int(self, node: yaml.Node) -> int:
        digits = sum(c.isdigit() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {digits} digits is too large (at most {MAX_INT_DIGITS})", node.start_mark)
        return super().construct_yaml_int(node)

    def construct_yaml_str(self, node: yaml.Node) -> str:
        value = super().construct_yaml_str(node)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"the string {value[:40]!r} is not valid Unicode (a lone surrogate escape?)", node.start_mark) from None
        return value

    def refuse_tag(self, node: yaml.Node) -> None:
        raise yaml.constructor.ConstructorError(
            None, None, f"YAML type {node.tag.rsplit(':', 1)[-1]!r} is not allowed in a manifest; "
            "use plain mappings, lists and scalars", node.start_mark)


_ManifestLoader.add_constructor("tag:yaml.org,2002:int", _ManifestLoader.construct_yaml_int)
_ManifestLoader.add_constructor("tag:yaml.org,2002:str", _ManifestLoader.construct_yaml_str)
for _tag in REFUSED_TAGS:
    _ManifestLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _ManifestLoader.refuse_tag)


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH before composing (composing recurses per level)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                raise YamlSyntaxError(f"nested more than {MAX_DEPTH} levels deep", mark.line + 1, mark.column + 1)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _duplicate_keys(root: yaml.Node | None) -> list[tuple[Loc, int, int]]:
    """(location, line, first line) of every key written a second time in the same mapping.

    Keys are compared as the loader constructs them (`1` and `0x1` are one key), merge keys
    (`<<: *defaults`) are not duplicates, and a node reached again through an alias is walked once.
    """
    constructor = _ManifestLoader("")
    found: list[tuple[Loc, int, int]] = []
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, Loc]] = [(root, ())] if root is not None else []
    while stack:  # iterative: aliases can chain nodes deeper than the recursion limit
        node, loc = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, (*loc, i)) for i, child in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = constructor.construct_object(key_node)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        found.append(((*loc, key), line, first[key]))
                    else:
                        first[key] = line
                except TypeError:  # an unhashable key: the loader refuses it with its own message
                    continue
                stack.append((value_node, (*loc, key)))
    return sorted(found, key=lambda item: item[1])


def load_yaml(text: str) -> tuple[Any, YamlSource]:
    """Parse YAML text safely; raise `YamlSyntaxError` with a line number if it is not usable YAML,
    `YamlDuplicateKeyError` (a subclass) if a mapping holds a key twice."""
    try:
        _check_depth(text)
        node = yaml.compose(text, Loader=_ManifestLoader)
        data = yaml.load(text, Loader=_ManifestLoader)  # noqa: S506 - a SafeLoader subclass
        duplicates = _duplicate_keys(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        column = mark.column + 1 if mark else None
        raise YamlSyntaxError(str(exc.problem or exc.context or exc), line, column) from None
    except yaml.YAMLError as exc:  # the reader's errors (control characters, bad encodings) carry no mark
        raise YamlSyntaxError(str(exc), None, None) from None
    if duplicates:
        raise YamlDuplicateKeyError(duplicates)
    return data, YamlSource(node)
