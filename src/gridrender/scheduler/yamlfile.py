"""Safe YAML loading that remembers where every key was written.

Job files are user input: they are parsed with PyYAML's SafeLoader only (no tags
that build Python objects), duplicate keys are errors rather than silent
overwrites, and every key path keeps its line so validation errors can point at it.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import JobError, Problem

MAX_BYTES = 1 << 20  # a job file is a few hundred lines; anything bigger is a mistake
MAX_NODES = 200_000  # bounds alias ("billion laughs") expansion while walking

Path = tuple[Any, ...]


def decode(raw: bytes, source: str) -> str:
    if len(raw) > MAX_BYTES:
        raise JobError(f"file is {len(raw):,} bytes; a job file may be at most {MAX_BYTES:,}", source)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise JobError([Problem("", f"not UTF-8 text (byte 0x{raw[exc.start]:02x})", line)], source) from None


def load(text: str, source: str) -> tuple[Any, dict[Path, int]]:
    """Parse one YAML document; return the data and a map key path -> 1-based line."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # the reader rejects control characters right here
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines: dict[Path, int] = {}
        _walk(node, (), lines, [0], source)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise JobError([Problem("", f"YAML: {exc.problem or exc.context}", line)], source) from None
    except yaml.YAMLError as exc:
        raise JobError([Problem("", f"YAML: {exc}")], source) from None
    except RecursionError:
        raise JobError("YAML nests too deeply", source) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


def _walk(node: yaml.Node, path: Path, lines: dict[Path, int], seen: list[int], source: str) -> None:
    seen[0] += 1
    if seen[0] > MAX_NODES:
        raise JobError(f"document expands to more than {MAX_NODES:,} YAML nodes", source)
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        keys: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node.value)
            line = key_node.start_mark.line + 1
            if key in keys:
                dotted = ".".join(str(p) for p in (*path, key))
                raise JobError([Problem(dotted, f"duplicate key (first written on line {keys[key]})", line)], source)
            keys[key] = line
            lines[(*path, key)] = line
            _walk(value_node, (*path, key), lines, seen, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), lines, seen, source)


def line_for(lines: dict[Path, int], path: Path) -> int | None:
    """The line of `path`, or of its closest written ancestor."""
    path = tuple(path)
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None
