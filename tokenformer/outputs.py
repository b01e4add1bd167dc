"""The door every output goes out through: a command never modifies or deletes a file it did not
create, never writes into its own inputs, and replaces an earlier output only when told to.

An output folder a command writes carries its marker, `.tokenformer-output.json`, naming the
command. A folder is claimed for a run (`claim_dir`) when it is new or empty; when it holds an
earlier output of the same command (its marker), only with `overwrite` (or, for a training run,
`resume`), and then the command replaces only the entries its own names match (`OUTPUT_NAMES`),
keeping anything else; a folder of another command's output, or one without a marker that holds
any of the names the command writes, is refused even with `overwrite`. A single output file
(`claim_file`) is refused when it exists unless `overwrite` names it, and always when it is one of
the command's inputs. Special files (FIFOs, devices) are refused as outputs. Every refusal is one
`TokenFormerError` sentence; the writes themselves stay atomic (`tokenformer.files`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from tokenformer.errors import TokenFormerError
from tokenformer.files import (ACCURACY_PLOT_FILE, CONFIG_FILE, FINAL_MODEL_DIR, LATEST_FILE, LOSS_PLOT_FILE,
                               METRICS_FILE, PREPARE_METADATA_FILE, SPLIT_PREFIXES, TOKENIZER_FILE, TRAIN_CONFIG_FILE,
                               TRAINER_STATE_FILE, WEIGHTS_FILE, atomic_write_text, training_checkpoints)
from tokenformer.inputs import special_kind

MARKER_FILE = ".tokenformer-output.json"

_MODEL = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
_TRAIN = ("step_*", ".tmp-step_*", LATEST_FILE, f".{LATEST_FILE}.*.tmp", METRICS_FILE, TRAIN_CONFIG_FILE,
          "train_*_config.json", LOSS_PLOT_FILE, ACCURACY_PLOT_FILE, FINAL_MODEL_DIR, "captions.jsonl", ".*.tmp")
# The top-level names each command writes into its output folder (shell patterns): what it
# recognises as its own in a folder that carries its marker. A command not listed is a training
# command, whose folder is a run's (`RUN_NAMES`).
OUTPUT_NAMES: dict[str, tuple[str, ...]] = {
    "prepare": tuple(f"{prefix}.{ext}" for prefix in SPLIT_PREFIXES.values() for ext in ("bin", "idx"))
    + (TOKENIZER_FILE, PREPARE_METADATA_FILE),
    "make-scenes": ("train", "val", "scenes.json", ".*.tmp"),
    "grow": _MODEL + (TRAINER_STATE_FILE, ".*.tmp"),
    "shrink": _MODEL + (".*.tmp",),
    # `--format hf` adds what transformers writes beside the weights
    "convert": _MODEL + ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                         "modeling_tokenformer.py", ".*.tmp"),
}
RUN_NAMES = _TRAIN  # a training command's (any in tokenformer.training.registry): its run folder


def owner_of(directory: Path) -> str | None:
    """The command whose marker `directory` carries, or None (no marker, or one that is not ours)."""
    path = directory / MARKER_FILE
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    command = value.get("command") if isinstance(value, dict) else None
    return command if isinstance(command, str) else None


def is_own(command: str, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OUTPUT_NAMES.get(command, RUN_NAMES))


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(path)).resolve()


def check_not_input(output: Path, command: str, inputs: Iterable[str | Path], what: str) -> None:
    """Refuse an output that is one of the command's inputs, or a folder an input lies in under one
    of the names the command writes."""
    target = _resolved(output)
    for given in inputs:
        source = _resolved(given)
        inside = target in source.parents and is_own(command, source.relative_to(target).parts[0])
        if source == target or inside:
            raise TokenFormerError(f"{what} {output} is an input of this command ({given}): writing there would "
                                   f"replace what it reads; choose another {what}")


def refusal(output: Path, command: str, what: str, overwrite: bool, resume: bool) -> str | None:
    """Why folder `output` cannot take this run's output, or None when it can."""
    entries = sorted(p.name for p in output.iterdir() if p.name != MARKER_FILE)
    if not entries:
        return None
    owner = owner_of(output)
    tell = f"tokenformer {command}"
    if owner is None and resume and training_checkpoints(output):
        return None  # a run written before the marker existed: resuming it reads and continues its checkpoints
    if owner == command:
        if resume or overwrite:
            return None
        again = "pass --overwrite to replace it (its files only)" if command in OUTPUT_NAMES \
            else "pass --resume to continue it, --overwrite to replace it"
        return f"{what} {output} holds an earlier output of `{tell}`: {again}, or choose another {what}"
    if owner is not None:
        return (f"{what} {output} holds the output of `tokenformer {owner}`, not of `{tell}`: choose another {what} "
                f"(--overwrite never replaces another command's output)")
    ours = [name for name in entries if is_own(command, name)]
    if overwrite and not ours:
        return None  # write beside what is there, which no name of ours touches
    listed = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    if overwrite:
        return (f"{what} {output} holds {ours[0]}, which `{tell}` did not write (no {MARKER_FILE} of it): "
                f"--overwrite replaces only its own files; choose another {what} or move {ours[0]} away")
    return (f"{what} {output} is not empty ({listed}) and is not an earlier output of `{tell}`: choose a new or "
            f"empty {what}, or pass --overwrite to write beside those files (it never replaces them)")


def mark_dir(output: str | Path, command: str, *, overwrite: bool = False, resume: bool = False,
             inputs: Iterable[str | Path] = (), what: str = "output folder") -> bool:
    """Claim folder `output` for `command` (the rules in the module docstring) and mark it; whether
    the folder was new or empty before (what `claim_dir` empties again when the run fails)."""
    output = Path(output)
    special = special_kind(output)
    if special:
        raise TokenFormerError(f"{what} {output} is {special}, not a folder: give a folder path")
    if output.exists() and not output.is_dir():
        raise TokenFormerError(f"{what} {output} is a file, not a folder: give a new or empty folder")
    check_not_input(output, command, inputs, what)
    existed = output.is_dir()
    if existed:
        reason = refusal(output, command, what, overwrite, resume)
        if reason:
            raise TokenFormerError(reason)
    fresh = not existed or not any(output.iterdir())
    output.mkdir(parents=True, exist_ok=True)
    if owner_of(output) != command:
        atomic_write_text(output / MARKER_FILE, json.dumps(
            {"command": command, "note": "written by tokenformer: this folder is its output", "created":
             time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
    return fresh


@contextmanager
def claim_dir(output: str | Path, command: str, *, overwrite: bool = False, resume: bool = False,
              inputs: Iterable[str | Path] = (), what: str = "output folder") -> Iterator[Path]:
    """`mark_dir` for one run of `command`; when the run fails, a folder this run created, or found
    empty, is emptied of what the run left, unless it is a training run's (its checkpoints resume)."""
    output = Path(output)
    existed = output.is_dir()
    fresh = mark_dir(output, command, overwrite=overwrite, resume=resume, inputs=inputs, what=what)
    try:
        yield output
    except BaseException:
        if fresh and command in OUTPUT_NAMES:  # a training run keeps its checkpoints, to resume
            _empty(output, remove=not existed)
        raise


def _empty(directory: Path, remove: bool) -> None:
    """Remove what a failed run wrote into a folder that was new (`remove`: the folder too) or empty."""
    if remove:
        shutil.rmtree(directory, ignore_errors=True)
        return
    for path in directory.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def claim_file(output: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = (),
               what: str = "output file") -> Path:
    """Check that file `output` may be written: not an input, not special, not a folder, and new
    unless `overwrite` names it for replacing."""
    output = Path(output)
    special = special_kind(output)
    if special:
        raise TokenFormerError(f"{what} {output} is {special}, not a regular file: give a file path")
    if output.is_dir():
        raise TokenFormerError(f"{what} {output} is a folder, not a file: give a file path")
    for given in inputs:
        source, target = _resolved(given), _resolved(output)
        # a new file inside an input folder changes nothing it reads; replacing one there might
        if source == target or source.is_dir() and source in target.parents and output.exists():
            raise TokenFormerError(f"{what} {output} is {'also' if source == target else 'inside'} an input of this "
                                   f"command ({given}): writing it could replace what it reads; choose another {what}")
    if output.exists() and not overwrite:
        raise TokenFormerError(f"{what} {output} already exists: pass --overwrite to replace it, or choose another "
                               f"{what}")
    return output
