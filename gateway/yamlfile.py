"""YAML files validated by pydantic models, with errors that name file:line and field.

Shared by routes.yaml and every other YAML file the platform reads (the services'
provider and price table, for one), so all of them report mistakes the same way:
``providers.yaml:12: providers.openai.base_url: ...``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError

M = TypeVar("M", bound=BaseModel)
ExtraCheck = Callable[[BaseModel], list[tuple[tuple, str]]]


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys and reads booleans the YAML 1.2 way.

    YAML 1.1 reads ``on``, ``off``, ``yes`` and ``no`` as booleans, which would turn
    ``retry: {on: [...]}`` into a ``True`` key; only ``true``/``false`` are booleans here.
    """

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _line_index(node: yaml.Node | None, path: tuple = (), out: dict | None = None) -> dict:
    """Map every key path (as pydantic reports it) to its 1-based line."""
    out = {} if out is None else out
    if node is None:
        return out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[(*path, key)] = key_node.start_mark.line + 1
            _line_index(value_node, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*path, i)] = item.start_mark.line + 1
            _line_index(item, (*path, i), out)
    return out


def _field_name(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _line_for(lines: dict, loc: tuple) -> int:
    loc = tuple(x for x in loc if isinstance(x, int) or "[" not in str(x))
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return 1


def parse_yaml_model(
    text: str, source: str, model: type[M], extra_check: ExtraCheck | None = None
) -> M:
    """Parse YAML text into ``model``; raise :class:`ConfigError` naming file:line and field.

    ``extra_check`` may report cross-references (location, message) that the model
    alone cannot see; they get lines like any other problem.
    """
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader) if node is not None else {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError(f"{source}:{line}: invalid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}:1: the file must be a mapping of settings")
    lines = _line_index(node)
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        found = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field (check the spelling)"
            found.append((tuple(err["loc"]), msg))
    else:
        found = extra_check(config) if extra_check else []
        if not found:
            return config
    problems = [
        f"{source}:{_line_for(lines, loc)}: {_field_name(loc)}: {msg}" for loc, msg in found
    ]
    raise ConfigError("\n".join(problems), problems=problems)


def load_yaml_model(
    path: str | Path,
    model: type[M],
    extra_check: ExtraCheck | None = None,
    *,
    what: str = "file",
) -> M:
    """Read a YAML file and validate it into ``model``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    return parse_yaml_model(text, str(path), model, extra_check)
