"""YAML as users write it, read as untrusted input: plain data or a one-line ConfigError.

PyYAML's safe loader follows YAML 1.1, which misreads what people write: a bare `off`, `no`,
`on` or `yes` becomes a boolean (so `async_mode: off`, as the docs write it, or a run named
`no`, were refused as "expected str, got False"), and a key written twice silently keeps the
last value. This loader reads booleans as YAML 1.2 does (only true/false), refuses duplicate
keys, and admits only the plain types a config can hold: no dates, binary or sets, keys that
are strings, bounded size and nesting. Whatever the file holds, the answer is data or a
ConfigError, never another exception.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import ConfigError

MAX_FILE_BYTES = 1 << 20
"""A config is a page of text; anything larger is a mistake (or an alias bomb's cousin)."""
MAX_DEPTH = 16
PLAIN_SCALARS = (str, int, float, bool, type(None))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and duplicate keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key (a list): refused later as not a string
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is written twice",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# Booleans and floats as YAML 1.2 reads them: `off`, `no`, `on`, `yes` stay strings, and
# `1e-3` is a number (YAML 1.1 wants `1.0e-3` and reads `1e-3` as a string, so `lr: 1e-3`
# was refused as "expected float").
# Ints too: YAML 1.1 reads `12:30` as 750 (base 60) and `010` as 8; here they are strings.
_REDEFINED = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:int")
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REDEFINED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"""^(?:
        [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
      | [-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
      | [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
      | [-+]?\.(?:inf|Inf|INF)
      | \.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))


def read_yaml_file(path: str | Path) -> dict[str, Any]:
    """The mapping of sections in the YAML file at `path`."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB; a config "
                          "file is a page of YAML")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x})"
                          ) from e
    raw = parse_yaml(text, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, "
                          f"not a {type(raw).__name__}")
    return raw


def parse_yaml(text: str, where: str, depth: int = 0) -> Any:
    """One YAML document as plain data; `where` names it in errors, `depth` is how deep
    in the config it goes (a `--set section.key=` value is not the top level)."""
    try:
        value = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a safe loader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {_first_line(e)}") from e
    except (RecursionError, MemoryError) as e:
        raise ConfigError(f"{where}: nested too deeply to read") from e
    check_plain(value, where, depth)
    return value


def check_plain(value: Any, where: str, depth: int = 0) -> None:
    """Refuse anything a config cannot hold: non-string keys, dates, bytes, sets, NaN,
    nesting deeper than MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}: the key {key!r} must be a string "
                                  f"(quote it: '{key}')")
            check_plain(item, f"{where}.{key}" if where and depth else key, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]", depth + 1)
    elif not isinstance(value, PLAIN_SCALARS):
        raise ConfigError(f"{where}: a {type(value).__name__} is not a config value; "
                          "write a string (quote it), a number, true/false, a list or a "
                          "mapping")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a usable number")


def _first_line(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(error).split())[:200]
