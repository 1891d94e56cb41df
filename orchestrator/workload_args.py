"""A workload's arguments as a typed dataclass, validated like the rest of the config.

A workload module declares its arguments by naming a dataclass `ARGS`:

    @dataclass(kw_only=True)
    class GPTArgs:
        n_layer: int = 2
        parallelism: Literal["ddp", "fsdp"] = "ddp"

    ARGS = GPTArgs

`orchestrator run` builds it from `workload.args` before Ray starts, so a typo
(`workload.args.n_layr`), a wrong type or a value its `__post_init__` refuses is exit 2 and one
line naming the key, instead of a crash loop inside the workers 30 s later. The workers build
the same dataclass again from `ctx.args` with `parse_args`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from orchestrator.errors import ConfigError

_PREFIX = "workload.args"


def parse_args(cls: type, args: dict[str, Any]) -> Any:
    """Build the args dataclass `cls` from `args`: unknown names, wrong types and values its
    `__post_init__` refuses (a ValueError) are a ConfigError naming `workload.args.<key>`."""
    if not isinstance(args, dict):
        raise ConfigError(f"{_PREFIX}: expected a mapping, got {type(args).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(args) - fields, key=str)
    if unknown:
        raise ConfigError(f"{_PREFIX}.{unknown[0]} is not an argument of this workload; "
                          f"allowed: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {name: _check(hints[name], value, f"{_PREFIX}.{name}")
              for name, value in args.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        message = " ".join(str(e).split())
        if not message.startswith(_PREFIX):
            message = f"{_PREFIX}: {message}"
        raise ConfigError(message) from e


def _check(hint: Any, value: Any, key: str) -> Any:
    """`value` if it has type `hint` (ints are accepted for floats), else a ConfigError."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed or isinstance(value, bool) != any(
                isinstance(a, bool) for a in allowed):
            raise ConfigError(f"{key}: {value!r} is not allowed; use one of "
                              f"{', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {_short(value)} is not {_describe(hint)}")
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_short(value)}")
        return [_check(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_short(value)}")
        return value
    if hint in (int, float) and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= 2**63:  # beyond what a tensor or a torch RNG seed holds
            raise ConfigError(f"{key}: {_short(value)} is out of range")
        return float(value) if hint is float else value
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {_short(value)}")
        return value
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected nothing (null), got {_short(value)}")
        return value
    return value  # a type we do not check; the dataclass's __post_init__ may


def _describe(hint: Any) -> str:
    names = [getattr(a, "__name__", str(a)) for a in typing.get_args(hint)]
    return "a " + " or a ".join(names)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
