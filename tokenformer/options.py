"""Run configs as options: dataclasses whose fields carry their `--help` text, read from YAML and
from the command line with the same spellings and conversions, and listed in the docs reference.

One implementation for every command that takes a config (`train`, `train-vision`): a field
`lr_decay_style` is `--lr_decay_style` and `--lr-decay-style` on the command line, a bare
`--resume` means true, YAML's `6e-4` (a string to YAML) becomes a float, and an unknown field is
an error naming the nearest one. `reference_markdown` writes the table of `docs/reference.md`
from the same help texts.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Sequence, TypeVar

from tokenformer.errors import TokenFormerError


def option(help: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its `--help` text."""
    return dataclasses.field(metadata={"help": help}, **kwargs)


RunConfigT = TypeVar("RunConfigT", bound="RunConfig")


class RunConfig:
    """Base of the run configs: `from_dict`, `from_yaml`, `from_args`, `to_dict`. A subclass states
    its `command`, which names it in errors ("unknown train-vision config field ...")."""

    command: ClassVar[str]

    @classmethod
    def from_dict(cls: type[RunConfigT], values: dict[str, Any]) -> RunConfigT:
        """Build from a mapping (YAML, CLI); `-` in keys counts as `_`; values are converted to the
        field's type; an unknown key is an error naming the nearest field."""
        known = [f.name for f in dataclasses.fields(cls)]
        converted = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise TokenFormerError(f"unknown {cls.command} config field {key!r}{hint}; "
                                       f"`tokenformer {cls.command} --help` lists the fields")
            converted[name] = convert_value(cls, name, value)
        return cls(**converted)

    @classmethod
    def from_yaml(cls: type[RunConfigT], path: str | Path,
                  overrides: dict[str, Any] | None = None) -> RunConfigT:
        """Read the fields in a YAML file; `overrides` (the command line's `--field value`) win."""
        values = read_yaml_mapping(path, f"{cls.command} config")
        values.update(overrides or {})
        return cls.from_dict(values)

    @classmethod
    def from_args(cls: type[RunConfigT], args: argparse.Namespace) -> RunConfigT:
        """The config of a command line built by `add_options`: CONFIG.yaml, then `--field value`."""
        values = {k[len("field_"):]: v for k, v in vars(args).items() if k.startswith("field_")}
        values.update(parse_overrides(args.overrides or []))
        if args.config:
            return cls.from_yaml(args.config, values)
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping of fields in a YAML config file (`what` names it in errors)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TokenFormerError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise TokenFormerError(f"{path} must hold a mapping of {what} fields")
    return values


def field_type(config_class: type, name: str) -> Any:
    """The type of field `name` of `config_class`, with `X | None` reduced to `X`."""
    hint = typing.get_type_hints(config_class)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _is_null(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("none", "null")


def convert_value(config_class: type, name: str, value: Any) -> Any:
    """Turn a YAML or command-line value into the type of field `name` of `config_class`."""
    target = field_type(config_class, name)
    if value is None or target is Any:
        if isinstance(value, str) and value.lstrip().startswith("{"):  # `--model "{name: tiny}"`
            import yaml

            return yaml.safe_load(value)
        return value
    try:
        if target is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "yes", "1", "on"):
                    return True
                if lowered in ("false", "no", "0", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if target is int:
            if _is_null(value):
                return None
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError(value)
            return int(number)
        if target is float:
            return float(value)
        if target is str:
            return None if _is_null(value) else str(value)
        if typing.get_origin(target) is list:
            item = (typing.get_args(target) or (str,))[0]
            if isinstance(value, str):
                text = value.strip()
                if text.startswith("[") and text.endswith("]"):  # `--mean [0.5,0.5]`
                    text = text[1:-1]
                value = [part.strip() for part in text.split(",") if part.strip()]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            return [item(v) for v in value]
    except (TypeError, ValueError):
        command = getattr(config_class, "command", config_class.__name__)
        raise TokenFormerError(f"{command} config field {name} expects {getattr(target, '__name__', target)}, "
                               f"got {value!r}") from None
    return value


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """`--field value`, `--field=value` and bare `--flag` (true) into a dict; `-` counts as `_`."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise TokenFormerError(f"unexpected argument {token!r}: overrides are --field value")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value = tokens[i + 1]
                i += 1
            else:
                value = "true"
        overrides[key.replace("-", "_")] = value
        i += 1
    return overrides


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return str(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return str(f.default_factory())  # type: ignore[misc]
    return "required"


def add_options(parser: argparse.ArgumentParser, config_class: type, example: str) -> None:
    """`[CONFIG.yaml] [--field value ...]`: every field of `config_class` as `--field` and, for names
    with `_`, `--field-name`; booleans also bare (`--resume`). `example` names a config file."""
    parser.usage = "%(prog)s [CONFIG.yaml] [--field value ...]"
    parser.add_argument("config", nargs="?", help=f"YAML file of {config_class.command} config fields "
                                                  f"(e.g. {example})")
    for f in dataclasses.fields(config_class):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kwargs: dict[str, Any] = dict(dest=f"field_{f.name}", default=argparse.SUPPRESS, metavar="VALUE",
                                      help=f"{f.metadata['help']} (default {_default_text(f)})")
        if field_type(config_class, f.name) is bool:
            kwargs.update(nargs="?", const="true")
        parser.add_argument(*names, **kwargs)
    # everything after CONFIG: argparse stops there, `parse_overrides` reads the `--field value` pairs
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="more --field value overrides after CONFIG (same fields as above)")


def reference_markdown(config_class: type) -> str:
    """A Markdown table of the fields of `config_class`: name, type, default, help."""
    lines = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(config_class):
        kind = field_type(config_class, f.name)
        kind = getattr(kind, "__name__", str(kind).replace("typing.", ""))
        default = _default_text(f).replace("|", "\\|")
        lines.append(f"| `{f.name}` | {kind} | `{default}` | {f.metadata['help'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"
