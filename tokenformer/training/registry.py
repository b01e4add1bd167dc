"""The one table of training commands: command -> (config class, task class, model class), read by
the command line (`tokenformer.__main__`, `tokenformer.cli.train`), the loop (which task trains a
config) and the reference generator (`tokenformer.cli.reference`).

A task's module registers its command (`register`) beside the task; every module of
`tokenformer.training.tasks` is imported the first time the table is read, so that a new task is
one new file there (plus a YAML recipe). They are found by name, not imported here: each imports
this module to register, so a static import back would be a cycle.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

from tokenformer.errors import TokenFormerError

TASKS_PACKAGE = "tokenformer.training.tasks"


@dataclass(frozen=True)
class TrainingCommand:
    """A training command: `tokenformer NAME [CONFIG.yaml] [--field value ...]` trains a `model`
    (the class `init_from` must hold) on `task`, configured by `config`. `help` is its `--help` text
    (the first paragraph its summary), `example` a YAML recipe named there."""

    name: str
    config: type
    task: type
    model: type
    help: str
    example: str = ""


_COMMANDS: dict[str, TrainingCommand] = {}
_loaded = False


def register(command: TrainingCommand) -> TrainingCommand:
    """Add `command` to the table (again with the same entry is fine: a module imported twice)."""
    known = _COMMANDS.get(command.name)
    if known is not None and (known.config, known.task) != (command.config, command.task):
        raise ValueError(f"training command {command.name!r} is registered already, by {known.task.__name__}")
    _COMMANDS[command.name] = command
    return command


def _load_tasks() -> None:
    global _loaded
    if not _loaded:
        package = importlib.import_module(TASKS_PACKAGE)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{TASKS_PACKAGE}.{module.name}")
        _loaded = True


def training_commands() -> dict[str, TrainingCommand]:
    """Every training command by name, `train` first."""
    _load_tasks()
    return {name: _COMMANDS[name] for name in sorted(_COMMANDS)}


def command_named(name: str) -> TrainingCommand:
    commands = training_commands()
    if name not in commands:
        raise TokenFormerError(f"no training command {name!r}: use one of {', '.join(commands)}")
    return commands[name]


def command_of(config: Any) -> TrainingCommand:
    """The command whose config `config` is (its class, or the nearest registered base class)."""
    commands = training_commands().values()
    for cls in type(config).__mro__:
        found = [c for c in commands if c.config is cls]
        if found:
            return found[0]
    raise TokenFormerError(f"{type(config).__name__} is the config of no training command: register its task "
                           f"(tokenformer.training.registry.register)")
