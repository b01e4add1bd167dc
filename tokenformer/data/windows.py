"""Training windows: fixed-length token sequences cut from documents.

`WindowDataset` serves training (GPT-NeoX style, over indexed files, any sample by its index);
`token_windows` cuts documents already in memory (the loss reports of `grow` and `shrink`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from tokenformer.data.indexed import IndexedDataset
from tokenformer.errors import TokenFormerError
from tokenformer.inputs import require_memory


class WindowDataset:
    """Windows of `seq_length + 1` tokens over the concatenated documents of indexed datasets.

    GPT-NeoX style: documents are concatenated (end-of-text tokens already inside them) and cut
    into windows that overlap by one token (the last target of a window is the first input of the
    next). With `shuffle`, every epoch concatenates the documents in a fresh order and visits the
    windows in a fresh order, both drawn from `(seed, epoch)` alone: sample `i` of the global order
    is the same on every machine and after every resume. Reading is memory-mapped; the cost per
    epoch is two permutations over documents and windows.
    """

    def __init__(self, prefixes: Sequence[str], seq_length: int, seed: int = 0, shuffle: bool = True,
                 name: str = "training") -> None:
        self.datasets = [IndexedDataset(p) for p in prefixes]
        self.seq_length = seq_length
        self.seed = seed
        self.shuffle = shuffle
        # documents are numbered across datasets; dataset i holds numbers first[i] .. first[i+1]-1
        self._first_doc = np.cumsum([0] + [len(d) for d in self.datasets])
        # sizes stay int32 (memory-mapped when there is one dataset): the Pile has ~200M documents
        self._doc_size = self.datasets[0].sizes if len(self.datasets) == 1 else \
            np.concatenate([d.sizes for d in self.datasets]) if self.datasets else np.zeros(0, dtype=np.int32)
        self.num_tokens = int(self._doc_size.sum(dtype=np.int64))
        if self.num_tokens == 0:
            raise TokenFormerError(f"the {name} data {', '.join(prefixes)} hold no tokens: the corpus is empty")
        # overlapping by one token: n windows need n * seq_length + 1 tokens
        self.windows_per_epoch = (self.num_tokens - 1) // seq_length
        if self.windows_per_epoch == 0:
            raise TokenFormerError(
                f"the {name} data hold {self.num_tokens} tokens, fewer than one window of seq_length + 1 = "
                f"{seq_length + 1}: use more text or a shorter seq_length")
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Document order, cumulative token offsets in that order, and window order of `epoch`."""
        if epoch not in self._epoch_cache:
            num_docs = len(self._doc_size)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                doc_order = _compact(rng.permutation(num_docs))
                window_order = _compact(rng.permutation(self.windows_per_epoch))
            else:
                doc_order = np.arange(num_docs)
                window_order = np.arange(self.windows_per_epoch)
            offsets = np.zeros(num_docs + 1, dtype=np.int64)
            np.cumsum(self._doc_size[doc_order], out=offsets[1:], dtype=np.int64)
            self._epoch_cache = {epoch: (doc_order, offsets, window_order)}  # one epoch at a time
        return self._epoch_cache[epoch]

    def window(self, index: int) -> np.ndarray:
        """Sample `index` of the global order (it runs on through epochs): `seq_length + 1` ids."""
        epoch, within = divmod(index, self.windows_per_epoch)
        doc_order, offsets, window_order = self._epoch(epoch)
        start = int(window_order[within]) * self.seq_length
        end = start + self.seq_length + 1
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        filled = 0
        position = int(np.searchsorted(offsets, start, side="right")) - 1
        while filled < out.size:
            doc = int(doc_order[position])
            dataset = int(np.searchsorted(self._first_doc, doc, side="right")) - 1
            tokens = self.datasets[dataset][doc - int(self._first_doc[dataset])]
            lo = start + filled - int(offsets[position])
            piece = tokens[lo:lo + (end - start - filled)]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            position += 1
        return out

    def batch(self, first: int, size: int) -> torch.Tensor:
        """Samples `first .. first + size - 1` as a (size, seq_length + 1) int64 tensor."""
        require_memory(2 * 8 * size * (self.seq_length + 1), f"a batch of {size:,} windows of "
                                                             f"{self.seq_length + 1} tokens")
        return torch.from_numpy(np.stack([self.window(first + i) for i in range(size)]))


def _compact(indices: np.ndarray) -> np.ndarray:
    """int32 when the values fit: halves the per-epoch orders of a Pile-sized corpus."""
    return indices.astype(np.int32) if indices.size < 2**31 else indices


def token_windows(documents: Iterable[Sequence[int]], eos_id: int, length: int,
                  max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (N, length + 1) over the documents joined into one stream, each
    followed by an end-of-text token unless it already ends with one (indexed documents do).
    Reading stops once `max_windows` windows are full."""
    stream: list[int] = []
    for ids in documents:
        stream.extend(int(t) for t in ids)
        if not stream or stream[-1] != eos_id:
            stream.append(eos_id)
        if max_windows is not None and len(stream) >= max_windows * (length + 1):
            break
    n = len(stream) // (length + 1)
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(stream[:n * (length + 1)], dtype=torch.long).view(n, length + 1)  # (N, length+1)
