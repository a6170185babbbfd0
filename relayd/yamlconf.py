"""Reading the config file strictly, and telling validation errors in YAML
terms: the path of the key (``limits.bogus_key``, ``listen[0].address``),
the YAML name of the type found, the value as YAML writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import ConfigError


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def yaml_type(value: Any) -> str:
    """The YAML name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def yaml_repr(value: Any) -> str:
    """A scalar as YAML shows it: true/false/null, not Python's reprs."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _describe(err: dict[str, Any]) -> str:
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping of keys, got {yaml_type(value)}"
    if kind == "list_type":
        return f"expected a list, got {yaml_type(value)}"
    msg = err["msg"].removeprefix("Value error, ")
    if kind != "value_error" and not isinstance(value, (dict, list)):
        msg += f" (got {yaml_repr(value)})"
    return msg


def format_errors(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        out.append(f"{_loc(loc)}: {_describe(err)}")
    return out


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML keeps the last one
    silently, so an operator's second `log_level:` would win unseen."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> Any:
    """The decoded document of ``path``; ConfigError naming the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, [f"cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"cannot read: not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} "
                                 f"at offset {exc.start})"]) from None
    try:
        data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f"line {where.line + 1}: " if where else ""
        raise ConfigError(path, [f"{line}invalid YAML: {getattr(exc, 'problem', exc)}"]) from None
    return data
