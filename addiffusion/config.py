"""Typed configs: one frozen dataclass per ``params.yaml`` section, validated at load time.

Every stage config subclasses :class:`StageConfig`. Loading rejects unknown keys and values of the
wrong type with messages that name the key, the expected value and the value got, e.g.
``collect.n_max must be >= 1, got 0``. Every float must be finite (``.nan`` / ``.inf`` are refused
for every key). Range checks live in each config's ``__post_init__`` and use :func:`check`.
:func:`read_params` refuses a duplicated key and an unknown top-level section, naming the line.

Errors the user can fix (a bad params key, file or row) are :class:`UserError`: the CLI prints
them on one line and exits 2, without a traceback (unless ``--debug``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml


class UserError(Exception):
    """Something the user gave is wrong: a params key, an input file, a row of it. The message
    names the file, row or key and says what to do; ``addiffusion`` prints it on one line and
    exits 2 (see :func:`addiffusion.cli.main`)."""


class ConfigError(UserError, ValueError):
    """A ``params.yaml`` section has an unknown key or a bad value."""


SECTIONS = (
    "backbone",
    "collect",
    "datasets",
    "rewards",
    "offline_rl",
    "online_finetune",
    "shapes",
    "eval",
    "distill",
)
"""The top-level sections of ``params.yaml``: the ``section`` of every :class:`StageConfig`
(tests/reliability/test_config_errors.py checks that the two agree)."""


C = TypeVar("C", bound="StageConfig")


def check(ok: bool, key: str, expected: str, got: object) -> None:
    """Raise :class:`ConfigError` ``"<key> must be <expected>, got <got>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {got!r}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key} has an unsupported type")
    if origin is typing.Literal:
        check(value in args, key, "one of " + ", ".join(repr(a) for a in args), value)
        return value
    if origin in (tuple, list):
        check(isinstance(value, (list, tuple)), key, "a list", value)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple:
            check(len(value) == len(args), key, f"a list of {len(args)} items", value)
            return tuple(
                _coerce(v, a, f"{key}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        check(isinstance(value, dict), key, "a mapping", value)
        return {
            _coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), key, "a mapping", value)
        return _from_mapping(tp, value, key)
    if tp is bool:
        check(isinstance(value, bool), key, "true or false", value)
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    if tp is float:
        check(
            isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value
        )
        # YAML's .nan / .inf are floats; no setting of the pipeline means anything with them.
        check(math.isfinite(value), key, "a finite number", value)
        return float(value)
    if tp is str:
        check(isinstance(value, str), key, "a string", value)
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r} in the config definition")


def _from_mapping(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}.{unknown[0]} (known keys of {prefix}: {', '.join(fields)})"
        )
    kwargs = {name: _coerce(data[name], hints[name], f"{prefix}.{name}") for name in data}
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base of the stage configs. ``section`` is the ``params.yaml`` key the config mirrors."""

    section: ClassVar[str] = ""

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any] | None) -> C:
        """Build from a mapping (a ``params.yaml`` section), rejecting unknown keys and bad values."""
        return _from_mapping(cls, dict(data or {}), cls.section)

    @classmethod
    def from_params(cls: type[C], params: dict[str, Any]) -> C:
        """Build from the whole parsed ``params.yaml`` (a missing section means all defaults)."""
        section = params.get(cls.section)
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{cls.section} must be a mapping, got {section!r}")
        return cls.from_dict(section)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the
    last one, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen[key] = line
            except TypeError:  # an unhashable key; SafeLoader's own error names it
                continue
            if first is not None:
                raise ConfigError(
                    f"{self.name}:{line}: key {key!r} is given twice (first on line {first}); "
                    "keep one"
                )
        return super().construct_mapping(node, deep=deep)


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Parse a params file. Library code never calls this; ``__main__`` / CLI code does.

    Raises :class:`ConfigError` naming the line on invalid YAML, a duplicated key or a top-level
    section that no stage reads (:data:`SECTIONS`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"params file {path} is not UTF-8 text (byte {e.start})") from e
    loader = _StrictLoader(text)
    loader.name = str(path)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({e.problem or e.context})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    finally:
        loader.dispose()
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    for key_node, _ in node.value if node is not None else ():
        key = key_node.value
        if key not in SECTIONS:
            raise ConfigError(
                f"{path}:{key_node.start_mark.line + 1}: unknown section {key!r} (known "
                f"sections: {', '.join(SECTIONS)})"
            )
    return data
