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
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Sequence, TypeVar

from tokenformer.errors import TokenFormerError
from tokenformer.inputs import read_yaml


def show(bound: float) -> str:
    """A bound as a person reads it: whole numbers in full (1048576, not 1.04858e+06), others short."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The range a number must lie in: `minimum`/`maximum` inclusive, `above`/`below` exclusive."""

    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None

    def describe(self) -> str:
        """The range in words: "at least 1", "in [0, 1)", "above 0" ..."""
        low = f"[{show(self.minimum)}" if self.minimum is not None else \
            f"({show(self.above)}" if self.above is not None else ""
        high = f"{show(self.maximum)}]" if self.maximum is not None else \
            f"{show(self.below)})" if self.below is not None else ""
        if low and high:
            return f"in {low}, {high}"
        if self.minimum is not None:
            return f"at least {show(self.minimum)}"
        if self.above is not None:
            return f"above {show(self.above)}"
        return f"at most {show(self.maximum)}" if self.maximum is not None else f"below {show(self.below)}"

    def holds(self, value: float) -> bool:
        return ((self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)
                and (self.above is None or value > self.above) and (self.below is None or value < self.below))


def check_number(name: str, value: Any, bounds: Bounds, integer: bool = False) -> None:
    """One sentence (naming `name`) unless `value` is a number (an integer if `integer`) within `bounds`."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TokenFormerError(f"{name} must be {kind} {bounds.describe()}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value) or not bounds.holds(value):  # NaN, infinities: none
        raise TokenFormerError(f"{name} must be {'a finite number ' if kind == 'a number' else ''}"
                               f"{bounds.describe()}, got {value!r}")


MAX_SEED = 2**64 - 1  # what torch.manual_seed takes


def number(kind: type, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, below: float | None = None):
    """An argparse `type=` for a number in a range: `--top-p 2` is a usage error (exit 2) that says
    the range, not a traceback later."""
    bounds = Bounds(minimum, maximum, above, below)

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {'an integer' if kind is int else 'a number'} "
                                             f"{bounds.describe()}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value) or not bounds.holds(value):
            raise argparse.ArgumentTypeError(f"must be {'a finite number ' if kind is float else ''}"
                                             f"{bounds.describe()}, got {text}")
        return value

    parse.__name__ = kind.__name__  # what argparse calls the type in its own messages
    parse.bounds, parse.kind = bounds, kind  # read by the hostile suite, which tries absurd values
    return parse


def option(help: str, minimum: float | None = None, maximum: float | None = None, above: float | None = None,
           below: float | None = None, **kwargs: Any) -> Any:
    """A dataclass field carrying its `--help` text and, for numbers, the range it must lie in
    (checked on the command line, in YAML, and when the config is built in Python)."""
    metadata: dict[str, Any] = {"help": help}
    if (minimum, maximum, above, below) != (None, None, None, None):
        metadata["bounds"] = Bounds(minimum, maximum, above, below)
    return dataclasses.field(metadata=metadata, **kwargs)


RunConfigT = TypeVar("RunConfigT", bound="RunConfig")


class RunConfig:
    """Base of the run configs: `from_dict`, `from_yaml`, `from_args`, `to_dict`. A subclass states
    its `command`, which names it in errors ("unknown train-vision config field ...")."""

    command: ClassVar[str]

    @classmethod
    def from_dict(cls: type[RunConfigT], values: dict[str, Any]) -> RunConfigT:
        """Build from a mapping (YAML, CLI); `-` in keys counts as `_`; values are converted to the
        field's type; an unknown key is an error naming the nearest field."""
        return cls(**cls.converted(values))

    @classmethod
    def converted(cls, values: dict[str, Any]) -> dict[str, Any]:
        """`values` by field name, each converted to its field's type and checked against its range."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        converted = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in fields:
                close = difflib.get_close_matches(name, list(fields), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise TokenFormerError(f"unknown {cls.command} config field {key!r}{hint}; "
                                       f"`tokenformer {cls.command} --help` lists the fields")
            converted[name] = convert_value(cls, name, value)
            cls.check_field(fields[name], converted[name])
        return converted

    @classmethod
    def check_field(cls, f: dataclasses.Field, value: Any) -> None:
        """A value of field `f` lies in the range the field declares (an unset optional one is fine)."""
        if "bounds" in f.metadata and value is not None:
            check_number(f"{cls.command} config field {f.name}", value, f.metadata["bounds"],
                         integer=field_type(cls, f.name) is int)

    @classmethod
    def from_yaml(cls: type[RunConfigT], path: str | Path,
                  overrides: dict[str, Any] | None = None) -> RunConfigT:
        """Read the fields in a YAML file; `overrides` (the command line's `--field value`) win."""
        what = f"{cls.command} config"
        values = read_yaml(path, what, f"give a YAML mapping of {what} fields (see configs/)")
        try:  # the file's own values first, so that an error in them names the file
            values = cls.converted(values)
        except TokenFormerError as e:
            raise TokenFormerError(f"{what} {path}: {e}") from None
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

    @classmethod
    def listed_fields(cls) -> list[dataclasses.Field]:
        """The fields in the order `--help` and the reference list them."""
        return list(dataclasses.fields(cls))

    def check_bounds(self) -> None:
        """Every numeric field declared with a range lies in it."""
        for f in dataclasses.fields(self):
            self.check_field(f, getattr(self, f.name))


@functools.lru_cache(maxsize=None)
def _type_hints(config_class: type) -> dict[str, Any]:
    # evaluating a class's string annotations costs ~10 ms; every command line asks per field
    return typing.get_type_hints(config_class)


def field_type(config_class: type, name: str) -> Any:
    """The type of field `name` of `config_class`, with `X | None` reduced to `X`."""
    hint = _type_hints(config_class)[name]
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
    for f in config_class.listed_fields():
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kwargs: dict[str, Any] = dict(dest=f"field_{f.name}", default=argparse.SUPPRESS, metavar="VALUE",
                                      help=f"{f.metadata['help']} (default {_default_text(f)})")
        if field_type(config_class, f.name) is bool:
            kwargs.update(nargs="?", const="true")
        if "bounds" in f.metadata:
            kwargs["type"] = _field_parser(config_class, f.name, f.metadata["bounds"])
        parser.add_argument(*names, **kwargs)
    # everything after CONFIG: argparse stops there, `parse_overrides` reads the `--field value` pairs
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="more --field value overrides after CONFIG (same fields as above)")


def _field_parser(config_class: type, name: str, bounds: Bounds):
    """The argparse `type=` of a field with a range: converted as YAML values are, then checked, so
    that `--train_iters -5` is a usage error naming the option."""
    def parse(text: str) -> Any:
        try:
            value = convert_value(config_class, name, text)
            if value is not None:
                check_number(name, value, bounds, integer=field_type(config_class, name) is int)
        except TokenFormerError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    parse.__name__ = getattr(field_type(config_class, name), "__name__", "value")
    return parse


def reference_markdown(config_class: type) -> str:
    """A Markdown table of the fields of `config_class`: name, type, default, help."""
    lines = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in config_class.listed_fields():
        kind = field_type(config_class, f.name)
        kind = getattr(kind, "__name__", str(kind).replace("typing.", ""))
        default = _default_text(f).replace("|", "\\|")
        meaning = f.metadata["help"].replace("|", "/")
        if "bounds" in f.metadata:
            meaning += f"; {f.metadata['bounds'].describe()}"
        lines.append(f"| `{f.name}` | {kind} | `{default}` | {meaning} |")
    return "\n".join(lines) + "\n"
