"""Split, mix and pack (pure functions of the tokenised data and the seed, so every rank computes the
same lists and a resumed run needs only the step), and build_datasets, which runs the whole pipeline."""

from __future__ import annotations

import itertools

import numpy as np

from harness.config import ConfigError, DataConfig
from harness.data.cache import source_plan, tokenize_once
from harness.data.samples import PackedRows, Samples, TokenStore
from harness.data.stats import DataStats
from harness.data.tokens import TokenPart


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def mix_counts(sizes: list[int], cfg: DataConfig) -> list[int]:
    """Samples each source puts in one epoch of the mix.

    weight: N x w_i / sum(w), or by size when no source has a weight (each sample once when N is the
    total); temperature: N x p_i with p_i ~ w_i (1 if unset) x size_i^(1/T); epochs: size_i x epochs_i.
    N is data.num_samples, or all sources' samples together. Shares are exact (largest remainder)."""
    if cfg.mixing == "epochs":
        return [max(1, round(n * s.epochs)) for n, s in zip(sizes, cfg.sources)]
    w = np.array([s.weight for s in cfg.sources], np.float64)
    if cfg.mixing == "temperature":
        w = np.where(w > 0, w, 1.0) * np.power(np.array(sizes, np.float64), 1.0 / cfg.temperature)
    elif not (w > 0).any():
        w = np.array(sizes, np.float64)
    p = w / w.sum()
    total = cfg.num_samples or int(sum(sizes))
    raw = p * total
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts.tolist()


def mix(train_parts: list[np.ndarray], counts: list[int], seed: int) -> np.ndarray:
    """Store indices of one epoch of the mix, shuffled: source i contributes counts[i] samples, whole
    passes over its samples first, then a seeded subset for the remainder."""
    chosen = []
    for i, (ids, q) in enumerate(zip(train_parts, counts)):
        reps, rest = divmod(q, len(ids))
        chosen.append(np.tile(ids, reps))
        chosen.append(ids[np.sort(_rng(seed, 1, i).permutation(len(ids))[:rest])])
    out = np.concatenate(chosen)
    return out[_rng(seed, 2).permutation(len(out))]


def pack(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: positions into `lengths`, grouped in rows of <= capacity tokens.
    Longest first, each into the open row it fills best (or a new one). Deterministic."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    has_room = np.zeros(capacity + 1, bool)  # has_room[c]: some open row has exactly c tokens free
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]
    rows: list[list[int]] = []
    for i in order.tolist():
        n = int(lengths[i])
        c = n + int(np.argmax(has_room[n:]))
        if has_room[c]:
            r = by_room[c].pop()
            has_room[c] = bool(by_room[c])
            rows[r].append(i)
        else:
            r, c = len(rows), capacity
            rows.append([i])
        if c - n > 0:
            by_room[c - n].append(r)
            has_room[c - n] = True
    return rows


def split_and_mix(parts: list[TokenPart], cfg: DataConfig, seed: int, stats: DataStats):
    """(train, val) views over the store of all parts."""
    specs = source_plan(cfg)
    store = TokenStore(parts)
    ranges = [np.arange(store.part_first[k], store.part_first[k + 1]) for k in range(len(parts))]
    train_parts, val_parts = [], []
    for k, spec in enumerate(specs):
        if spec.split == "val":
            val_parts.append(ranges[k])
            continue
        ids = ranges[k]
        has_own_val = bool(cfg.sources[spec.source].val_path)
        if cfg.val_fraction > 0 and not has_own_val:
            n = len(ids)
            n_val = max(1, int(n * cfg.val_fraction)) if n >= 2 else 0
            perm = _rng(seed, 0, spec.source).permutation(n)
            val_parts.append(ids[np.sort(perm[:n_val])])
            ids = ids[np.sort(perm[n_val:])]
        if not len(ids):
            raise ConfigError(f"{spec.path}: no training samples left after holding out data.val_fraction={cfg.val_fraction}")
        train_parts.append(ids)
    val_index = np.concatenate(val_parts) if val_parts else np.zeros(0, np.int64)
    if len(val_parts) > 1:  # several files: interleave so eval.max_samples takes from each
        val_index = val_index[_rng(seed, 3).permutation(len(val_index))]
    counts = mix_counts([len(t) for t in train_parts], cfg)
    mixed = mix(train_parts, counts, seed)
    total = sum(counts)
    stats.mixing = cfg.mixing
    stats.mix = [{"name": s.path, "rows": len(t), "samples": q, "share": q / total, "epochs": q / len(t)}
                 for s, t, q in zip(cfg.sources, train_parts, counts)]
    stats.train_samples, stats.val_samples = len(mixed), len(val_index)
    if cfg.packing:
        rows = pack(store.lengths[mixed], cfg.seq_len)
        flat = np.fromiter(itertools.chain.from_iterable(rows), np.int64, len(mixed))
        row_offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
        train = PackedRows(store, mixed[flat], row_offsets)
        stats.train_rows = len(train)
        stats.packing_efficiency = float(store.lengths[mixed].sum()) / (len(train) * cfg.seq_len)
    else:
        train = Samples(store, mixed)
        stats.train_rows = len(train)
    return train, Samples(store, val_index)


def build_datasets(cfg: DataConfig, tokenizer, seed: int, *, cache_dir: str | None = None, rank: int = 0, world_size: int = 1, say=None):
    """Tokenised train and validation sets plus statistics.

    train is a list-like of (input_ids, targets) samples, or of packed rows (input_ids, targets,
    position_ids) with data.packing; val a list-like of samples. With a cache_dir, rank 0 tokenises and
    the other ranks load its cache (torch.distributed must be initialised when world_size > 1)."""
    say = say or (lambda _msg: None)
    parts, errors, status, tok_s = tokenize_once(cfg, tokenizer, cache_dir=cache_dir, rank=rank, world_size=world_size, say=say)
    stats = DataStats(cache=status, tokenize_s=tok_s)
    for p in parts:
        stats.absorb(p.stats)
    stats.errors = errors
    train, val = split_and_mix(parts, cfg, seed, stats)
    if not len(train):
        raise ConfigError("the training set is empty after loading; check data.sources and data.on_error")
    return train, val, stats
