"""Tokenising: text + loss spans -> flat token arrays with targets shifted by one (-100 = no loss)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from harness.data.render import OPTIONAL, REQUIRED, chat_template_for, render_row
from harness.data.sources import RowOrigin, row_problem
from harness.data.stats import DataStats, SourceStats
from harness.numerics import IGNORE_INDEX

TOKENIZE_CHUNK = 2048  # rows per tokenizer call


@dataclass
class TokenPart:
    """The tokenised samples of one file, flat: sample k is ids[starts[k]:starts[k]+lengths[k]]."""

    stats: SourceStats
    ids: np.ndarray  # int32
    targets: np.ndarray  # int32, -100 where no loss
    lengths: np.ndarray  # int64


def _loss_mask(starts: np.ndarray, lens: np.ndarray, spans: list) -> np.ndarray:
    """True for tokens whose first character lies in one of their sample's loss spans."""
    k = max(len(s) for s in spans)
    a = np.zeros((len(spans), k), np.int64)
    b = np.zeros((len(spans), k), np.int64)
    for i, sp in enumerate(spans):
        for j, (x, y) in enumerate(sp):
            a[i, j], b[i, j] = x, y
    mask = np.zeros(len(starts), bool)
    for j in range(k):
        mask |= (starts >= np.repeat(a[:, j], lens)) & (starts < np.repeat(b[:, j], lens))
    return mask


def _plain_backend(tokenizer):
    """The `tokenizers` object behind a fast tokenizer when calling it directly encodes exactly as the
    transformers wrapper would (no truncation, padding or special-token splitting configured)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    if bool(backend.encode_special_tokens) != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return backend


def _first_token_at(enc, c: int, n_chars: int) -> int:
    """Index of the first token whose first character is at or after character c."""
    n = len(enc.ids)
    while c < n_chars:
        t = enc.char_to_token(c)
        if t is not None:
            return t if enc.token_to_chars(t)[0] >= c else t + 1
        c += 1  # a character no token covers (dropped by the normaliser)
    return n


def _encode(tokenizer, texts: list[str], spans: list, add_special: bool, train_on_inputs: bool):
    """(ids int64, lengths, loss mask) of a batch of texts, flat. The loss mask is True on tokens whose
    first character lies in a loss span. Calls the `tokenizers` backend directly when that is exact
    (it skips the wrapper's per-token Python conversions, about 2x faster), else the wrapper."""
    backend = _plain_backend(tokenizer)
    if backend is not None:
        encs = backend.encode_batch(texts, add_special_tokens=add_special)
        id_lists = [e.ids for e in encs]
    else:
        enc = tokenizer(texts, add_special_tokens=add_special, return_offsets_mapping=not train_on_inputs,
                        return_attention_mask=False, return_token_type_ids=False, verbose=False)
        id_lists = enc["input_ids"]
    lens = np.fromiter(map(len, id_lists), np.int64, len(texts))
    total = int(lens.sum())
    ids = np.fromiter(itertools.chain.from_iterable(id_lists), np.int64, total)
    if train_on_inputs:
        return ids, lens, np.ones(total, bool)
    if backend is None:
        starts = np.fromiter((s for offs in enc["offset_mapping"] for s, _ in offs), np.int64, total)
        return ids, lens, _loss_mask(starts, lens, spans)
    edges = np.zeros(total + 1, np.int64)  # +1 where a loss run starts, -1 where it ends
    first = np.cumsum(lens) - lens
    for k, (e, text, sp) in enumerate(zip(encs, texts, spans)):
        for a, b in sp:
            i, j = _first_token_at(e, a, len(text)), _first_token_at(e, b, len(text))
            if j > i:
                edges[first[k] + i] += 1
                edges[first[k] + j] -= 1
    return ids, lens, np.cumsum(edges[:-1]) > 0


def tokenize_texts(texts: list[str], spans: list, tokenizer, *, add_special_tokens: bool, seq_len: int, overlong: str,
                   train_on_inputs: bool, st: SourceStats) -> TokenPart:
    """Tokenise rendered rows in batches; cut or drop over-long ones and drop those left without a target."""
    ids_out, tgt_out, len_out = [], [], []
    for c0 in range(0, len(texts), TOKENIZE_CHUNK):
        chunk, sp = texts[c0 : c0 + TOKENIZE_CHUNK], spans[c0 : c0 + TOKENIZE_CHUNK]
        ids, lens, loss = _encode(tokenizer, chunk, sp, add_special_tokens, train_on_inputs)
        total = len(ids)
        # Over-long samples: keep the first seq_len tokens, or drop the sample.
        long_ = lens > seq_len
        if long_.any():
            pos = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
            if overlong == "truncate":
                keep, st.truncated = pos < seq_len, st.truncated + int(long_.sum())
                lens = np.minimum(lens, seq_len)
            else:
                keep, st.dropped_overlong = np.repeat(~long_, lens), st.dropped_overlong + int(long_.sum())
                lens = lens[~long_]
            ids, loss = ids[keep], loss[keep]
        # Shift: the target at t is token t+1 when that token carries loss; every sample's last is -100.
        tgt = np.full(len(ids), IGNORE_INDEX, np.int64)
        tgt[:-1] = np.where(loss[1:], ids[1:], IGNORE_INDEX)
        ends = np.cumsum(lens) - 1
        tgt[ends[lens > 0]] = IGNORE_INDEX
        # Samples with nothing to learn (no assistant turn, prompt cut at seq_len, empty text) are dropped.
        n_tgt = np.bincount(np.repeat(np.arange(len(lens)), lens), weights=tgt != IGNORE_INDEX, minlength=len(lens))
        empty = n_tgt == 0
        if empty.any():
            st.dropped_no_target += int(empty.sum())
            keep = np.repeat(~empty, lens)
            ids, tgt, lens = ids[keep], tgt[keep], lens[~empty]
        ids_out.append(ids.astype(np.int32))
        tgt_out.append(tgt.astype(np.int32))
        len_out.append(lens)
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    part = TokenPart(st, cat(ids_out, np.int32), cat(tgt_out, np.int32), cat(len_out, np.int64))
    st.samples += len(part.lengths)
    st.tokens += len(part.ids)
    st.target_tokens += int((part.targets != IGNORE_INDEX).sum())
    return part


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with (the tokenizer's pad token, else its EOS). A classification head
    finds each sample's last token as the last one that is not this id, so the model's config gets it too."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def label_index(value, labels: list) -> tuple[int | None, str | None]:
    """(class index, problem) of a row's label: one of `labels`, or its index."""
    if value is None:
        return None, "no field 'label'"
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) and float(value).is_integer():
        # a number is a class name first (data.labels: ["1", "2", "3"] for star ratings), else an index
        # (a float such as 1.0 comes from a column that also holds nulls)
        if str(int(value)) in labels:
            return labels.index(str(int(value))), None
        if 0 <= int(value) < len(labels):
            return int(value), None
        return None, f"label {value} is neither a class name nor an index of data.labels ({len(labels)} classes: 0..{len(labels) - 1})"
    if isinstance(value, str):
        if value in labels:
            return labels.index(value), None
        return None, f"label '{value}' is not one of data.labels ({', '.join(labels)})"
    return None, f"field 'label' must be a class name or index, got {type(value).__name__}"


def tokenize_labelled(cols: dict, n: int, tokenizer, labels: list, *, seq_len: int, overlong: str, on_error: str, origin: RowOrigin,
                      st: SourceStats, errors: list, key: str = "data.sources.N") -> TokenPart:
    """Rows {text, label} for task=classification. A sample is the text's tokens (with the tokenizer's
    usual BOS, no EOS) and targets that are -100 everywhere but the last token, which holds the class
    index: the position the sequence-classification head pools. So `targets != -100` counts samples,
    and the loss normalisation of the causal-LM path carries over unchanged. Trailing pad-id tokens are
    removed: transformers pools the last token that is not the pad id, and it must be the labelled one."""
    texts, classes = [], []
    for i in range(n):
        text, bad = _text_field(cols.get("text", [None] * n)[i])
        cls, bad2 = label_index(cols.get("label", [None] * n)[i], labels)
        if bad or bad2:
            row_problem(f"{origin.at(i)}: {bad or bad2} (task classification)", on_error, st, errors,
                        "fix the row, add the class to data.labels, map a column with " f"{key}.columns, or set data.on_error=skip")
            continue
        texts.append(text)
        classes.append(cls)
    pad = pad_token_id(tokenizer)
    ids_out, tgt_out, len_out = [], [], []
    for c0 in range(0, len(texts), TOKENIZE_CHUNK):
        ids, lens, _ = _encode(tokenizer, texts[c0 : c0 + TOKENIZE_CHUNK], None, True, train_on_inputs=True)
        for sample, cls in zip(np.split(ids, np.cumsum(lens)[:-1]), classes[c0 : c0 + TOKENIZE_CHUNK]):
            if len(sample) > seq_len:
                if overlong == "drop":
                    st.dropped_overlong += 1
                    continue
                sample, st.truncated = sample[:seq_len], st.truncated + 1
            end = len(sample)
            while end and sample[end - 1] == pad:
                end -= 1
            if end == 0:  # an empty text: nothing to classify
                st.dropped_no_target += 1
                continue
            tgt = np.full(end, IGNORE_INDEX, np.int32)
            tgt[-1] = cls
            ids_out.append(sample[:end].astype(np.int32))
            tgt_out.append(tgt)
            len_out.append(end)
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    part = TokenPart(st, cat(ids_out, np.int32), cat(tgt_out, np.int32), np.asarray(len_out, np.int64))
    st.samples += len(part.lengths)
    st.tokens += len(part.ids)
    st.target_tokens += len(part.lengths)
    return part


def _text_field(value) -> tuple[str | None, str | None]:
    if value is None:
        return None, "no field 'text'"
    if isinstance(value, str):
        return value, None
    return None, f"field 'text' must be text, got {type(value).__name__}"


def tokenize_columns(cols: dict, n: int, fmt: str, tokenizer, *, seq_len: int, train_on_inputs: bool, on_error: str, overlong: str,
                     chat_template: str, origin: RowOrigin, st: SourceStats, errors: list, key: str = "data.sources.N",
                     labels: list | None = None) -> TokenPart:
    """Render and tokenise n rows given as columns ({name: list of values}); with `labels`, rows
    {text, label} for task=classification (tokenize_labelled)."""
    if labels:
        return tokenize_labelled(cols, n, tokenizer, labels, seq_len=seq_len, overlong=overlong, on_error=on_error, origin=origin,
                                 st=st, errors=errors, key=key)
    fields = REQUIRED[fmt] + OPTIONAL.get(fmt, ())
    template, which = chat_template_for(tokenizer, chat_template) if fmt == "chat" else (None, "")
    texts, spans = [], []
    for i in range(n):
        text, sp, bad = render_row({f: cols[f][i] for f in fields if f in cols}, fmt, tokenizer, template)
        if bad:
            row_problem(f"{origin.at(i)}: {bad} (format '{fmt}')", on_error, st, errors,
                         f"fix the row, map a column with {key}.columns, or set data.on_error=skip")
            continue
        texts.append(text)
        spans.append(sp)
    # Chat templates emit their own special tokens (BOS included), so the rendered text is tokenised as is;
    # everything else (the built-in chat template too) gets the tokenizer's usual BOS.
    add_special = not (fmt == "chat" and which == "tokenizer's")
    return tokenize_texts(texts, spans, tokenizer, add_special_tokens=add_special, seq_len=seq_len, overlong=overlong,
                          train_on_inputs=train_on_inputs, st=st)


def _part_samples(part: TokenPart) -> list:
    out, o = [], 0
    for n in part.lengths.tolist():
        out.append((torch.from_numpy(part.ids[o : o + n].astype(np.int64)), torch.from_numpy(part.targets[o : o + n].astype(np.int64))))
        o += n
    return out


def tokenize_rows(rows: list[dict], fmt: str, tokenizer, seq_len: int, train_on_inputs: bool, on_error: str, stats: DataStats, origin: str,
                  overlong: str = "truncate", chat_template: str = "auto", labels: list | None = None):
    """Tokenise a list of row dicts; returns a list of (input_ids, targets) int64 tensors."""
    st = SourceStats(origin, fmt)
    st.rows = len(rows)
    errors: list = []
    names = {k for r in rows for k in r}
    cols = {k: [r.get(k) for r in rows] for k in names}
    part = tokenize_columns(cols, len(rows), fmt, tokenizer, seq_len=seq_len, train_on_inputs=train_on_inputs, on_error=on_error,
                            overlong=overlong, chat_template=chat_template, origin=RowOrigin(origin), st=st, errors=errors, labels=labels)
    stats.absorb(st)
    stats.errors += errors
    return _part_samples(part)
