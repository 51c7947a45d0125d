"""Filtered positional updates (`$[]`, `$[<identifier>]` with `arrayFilters`), as mongod 7.0
applies them: each templated path is resolved against the document about to change into the
concrete paths of the array elements it names, and the update applied to those.

Checked as mongod checks them: every identifier in a path has a filter (2, BadValue), every
filter is used (9, FailedToParse), a filter names one identifier, and a path through `$[...]` must
reach an array (2, BadValue)."""

from __future__ import annotations

import re
from typing import Any

from mongomock import filtering

from .codes import CommandError

_BRACKETS = re.compile(r"^\$\[([a-z][A-Za-z0-9]*)?\]$")


def has_filtered_paths(update: Any) -> bool:
    if not isinstance(update, dict):
        return False
    return any(
        isinstance(args, dict) and any("$[" in path for path in args) for args in update.values()
    )


def filters_by_identifier(array_filters: Any, update: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The filters keyed by their identifier, checked against the identifiers the update uses."""
    if array_filters is None:
        array_filters = []
    if not isinstance(array_filters, list):
        raise CommandError(14, "arrayFilters must be an array", "TypeMismatch")
    by_id: dict[str, dict[str, Any]] = {}
    for spec in array_filters:
        if not isinstance(spec, dict) or not spec:
            raise CommandError(9, "Cannot use an expression without a top-level field name")
        names = {key.split(".", 1)[0] for key in spec if not key.startswith("$")}
        if len(names) != 1:
            raise CommandError(
                9, "Error parsing array filter: Expected a single top-level field name"
            )
        name = names.pop()
        if not re.fullmatch(r"[a-z][A-Za-z0-9]*", name):
            raise CommandError(
                2,
                "Error parsing array filter :: caused by :: The top-level field name must be an "
                f"alphanumeric string beginning with a lowercase letter, found '{name}'",
            )
        if name in by_id:
            raise CommandError(
                9, f"Found multiple array filters with the same top-level field name {name}"
            )
        by_id[name] = spec
    used: set[str] = set()
    for args in update.values():
        if not isinstance(args, dict):
            continue
        for path in args:
            for part in path.split("."):
                match = _BRACKETS.match(part)
                if match and match.group(1):
                    if match.group(1) not in by_id:
                        raise CommandError(
                            2,
                            f"No array filter found for identifier '{match.group(1)}' in path "
                            f"'{path}'",
                        )
                    used.add(match.group(1))
    for name in by_id:
        if name not in used:
            raise CommandError(
                9, f"The array filter for identifier '{name}' was not used in the update {update}"
            )
    return by_id


def resolve(
    update: dict[str, Any], filters: dict[str, dict[str, Any]], doc: dict[str, Any]
) -> dict[str, Any]:
    """`update` with each templated path replaced by the concrete paths it names in `doc`."""
    resolved: dict[str, Any] = {}
    for modifier, args in update.items():
        if not isinstance(args, dict):
            resolved[modifier] = args
            continue
        concrete: dict[str, Any] = {}
        for path, value in args.items():
            if "$[" not in path:
                concrete[path] = value
                continue
            for expanded in _expand(doc, path.split("."), [], filters, path):
                concrete[expanded] = value
        if concrete:
            resolved[modifier] = concrete
    return resolved


def _expand(
    node: Any, parts: list[str], prefix: list[str], filters: dict[str, Any], path: str
) -> list[str]:
    if not parts:
        return [".".join(prefix)]
    head, rest = parts[0], parts[1:]
    match = _BRACKETS.match(head)
    if match:
        if not isinstance(node, list):
            raise CommandError(
                2,
                f"The path '{'.'.join(prefix)}' must exist in the document in order to apply "
                "array updates.",
            )
        name = match.group(1)
        out: list[str] = []
        for index, element in enumerate(node):
            if name is None or filtering.filter_applies(filters[name], {name: element}):
                out.extend(_expand(element, rest, [*prefix, str(index)], filters, path))
        return out
    if isinstance(node, dict):
        child = node.get(head)
    elif isinstance(node, list) and head.isdigit() and int(head) < len(node):
        child = node[int(head)]
    else:
        child = None
    if child is None and any(_BRACKETS.match(p) for p in rest):
        raise CommandError(
            2,
            f"The path '{'.'.join([*prefix, head])}' must exist in the document in order to "
            "apply array updates.",
        )
    return _expand(child, rest, [*prefix, head], filters, path)
