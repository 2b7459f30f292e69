"""Packing, the held-out split, a deterministic order, and the summary a run prints at start."""
from dataclasses import dataclass

import numpy as np
import torch

from .corpus import Corpus
from .errors import DataError

EPOCH_WARNING = 10
TINY_CORPUS_TOKENS = 100_000


@dataclass
class TokenDataset:
    """Fixed-length windows of seq_len+1 tokens over a token array, with a held-out split.

    Windows are non-overlapping; a seeded permutation picks which are validation and the order of
    training windows in each epoch. `batch(position)` is a pure function of the position, so a
    resume only needs the integer position."""
    tokens: np.ndarray
    seq_len: int
    seed: int = 0
    val_fraction: float = 0.02

    def __post_init__(self):
        n_windows = (len(self.tokens) - 1) // self.seq_len
        if n_windows < 2:
            raise DataError(f"corpus has {len(self.tokens)} tokens, too few for two sequences of "
                            f"length {self.seq_len}; lower --seq-len or add data")
        order = np.random.default_rng(self.seed).permutation(n_windows)
        n_val = max(1, int(n_windows * self.val_fraction))
        self.val_windows, self.train_windows = order[:n_val], order[n_val:]

    def _window(self, index: int) -> np.ndarray:
        start = int(index) * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def _stack(self, windows) -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.from_numpy(np.stack([self._window(w) for w in windows]))
        return data[:, :-1], data[:, 1:]

    def train_batch(self, position: int, batch_size: int, rank: int = 0, world_size: int = 1):
        """The `position`-th training batch (0-based); epochs reshuffle with seed + epoch. With
        `world_size` ranks, rank r gets rows [r B, (r+1) B) of the global batch of world_size * B
        windows, so N ranks with batch B see exactly what one process sees with batch N B."""
        n = len(self.train_windows)
        first = (position * world_size + rank) * batch_size
        windows = []
        for i in range(first, first + batch_size):
            epoch, offset = divmod(i, n)
            windows.append(self.train_windows[self._epoch_order(epoch)[offset]])
        return self._stack(windows)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached_order = (np.arange(len(self.train_windows)) if epoch == 0 else
                                  np.random.default_rng(self.seed + 1 + epoch).permutation(len(self.train_windows)))
            self._cached_epoch = epoch
        return self._cached_order

    def val_batches(self, batch_size: int, max_batches: int | None = None):
        windows = self.val_windows
        count = 0
        for start in range(0, len(windows), batch_size):
            if max_batches is not None and count >= max_batches:
                return
            yield self._stack(windows[start:start + batch_size])
            count += 1


def data_summary(corpus: Corpus, dataset: TokenDataset, steps: int, batch_size: int, accumulate: int = 1) -> list[str]:
    """A few lines for the start of a run: what was read, the windows, and how many epochs the run
    makes; lines that start with 'warning:' when it repeats the data over 10 times or the corpus
    is tiny."""
    n_tokens, n_train = len(corpus.tokens), len(dataset.train_windows)
    if corpus.kind == "bin":
        what = f"{corpus.tokens.dtype.name} token file"
    else:
        separator = "no separator" if corpus.eos_id is None else f"separated by token {corpus.eos_id}"
        what = f"{corpus.files:,} files, {corpus.documents:,} documents {separator}"
    windows = steps * batch_size * accumulate
    epochs = windows / n_train
    lines = [f"data: {corpus.source} ({what}): {n_tokens:,} tokens",
             f"data: {n_train:,} train + {len(dataset.val_windows):,} validation windows of {dataset.seq_len} "
             f"tokens; {steps} steps x {batch_size} batch x {accumulate} accumulate = {epochs:.2f} epochs"]
    if corpus.skipped:
        more = f", +{len(corpus.skipped) - 3} more" if len(corpus.skipped) > 3 else ""
        lines.append(f"data: skipped {len(corpus.skipped)} files: {', '.join(corpus.skipped[:3])}{more}")
    if epochs > EPOCH_WARNING:
        lines.append(f"warning: the run repeats the training data {epochs:.0f} times (over {EPOCH_WARNING} "
                     "epochs): expect memorisation; add data or lower --steps")
    if n_tokens < TINY_CORPUS_TOKENS:
        lines.append(f"warning: the corpus is tiny ({n_tokens:,} tokens, under {TINY_CORPUS_TOKENS:,}): "
                     "the validation loss says little; add data")
    return lines
