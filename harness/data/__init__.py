"""Data: load local files through `datasets`, render rows (alpaca / completion / text / chat), tokenise
them once with loss masks, split train/validation, mix several sources, optionally pack, and cut a
deterministic, resumable stream of micro-batches per rank.

Every sample becomes (input_ids, targets) where targets[t] is the token to predict at position t
(already shifted by one) or -100 where no loss is taken: prompt tokens (unless train_on_inputs),
padding, and the last position of every sample (so a packed sample never predicts the next sample's
first token). Counting `targets != -100` therefore counts exactly the tokens the loss is normalised by.

    build_datasets: load (datasets) -> render each row to text + the character spans that carry loss ->
    tokenise (fast tokenizer, offsets) -> [cache: rank 0 tokenises, the other ranks load] -> split ->
    mix sources -> pack -> StepSampler indexes the result (a packed row counts as one sample).

Split, mix and pack are pure functions of the tokenised data and the seed, so every rank computes the
same lists and a resumed run needs only the step.

Modules, in pipeline order: stats (counts), sources (file loading), render (templates), tokens
(tokenising, loss masks), cache (tokenise once), samples (views), mixing (split, mix, pack,
build_datasets), batches (collate, StepSampler). Everything public is re-exported here: callers use
`from harness import data` and `data.build_datasets(...)`.
"""

from __future__ import annotations

from harness.config import ConfigError
from harness.data.batches import StepSampler, collate, eval_batches, model_inputs, without_targets
from harness.data.cache import cache_key, tokenize_once
from harness.data.mixing import build_datasets, mix, mix_counts, pack, split_and_mix
from harness.data.render import (ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, BUILTIN_CHAT_TEMPLATE, TemplateError, chat_template_for,
                                 render_chat, render_row)
from harness.data.samples import PackedRows, Samples, TokenStore, concat_samples, sample_lengths
from harness.data.sources import load_rows, load_source
from harness.data.stats import DataStats, SourceStats
from harness.data.tokens import (IGNORE_INDEX, TokenPart, label_index, pad_token_id, tokenize_columns, tokenize_labelled, tokenize_rows,
                                 tokenize_texts)

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_WITH_INPUT", "BUILTIN_CHAT_TEMPLATE", "IGNORE_INDEX", "ConfigError", "DataStats",
    "PackedRows", "Samples", "SourceStats", "StepSampler", "TemplateError", "TokenPart", "TokenStore", "build_datasets",
    "cache_key", "chat_template_for", "collate", "concat_samples", "eval_batches", "load_rows", "load_source",
    "label_index", "mix", "mix_counts", "model_inputs", "pack", "pad_token_id", "render_chat", "render_row", "sample_lengths",
    "split_and_mix", "tokenize_columns", "tokenize_labelled", "tokenize_once", "tokenize_rows", "tokenize_texts", "without_targets",
]
