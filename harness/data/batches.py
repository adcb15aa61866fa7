"""Batching: collate (padded or flat), the per-rank step sampler, and evaluation batches."""

from __future__ import annotations

import numpy as np
import torch

from harness.config import ConfigError
from harness.data.samples import concat_samples
from harness.numerics import IGNORE_INDEX


def collate(samples: list, pad_id: int, flatten: bool = False) -> dict:
    """A batch of samples (input_ids, targets) or packed rows (input_ids, targets, position_ids).

    Samples without position ids are right-padded to the longest, with attention_mask 0 and target -100
    on padding. With position ids (packed rows, or any samples with flatten=True, which lays the whole
    micro-batch end to end in one row) the batch has position_ids instead: they restart at 0 for every
    sample, so the model attends within samples only, and the padding at a row's tail is a segment of
    its own; "attention_mask" then only marks real tokens (for counting) and is not given to the model."""
    if flatten:
        samples = [concat_samples(samples)]
    max_len = max(len(s[0]) for s in samples)
    input_ids = torch.full((len(samples), max_len), pad_id, dtype=torch.int64)
    targets = torch.full((len(samples), max_len), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((len(samples), max_len), dtype=torch.int64)
    packed = len(samples[0]) == 3
    position_ids = torch.zeros((len(samples), max_len), dtype=torch.int64) if packed else None
    for i, s in enumerate(samples):
        n = len(s[0])
        input_ids[i, :n] = s[0]
        targets[i, :n] = s[1]
        attention_mask[i, :n] = 1
        if packed:
            position_ids[i, :n] = s[2]
            position_ids[i, n:] = torch.arange(max_len - n)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}
    if packed:
        batch["position_ids"] = position_ids
    return batch


def model_inputs(batch: dict) -> dict:
    """The model's keyword arguments for a batch. Packed / padding-free batches pass position_ids and no
    attention_mask: transformers then builds a block-diagonal causal mask (sdpa, eager) or runs
    flash-attn's varlen kernel; use_cache=False because a KV cache turns that detection off."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def without_targets(sample: tuple) -> tuple:
    """The same sample with no loss anywhere (eval repeats that only keep ranks in step)."""
    return (sample[0], torch.full_like(sample[1], IGNORE_INDEX), *sample[2:])


class StepSampler:
    """Which samples each rank sees at each optimizer step, as a pure function of the step.

    Epoch e is a permutation seeded by (seed, e); optimizer step k of that epoch takes the global batch
    perm[k*G:(k+1)*G] (the last incomplete batch is dropped); rank r takes the r-th contiguous slice
    and splits it into grad_accum micro-batches. The union over ranks is the same for any world size,
    which is what makes 1-rank and N-rank runs train on identical data; and resuming at step k needs
    nothing but k.

    With `lengths` (length-grouped batching) each run of 50 global batches of the permutation is sorted
    by length and cut into global batches again, taken in a seeded order; inside a global batch the
    micro-batches (similar lengths) are dealt to ranks in turn, so ranks get similar work. The set of
    samples of each global batch still does not depend on the world size.
    """

    GROUP = 50  # global batches per length-sorted group

    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, world_size: int, rank: int, seed: int,
                 lengths=None, unit: str = "samples"):
        if num_samples < global_batch:
            raise ConfigError(f"the training set has {num_samples} {unit}, fewer than train.global_batch_size={global_batch}; "
                              f"lower the global batch or add data")
        self.n, self.G, self.mb, self.world, self.rank, self.seed = num_samples, global_batch, micro_batch, world_size, rank, seed
        self.steps_per_epoch = num_samples // global_batch
        self.lengths = None if lengths is None else np.asarray(lengths)
        self._perm_epoch, self._perm = -1, None

    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None:
            return perm
        used = perm[: self.steps_per_epoch * self.G]
        out = []
        for a in range(0, len(used), self.GROUP * self.G):
            group = sorted(used[a : a + self.GROUP * self.G], key=lambda i: -int(self.lengths[i]))
            batches = [group[b : b + self.G] for b in range(0, len(group), self.G)]
            for j in torch.randperm(len(batches), generator=g).tolist():
                out += self._deal(batches[j])
        return out

    def _deal(self, batch: list[int]) -> list[int]:
        """Reorder a sorted global batch so that rank r's contiguous slice holds micro-batches r, r+W, ..."""
        micro = [batch[i : i + self.mb] for i in range(0, self.G, self.mb)]
        return [i for r in range(self.world) for m in micro[r :: self.world] for i in m]

    def window(self, step: int) -> list[list[int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = self._epoch_order(epoch), epoch
        per_rank = self.G // self.world
        mine = self._perm[k * self.G + self.rank * per_rank : k * self.G + (self.rank + 1) * per_rank]
        return [mine[i : i + self.mb] for i in range(0, per_rank, self.mb)]

    def longest_sample(self, lengths, steps: int, max_epochs: int = 64) -> int:
        """The longest sample (tokens) any rank's micro-batch holds in the first `steps` optimizer steps: a padded
        micro-batch is as long as its longest sample, so this is the longest padded row the run will train on.
        All ranks' global batches count (every rank must fit); the order is the pure function of the step
        above, so this reads indices only. A run over more than `max_epochs` epochs gets the data set's longest."""
        lengths = np.asarray(lengths)
        epochs = -(-steps // self.steps_per_epoch)
        if epochs > max_epochs:
            return int(lengths.max())
        longest, cap = 0, int(lengths.max())
        for e in range(epochs):
            order = self._epoch_order(e)
            last = min(self.steps_per_epoch, steps - e * self.steps_per_epoch)
            longest = max(longest, int(lengths[order[: last * self.G]].max()))
            if longest == cap:  # nothing longer to find
                break
        return longest


def eval_batches(num_samples: int, micro_batch: int, world_size: int, rank: int, max_samples: int = 0):
    """Validation micro-batches for this rank, plus a weight per sample (0 for padding repeats).

    Sample j goes to rank j % world_size, so the evaluated set is the same for any world size. Every
    rank must run the same number of forwards (ZeRO-3 gathers parameters collectively), so the
    shorter ranks repeat sample 0 with weight 0 to keep the count equal."""
    if max_samples:
        num_samples = min(num_samples, max_samples)
    per_rank = -(-num_samples // world_size)
    per_rank = -(-per_rank // micro_batch) * micro_batch
    idx = [rank + world_size * j for j in range(per_rank)]
    out = []
    for i in range(0, per_rank, micro_batch):
        chunk = idx[i : i + micro_batch]
        out.append(([c if c < num_samples else 0 for c in chunk], [1.0 if c < num_samples else 0.0 for c in chunk]))
    return out
