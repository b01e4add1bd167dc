"""Tokenizers: the GPT-NeoX-20B BPE (any `tokenizer.json`) through the `tokenizers` library, and a
byte-level tokenizer that needs no file.

Both are `tokenizers.Tokenizer` objects underneath, so a checkpoint directory always carries a
standard `tokenizer.json` that other tools can read. The byte-level one encodes with a direct
UTF-8 fast path that gives the same ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenformer.errors import TokenFormerError
from tokenformer.files import TOKENIZER_FILE
from tokenformer.inputs import require_file

END_OF_TEXT = "<|endoftext|>"
BYTE_VOCAB_SIZE = 257  # 256 bytes, then <|endoftext|>


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of byte-level BPE (GPT-2 convention)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    """A `tokenizers.Tokenizer` with the few things a language model needs from it."""

    def __init__(self, backend, name: str = "tokenizer") -> None:
        self.backend = backend
        self.name = name
        eos = backend.token_to_id(END_OF_TEXT)
        if eos is None:
            raise TokenFormerError(f"tokenizer {name} has no {END_OF_TEXT} token: it cannot mark document ends")
        self.eos_id: int = eos

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; `tokenizers` spreads the work over all cores."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """Byte-level tokenizer: id = UTF-8 byte value (0..255), `<|endoftext|>` = 256. Needs no file."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

        vocab = {char: b for b, char in bytes_to_unicode().items()}
        backend = Backend(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([END_OF_TEXT])
        super().__init__(backend, name="byte")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        out, chunk = [], bytearray()
        for i in ids:
            if i < 256:
                chunk.append(i)
                continue
            out.append(chunk.decode("utf-8", errors="replace"))
            chunk = bytearray()
            out.append(END_OF_TEXT if i == self.eos_id else "")
        out.append(chunk.decode("utf-8", errors="replace"))
        return "".join(out)


def _is_byte_tokenizer(backend) -> bool:
    if backend.get_vocab_size(with_added_tokens=True) != BYTE_VOCAB_SIZE:
        return False
    table = bytes_to_unicode()
    return all(backend.token_to_id(table[b]) == b for b in range(256)) \
        and backend.token_to_id(END_OF_TEXT) == 256


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """`"byte"`, a `tokenizer.json` path, a directory holding one, or a Hugging Face Hub name.

    A Hub name (e.g. `EleutherAI/gpt-neox-20b`) needs internet and the `hub` extra.
    """
    from tokenizers import Tokenizer as Backend

    spec = str(spec)
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():  # a checkpoint or prepared-data directory: its own tokenizer.json, never the Hub
        path = require_file(path / TOKENIZER_FILE, "tokenizer",
                            "give a directory holding one, or --tokenizer (a tokenizer.json or 'byte')")
    if path.is_file():
        require_file(path, "tokenizer", "give a tokenizer.json or 'byte'")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TokenFormerError(f"{path} is not a valid tokenizer.json ({reason}): give the tokenizer.json the "
                                   f"model was trained with, or 'byte'") from None
        if _is_byte_tokenizer(backend):
            return ByteTokenizer()
        return Tokenizer(backend, name=str(path))
    if spec.count("/") == 1 and not path.suffix and not spec.startswith((".", "/")):
        try:
            backend = Backend.from_pretrained(spec)
        except Exception as e:
            raise TokenFormerError(f"could not fetch tokenizer {spec!r} from the Hugging Face Hub ({e})") from None
        return Tokenizer(backend, name=spec)
    raise FileNotFoundError(f"tokenizer {spec} not found: give 'byte', a tokenizer.json path, or a Hub name")


def check_vocab_fits(vocab_size: int, padded_vocab_size: int, what: str = "the tokenizer",
                     fix: str = "use the tokenizer the model was trained with") -> None:
    """The one vocabulary check: token ids from `what` (a tokenizer, prepared data) must index the
    model's embedding of `padded_vocab_size` rows."""
    if vocab_size > padded_vocab_size:
        raise TokenFormerError(f"{what} has {vocab_size} tokens but the model's vocabulary holds "
                               f"{padded_vocab_size}: {fix}")
