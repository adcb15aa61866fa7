"""Samples: list-like views over the flat token arrays (one sample, or one packed row of several)."""

from __future__ import annotations

import numpy as np
import torch

from harness.data.tokens import TokenPart


class TokenStore:
    """All tokenised samples, flat (int32): sample i is ids[offsets[i]:offsets[i+1]]."""

    def __init__(self, parts: list[TokenPart]):
        self.ids = torch.from_numpy(np.concatenate([p.ids for p in parts]))
        self.targets = torch.from_numpy(np.concatenate([p.targets for p in parts]))
        self.lengths = np.concatenate([p.lengths for p in parts])
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.part_first = np.concatenate([[0], np.cumsum([len(p.lengths) for p in parts])])  # first sample of each part
        self.part_of = np.repeat(np.arange(len(parts)), [len(p.lengths) for p in parts])

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b].long(), self.targets[a:b].long()


class Samples:
    """A list-like of (input_ids, targets) int64 tensors: store samples at `index` (repeats allowed)."""

    def __init__(self, store: TokenStore, index: np.ndarray):
        self.store, self.index = store, np.asarray(index, np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self.store.sample(int(i)) for i in self.index[k]]
        return self.store.sample(int(self.index[k]))

    def lengths(self) -> np.ndarray:
        return self.store.lengths[self.index]

    def sources(self) -> np.ndarray:
        return self.store.part_of[self.index]


class PackedRows:
    """A list-like of packed rows (input_ids, targets, position_ids): the samples of a row laid end to end,
    position ids restarting at 0 for each; unpadded (collate pads)."""

    def __init__(self, store: TokenStore, samples: np.ndarray, row_offsets: np.ndarray):
        self.store, self.samples, self.row_offsets = store, samples, row_offsets

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def row_samples(self, r: int) -> np.ndarray:
        return self.samples[self.row_offsets[r] : self.row_offsets[r + 1]]

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(len(self)))]
        return concat_samples([self.store.sample(int(i)) for i in self.row_samples(r)])

    def lengths(self) -> np.ndarray:
        return np.add.reduceat(self.store.lengths[self.samples], self.row_offsets[:-1])


def concat_samples(samples: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples end to end as one row, with position ids restarting at 0 for each sample."""
    ids = torch.cat([s[0] for s in samples])
    targets = torch.cat([s[1] for s in samples])
    pos = torch.cat([s[2] if len(s) == 3 else torch.arange(len(s[0])) for s in samples])
    return ids, targets, pos


def sample_lengths(dataset) -> np.ndarray:
    return dataset.lengths() if hasattr(dataset, "lengths") else np.array([len(s[0]) for s in dataset])
