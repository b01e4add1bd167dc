"""The door every file a user hands the package comes through: opened, checked, and read without
running code.

A reader here never lets a library's own error escape: a missing, empty, unreadable, damaged or
mistaken file (a directory where a file belongs, a tokenizer.json where config.json belongs) ends
in one `TokenFormerError` sentence that names the path, what is wrong with it and what to do.
Missing paths raise `MissingFileError`, which is also a `FileNotFoundError` for callers that catch
that. Formats with a binary header (safetensors) are checked against the file's length before a
library reads them, so a truncated file is a sentence and not a crash or a huge allocation.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from tokenformer.errors import TokenFormerError


class MissingFileError(TokenFormerError, FileNotFoundError):
    """A path the user named does not exist (a `TokenFormerError` and a `FileNotFoundError`)."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def special_kind(path: str | Path) -> str | None:
    """What `path` is when it exists but is neither a regular file nor a folder (a FIFO, a device ...)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None


def require_file(path: str | Path, what: str, fix: str = "check the path", empty_ok: bool = False) -> Path:
    """`path` as a readable regular file (non-empty unless `empty_ok`); else one sentence naming
    `what` it should be."""
    path = Path(path)
    if path.is_dir():
        raise TokenFormerError(f"{what} {path} is a directory, not a file: {fix}")
    if not path.exists():
        raise MissingFileError(f"{what} {path} does not exist: {fix}")
    if not path.is_file():
        raise TokenFormerError(f"{what} {path} is {special_kind(path) or 'not a regular file'}, not a file to read: "
                               f"{fix}")
    if not os.access(path, os.R_OK):
        raise TokenFormerError(f"{what} {path} is not readable (permission denied): fix its permissions "
                               f"(chmod u+r) or copy it somewhere readable")
    if not empty_ok and path.stat().st_size == 0:
        raise TokenFormerError(f"{what} {path} is empty: {fix}")
    return path


def require_dir(path: str | Path, what: str, fix: str = "check the path") -> Path:
    """`path` as a readable directory; else one sentence naming `what` it should be."""
    path = Path(path)
    if path.is_file():
        raise TokenFormerError(f"{what} {path} is a file, not a directory: {fix}")
    if not path.exists():
        raise MissingFileError(f"{what} {path} does not exist: {fix}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise TokenFormerError(f"{what} {path} is not readable (permission denied): fix its permissions "
                               f"(chmod u+rx)")
    return path


def read_bytes(path: str | Path, what: str, fix: str = "check the path") -> bytes:
    path = require_file(path, what, fix)
    try:
        return path.read_bytes()
    except OSError as e:
        raise TokenFormerError(f"{what} {path} cannot be read ({_first_line(e)}): {fix}") from None


def read_text(path: str | Path, what: str, fix: str = "check the path") -> str:
    """The UTF-8 text of a file (a leading byte-order mark dropped); binary content is an error."""
    data = read_bytes(path, what, fix)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TokenFormerError(f"{what} {path} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x}): "
                               f"{fix}") from None


def read_json(path: str | Path, what: str, fix: str = "check the path", mapping: bool = True) -> Any:
    """The JSON value of a file (a mapping unless `mapping=False`)."""
    require_file(path, what, fix)
    if Path(path).stat().st_size > MAX_CONFIG_BYTES:
        raise TokenFormerError(f"{what} {path} is {format_bytes(Path(path).stat().st_size)}, more than a config "
                               f"file's {format_bytes(MAX_CONFIG_BYTES)}: {fix}")
    text = read_text(path, what, fix)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenFormerError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                               f"{fix}") from None
    except RecursionError:  # `[[[[...` nested deeper than Python's stack
        raise TokenFormerError(f"{what} {path} nests too deeply to be a JSON config: {fix}") from None
    if mapping and not isinstance(value, dict):
        raise TokenFormerError(f"{what} {path} holds a JSON {type(value).__name__}, not a mapping of fields: {fix}")
    return value


MAX_CONFIG_BYTES = 16 << 20  # a JSON or YAML config; the largest real one is a few kB
MAX_YAML_NODES = 100_000  # values of a YAML config once its aliases are expanded


def _yaml_size(node: Any, sizes: dict[int, int]) -> int:
    """How many values `node` stands for with every alias expanded (computed once per node, so a
    "billion laughs" is counted, not built)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = MAX_YAML_NODES + 1  # a node inside itself (a recursive alias) counts as too many
    children = node.value if isinstance(node.value, list) else []
    total = 1
    for child in children:
        for part in (child if isinstance(child, tuple) else (child,)):  # a mapping's (key, value) pairs
            total += _yaml_size(part, sizes)
    sizes[id(node)] = total
    return total


def read_yaml(path: str | Path, what: str, fix: str = "check the path") -> dict[str, Any]:
    """The mapping of a YAML file (an empty file is an empty mapping)."""
    import yaml  # a core dependency, imported here because only config readers need it

    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        return {}
    if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
        raise TokenFormerError(f"{what} {path} is {format_bytes(path.stat().st_size)}, more than a config file's "
                               f"{format_bytes(MAX_CONFIG_BYTES)}: {fix}")
    text = read_text(path, what, fix)
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None and _yaml_size(node, {}) > MAX_YAML_NODES:
                raise TokenFormerError(f"{what} {path} expands to more than {MAX_YAML_NODES:,} values (through its "
                                       f"aliases): a config is far smaller; {fix}")
            value = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise TokenFormerError(f"{what} {path} is not valid YAML ({_first_line(e)}): {fix}") from None
    except RecursionError:
        raise TokenFormerError(f"{what} {path} nests too deeply to be a YAML config: {fix}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TokenFormerError(f"{what} {path} holds a YAML {type(value).__name__}, not a mapping of fields: {fix}")
    return value


# ---- sizes ---------------------------------------------------------------------------------------

def machine_memory() -> int | None:
    """Bytes of memory this process may have: the machine's physical memory, or less where an
    address-space limit (`ulimit -v`) says so (None where the platform says neither)."""
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    try:
        import resource  # POSIX only
    except ImportError:
        resource = None
    if resource is not None:
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit not in (resource.RLIM_INFINITY, -1):
            sizes.append(limit)
    return min(sizes) if sizes else None


def format_bytes(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} PiB"


def require_memory(size: int, what: str) -> None:
    """One sentence, before anything is allocated, when `what` would need more than this machine's memory."""
    total = machine_memory()
    if total is not None and size > total:
        raise TokenFormerError(f"{what} would need {format_bytes(size)}, more than this machine's "
                               f"{format_bytes(total)} of memory: choose smaller sizes")


# ---- safetensors ---------------------------------------------------------------------------------

# bytes per element of each safetensors dtype name
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                        "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def safetensors_header(path: str | Path, what: str = "weights file") -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file: its length fits, it is a
    mapping of tensors with known dtypes, and every tensor's bytes lie inside the file."""
    path = require_file(path, what, "write it again (save_pretrained, or `tokenformer convert`)")
    size = path.stat().st_size
    damaged = f"{what} {path} is not a complete safetensors file"
    fix = "it is damaged or truncated: write it again, or restore it from a copy"
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise TokenFormerError(f"{damaged} ({size} bytes, shorter than its 8-byte header length): {fix}")
        length, = struct.unpack("<Q", prefix)
        if length > min(size - 8, SAFETENSORS_MAX_HEADER):
            raise TokenFormerError(f"{damaged} (its header claims {length} bytes of {size}): {fix}")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise TokenFormerError(f"{damaged} (its header is not JSON): {fix}") from None
    if not isinstance(header, dict):
        raise TokenFormerError(f"{damaged} (its header is not a mapping of tensors): {fix}")
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        _check_tensor_entry(name, entry, data_bytes, f"{damaged} (tensor {name!r}", fix)
    return header


def _check_tensor_entry(name: str, entry: Any, data_bytes: int, damaged: str, fix: str) -> None:
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_ITEMSIZE:
        raise TokenFormerError(f"{damaged} has no known dtype): {fix}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise TokenFormerError(f"{damaged} has shape {shape!r}): {fix}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise TokenFormerError(f"{damaged} lies outside the file's {data_bytes} data bytes): {fix}")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * SAFETENSORS_ITEMSIZE[entry["dtype"]]:
        raise TokenFormerError(f"{damaged} of shape {shape} does not match its {offsets[1] - offsets[0]} bytes): "
                               f"{fix}")


def read_safetensors(path: str | Path, device: str | torch.device = "cpu",
                     what: str = "weights file") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (no code runs), its header checked first."""
    from safetensors.torch import load_file

    safetensors_header(path, what)
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # SafetensorError, or an OSError of the disk under it
        raise TokenFormerError(f"{what} {path} cannot be read as safetensors ({_first_line(e)}): it is damaged; "
                               f"write it again, or restore it from a copy") from None


# ---- torch.load ------------------------------------------------------------------------------

def torch_load_safe(path: str | Path, map_location: str | torch.device = "cpu", what: str = "checkpoint file"):
    """`torch.load` that never executes pickled code (tensors and plain containers only); a damaged
    archive or pickle is one sentence."""
    path = require_file(path, what, "give the file the checkpoint was saved as")
    try:
        zipped = zipfile.is_zipfile(path)
        # the zip-based format can be memory-mapped, the legacy one cannot
        return torch.load(path, map_location=map_location, weights_only=True, mmap=zipped)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError ... depending on the damage
        raise TokenFormerError(
            f"{path} cannot be loaded safely as tensors ({type(e).__name__}: {_first_line(e)}); "
            f"it may be damaged or hold pickled code: restore it from a copy or write it again") from None
