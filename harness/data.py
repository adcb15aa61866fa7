"""Data: load local files, render them with a prompt template, tokenise with loss masks, and cut a
deterministic, resumable stream of micro-batches per rank.

Every sample becomes (input_ids, targets) where targets[t] is the token to predict at position t
(already shifted by one) or -100 where no loss is taken: prompt tokens (unless train_on_inputs),
padding, and the last position. Counting `targets != -100` therefore counts exactly the tokens the
loss is normalised by.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.config import ConfigError, DataConfig, SourceConfig

IGNORE_INDEX = -100

# Built-in prompt templates (documented in the README). The response follows the prompt directly.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
REQUIRED = {"alpaca": ("instruction", "output"), "completion": ("prompt", "completion"), "text": ("text",), "chat": ("messages",)}


@dataclass
class DataStats:
    rows: int = 0
    skipped_rows: int = 0
    truncated: int = 0
    target_tokens: int = 0
    errors: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _read_jsonl(path: Path, on_error: str, stats: DataStats) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as e:
                msg = f"{path}:{line_no}: malformed JSON line ({e})"
                if on_error == "raise":
                    raise ConfigError(msg + "; fix the line or set data.on_error=skip") from None
                stats.skipped_rows += 1
                stats.errors.append(msg)
                continue
            rows.append(row)
    return rows


def load_rows(src: SourceConfig, on_error: str, stats: DataStats) -> list[dict]:
    """Rows of one source as dicts, with the column mapping applied."""
    path = Path(src.path)
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path, on_error, stats)
    else:
        import datasets

        try:
            if path.is_dir():
                ds = datasets.load_from_disk(str(path))
            else:
                kind = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
                if kind is None:
                    raise ConfigError(f"{path}: unknown file type '{path.suffix}'; use .jsonl, .json, .parquet, .csv or a saved dataset directory")
                ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        except ConfigError:
            raise
        except Exception as e:  # datasets' own message, with the file named
            raise ConfigError(f"{path}: cannot be read as a dataset ({type(e).__name__}: {e})") from e
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
        rows = ds.to_list()
    if src.columns:
        rows = [{**r, **{want: r.get(have) for want, have in src.columns.items()}} for r in rows]
    if not rows:
        raise ConfigError(f"{path}: no rows; the source is empty")
    return rows


# ----------------------------------------------------------------------------------------------
# Rendering: each row -> text plus the character spans that carry loss
# ----------------------------------------------------------------------------------------------


def render(row: dict, fmt: str, tokenizer, eos: str) -> tuple[str, list[tuple[int, int]]]:
    """Return (text, loss_spans) where loss_spans are [start, end) character ranges of the response."""
    if fmt == "text":
        text = str(row["text"]) + eos
        return text, [(0, len(text))]
    if fmt == "alpaca":
        tmpl = ALPACA_PROMPT_WITH_INPUT if row.get("input") else ALPACA_PROMPT
        prompt = tmpl.format(instruction=row["instruction"], input=row.get("input", ""))
        answer = str(row["output"]) + eos
        return prompt + answer, [(len(prompt), len(prompt) + len(answer))]
    if fmt == "completion":
        prompt, answer = str(row["prompt"]), str(row["completion"]) + eos
        return prompt + answer, [(len(prompt), len(prompt) + len(answer))]
    if fmt == "chat":
        return _render_chat(row["messages"], tokenizer)
    raise ConfigError(f"unknown data format '{fmt}'")


def _render_chat(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render with the tokenizer's chat template; every assistant turn carries loss.
    The template is applied to growing prefixes so each turn's characters are known exactly."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("format 'chat' needs a tokenizer with a chat_template")
    spans, prev = [], ""
    for i, msg in enumerate(messages):
        if msg.get("role") == "assistant":
            prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            spans.append((len(prefix), len(full)))
            prev = full
        else:
            prev = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
    return prev, spans


def tokenize_rows(rows: list[dict], fmt: str, tokenizer, seq_len: int, train_on_inputs: bool, on_error: str, stats: DataStats, origin: str):
    """Tokenise rendered rows; returns a list of (input_ids, targets) int32 tensors."""
    eos = tokenizer.eos_token or ""
    texts, spans = [], []
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED[fmt] if row.get(k) is None]
        if missing:
            msg = f"{origin}: row {i + 1} has no field {', '.join(repr(m) for m in missing)} needed by format '{fmt}'"
            if on_error == "raise":
                raise ConfigError(msg + "; fix the row, map a column with data.sources.N.columns, or set data.on_error=skip")
            stats.skipped_rows += 1
            stats.errors.append(msg)
            continue
        text, sp = render(row, fmt, tokenizer, eos)
        texts.append(text)
        spans.append(sp)
    enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True)
    samples = []
    for ids, offsets, sp in zip(enc["input_ids"], enc["offset_mapping"], spans):
        in_loss = [train_on_inputs or any(a <= start < b for a, b in sp) for (start, _end) in offsets]
        if len(ids) > seq_len:
            stats.truncated += 1
            ids, in_loss = ids[:seq_len], in_loss[:seq_len]
        ids_t = torch.tensor(ids, dtype=torch.int64)
        # Shift: the target at position t is token t+1 when token t+1 carries loss.
        targets = torch.full_like(ids_t, IGNORE_INDEX)
        mask = torch.tensor(in_loss[1:], dtype=torch.bool)
        targets[:-1] = torch.where(mask, ids_t[1:], torch.full_like(ids_t[1:], IGNORE_INDEX))
        stats.target_tokens += int(mask.sum())
        samples.append((ids_t, targets))
    stats.rows += len(samples)
    return samples


def build_datasets(cfg: DataConfig, tokenizer, seed: int):
    """Tokenised train and validation samples plus load statistics."""
    stats = DataStats()
    train: list = []
    for src in cfg.sources:
        rows = load_rows(src, cfg.on_error, stats)
        train += tokenize_rows(rows, src.format, tokenizer, cfg.seq_len, cfg.train_on_inputs, cfg.on_error, stats, src.path)
    val: list = []
    if cfg.val_path:
        src = SourceConfig(path=cfg.val_path, format=cfg.sources[0].format, columns=cfg.sources[0].columns)
        val = tokenize_rows(load_rows(src, cfg.on_error, stats), src.format, tokenizer, cfg.seq_len, cfg.train_on_inputs, cfg.on_error, DataStats(), src.path)
    elif cfg.val_fraction > 0:
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(train), generator=g).tolist()
        n_val = max(1, int(len(train) * cfg.val_fraction))
        val = [train[i] for i in perm[:n_val]]
        train = [train[i] for i in sorted(perm[n_val:])]
    if not train:
        raise ConfigError("the training set is empty after loading; check data.sources and data.on_error")
    return train, val, stats


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------


def collate(samples: list, pad_id: int) -> dict:
    """Right-pad to the longest sample. Padding has attention_mask 0 and target -100."""
    max_len = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), max_len), pad_id, dtype=torch.int64)
    targets = torch.full((len(samples), max_len), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((len(samples), max_len), dtype=torch.int64)
    for i, (ids, tgt) in enumerate(samples):
        input_ids[i, : len(ids)] = ids
        targets[i, : len(ids)] = tgt
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}


class StepSampler:
    """Which samples each rank sees at each optimizer step, as a pure function of the step.

    Epoch e is a permutation seeded by (seed, e); optimizer step k of that epoch takes the global batch
    perm[k*G:(k+1)*G] (the last incomplete batch is dropped); rank r takes the r-th contiguous slice
    and splits it into grad_accum micro-batches. The union over ranks is the same for any world size,
    which is what makes 1-rank and N-rank runs train on identical data; and resuming at step k needs
    nothing but k.
    """

    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, world_size: int, rank: int, seed: int):
        if num_samples < global_batch:
            raise ConfigError(f"the training set has {num_samples} samples, fewer than train.global_batch_size={global_batch}")
        self.n, self.G, self.mb, self.world, self.rank, self.seed = num_samples, global_batch, micro_batch, world_size, rank, seed
        self.grad_accum = global_batch // (micro_batch * world_size)
        self.steps_per_epoch = num_samples // global_batch
        self._perm_epoch, self._perm = -1, None

    def window(self, step: int) -> list[list[int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        per_rank = self.G // self.world
        mine = self._perm[k * self.G + self.rank * per_rank : k * self.G + (self.rank + 1) * per_rank]
        return [mine[i : i + self.mb] for i in range(0, per_rank, self.mb)]


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
