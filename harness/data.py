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
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness.config import ConfigError, DataConfig, SourceConfig

IGNORE_INDEX = -100
CACHE_VERSION = 1
TOKENIZE_CHUNK = 2048  # rows per tokenizer call
MAX_EXAMPLES = 5  # problems quoted in the log when rows are skipped

# Built-in prompt templates (documented in the README). The response follows the prompt directly.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
REQUIRED = {"alpaca": ("instruction", "output"), "completion": ("prompt", "completion"), "text": ("text",), "chat": ("messages",)}
OPTIONAL = {"alpaca": ("input",)}

# Chat template for tokenizers without one (or data.chat_template=builtin). Each message renders as
# "### Role:\n{content}\n\n" and an assistant message ends with the EOS token before the blank line;
# the generation prompt is "### Assistant:\n". BOS is added by the tokenizer as for plain text.
BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------------------------
# Statistics: nothing is dropped without being counted
# ----------------------------------------------------------------------------------------------


@dataclass
class SourceStats:
    name: str  # the file
    format: str
    split: str = "train"
    rows: int = 0  # rows read, bad ones included
    skipped: int = 0  # malformed or missing fields (data.on_error=skip)
    truncated: int = 0  # longer than seq_len and cut (data.overlong=truncate)
    dropped_overlong: int = 0  # longer than seq_len and dropped (data.overlong=drop)
    dropped_no_target: int = 0  # nothing to learn: no assistant turn, or the prompt alone fills seq_len
    samples: int = 0  # samples kept
    tokens: int = 0
    target_tokens: int = 0


@dataclass
class DataStats:
    rows: int = 0  # samples kept, over every file read
    skipped_rows: int = 0
    truncated: int = 0
    dropped: int = 0  # over-long (overlong=drop) plus without any target token
    target_tokens: int = 0
    errors: list = field(default_factory=list)  # the first problems, as messages
    sources: list = field(default_factory=list)  # SourceStats per file read
    mix: list = field(default_factory=list)  # per training source: its samples and share of the mix
    mixing: str = "weight"
    train_samples: int = 0
    train_rows: int = 0  # packed rows (= train_samples without packing)
    val_samples: int = 0
    packing_efficiency: float = 0.0  # real tokens / (rows x seq_len)
    cache: str = "off"  # hit | miss | off
    tokenize_s: float = 0.0

    def absorb(self, st: SourceStats) -> None:
        self.sources.append(st)
        self.rows += st.samples
        self.skipped_rows += st.skipped
        self.truncated += st.truncated
        self.dropped += st.dropped_overlong + st.dropped_no_target
        self.target_tokens += st.target_tokens

    def lines(self, seq_len: int) -> list[str]:
        """The log lines: sizes and every count of what was skipped, cut or dropped; the mix shares."""
        n_trunc = sum(s.truncated for s in self.sources)
        n_long = sum(s.dropped_overlong for s in self.sources)
        n_empty = sum(s.dropped_no_target for s in self.sources)
        rows = f" in {self.train_rows:,} packed rows ({100 * self.packing_efficiency:.1f}% full)" if self.train_rows != self.train_samples else ""
        out = [
            f"data: {self.train_samples:,} train samples{rows}, {self.val_samples:,} val, {self.target_tokens:,} target tokens; "
            f"{self.skipped_rows} rows skipped, {n_trunc} truncated to {seq_len} and {n_long} dropped as longer, "
            f"{n_empty} dropped without target tokens; cache {self.cache}"
        ]
        if self.mix:
            parts = [f"{m['name']} {100 * m['share']:.1f}% ({m['samples']:,} samples, {m['epochs']:.2f} epochs)" for m in self.mix]
            out.append(f"data mix ({self.mixing}): " + ", ".join(parts))
        out += [f"data: skipped {e}" for e in self.errors[:MAX_EXAMPLES]]
        return out

    def record(self) -> dict:
        """For metrics.jsonl: everything above as plain numbers."""
        d = dataclasses.asdict(self)
        d["errors"] = self.errors[:MAX_EXAMPLES]
        return d


# ----------------------------------------------------------------------------------------------
# Loading through `datasets`, with file:line errors
# ----------------------------------------------------------------------------------------------


class _Origin:
    """Names a row in messages: 'file.jsonl:12' for JSON lines, 'file.parquet: row 12' otherwise."""

    def __init__(self, name: str, jsonl: bool = False, lines: list[int] | None = None):
        self.name, self.jsonl, self.lines = name, jsonl, lines

    def at(self, i: int) -> str:
        if self.jsonl:
            if self.lines is None:  # rows are the non-blank lines, in order
                with open(self.name, encoding="utf-8", errors="replace") as f:
                    self.lines = [n for n, line in enumerate(f, 1) if line.strip()]
            return f"{self.name}:{self.lines[i]}"
        return f"{self.name}: row {i + 1}"


def _row_problem(msg: str, on_error: str, st: SourceStats, errors: list, fix: str) -> None:
    """A bad row: an error (on_error=raise) or skipped and counted (on_error=skip)."""
    if on_error == "raise":
        raise ConfigError(f"{msg}; {fix}")
    st.skipped += 1
    errors.append(msg)


def _innermost(e: BaseException) -> str:
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {e}"


def _is_blank(path: Path) -> bool:
    if path.stat().st_size == 0:
        return True
    if path.stat().st_size > 1 << 20:
        return False
    return not path.read_bytes().strip()


def _json_by_line(path: Path, on_error: str, st: SourceStats, errors: list, why: Exception):
    """`datasets` could not read a JSON file: find the bad lines (file:line), skip them or fail."""
    import datasets

    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json" and text.lstrip().startswith("["):  # one JSON document
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}); fix the file (a JSON array cannot be read row by row)") from None
        pairs = [(i + 1, x) for i, x in enumerate(items)]
        where = "element"
    else:
        pairs = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        where = "line"
    rows, lines = [], []
    for n, item in pairs:
        try:
            row = json.loads(item) if where == "line" else item
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as e:
            st.rows += 1
            loc = f"{path}:{n}" if where == "line" else f"{path}: element {n}"
            _row_problem(f"{loc}: malformed JSON {where} ({e})", on_error, st, errors, f"fix the {where} or set data.on_error=skip")
            continue
        rows.append(row)
        lines.append(n)
    if not rows:
        raise ConfigError(f"{path}: no readable rows ({st.skipped} malformed); fix the file")
    try:
        ds = datasets.Dataset.from_list(rows)
    except Exception as e:  # every line parses but the rows do not form a table (mixed types)
        raise ConfigError(f"{path}: cannot be read as a dataset ({_innermost(why)}); make each field one type across rows") from e
    return ds, _Origin(str(path), jsonl=where == "line", lines=lines if where == "line" else None)


def load_source(path: str, fmt: str, columns: dict, on_error: str, st: SourceStats, errors: list, key: str = "data.sources.N", tmp_dir: str | None = None):
    """One file (or saved dataset directory) as a `datasets.Dataset` with the column mapping applied and
    the columns the format needs present. Returns (dataset, origin)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    p = Path(path)
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise ConfigError(f"{p}: cannot be read as a saved dataset ({_innermost(e)}); write it with Dataset.save_to_disk") from e
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ConfigError(f"{p}: a saved DatasetDict without a 'train' split (has {', '.join(ds)}); save the split to use")
            ds = ds["train"]
        origin = _Origin(str(p))
    else:
        kind = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(p.suffix.lower())
        if kind is None:
            raise ConfigError(f"{p}: unknown file type '{p.suffix}'; use .jsonl, .json, .parquet, .csv or a saved dataset directory")
        if _is_blank(p):
            raise ConfigError(f"{p}: the file is empty (no rows); fill it or remove the source")
        origin = _Origin(str(p), jsonl=kind == "json" and not p.read_bytes()[:4096].lstrip().startswith(b"["))
        with tempfile.TemporaryDirectory(dir=tmp_dir) as hf_cache:  # datasets' Arrow copy: read into memory, then gone
            try:
                ds = datasets.load_dataset(kind, data_files=str(p), split="train", cache_dir=hf_cache, keep_in_memory=True)
            except Exception as e:
                if kind != "json":
                    raise ConfigError(f"{p}: cannot be read as {kind} ({_innermost(e)}); fix the file") from e
                ds, origin = _json_by_line(p, on_error, st, errors, e)
    if len(ds) == 0:
        raise ConfigError(f"{p}: the file is empty (no rows); fill it or remove the source")
    if columns:
        missing = [have for have in columns.values() if have not in ds.column_names]
        if missing:
            raise ConfigError(f"{p}: {key}.columns names {', '.join(repr(m) for m in missing)}, not a column of the file (it has {', '.join(ds.column_names)})")
        if len(set(columns.values())) != len(columns):
            raise ConfigError(f"{key}.columns maps two names to one column; map each expected name to its own column")
        clash = [want for want in columns if want in ds.column_names and want not in columns.values()]
        ds = ds.remove_columns(clash).rename_columns({have: want for want, have in columns.items() if have != want})
    need = [c for c in REQUIRED[fmt] if c not in ds.column_names]
    if need:
        hint = ", ".join(f"{c}: <column>" for c in need)
        raise ConfigError(
            f"{p}: no column {', '.join(repr(c) for c in need)} needed by format '{fmt}' (the file has {', '.join(ds.column_names)}); "
            f"map one with {key}.columns: {{{hint}}} or pick the right {key}.format"
        )
    st.rows += len(ds)
    return ds, origin


def load_rows(src: SourceConfig, on_error: str, stats: DataStats) -> list[dict]:
    """Rows of one source as dicts, with the column mapping applied (a small helper for tools and tests)."""
    st = SourceStats(src.path, src.format)
    errors: list = []
    ds, _ = load_source(src.path, src.format, src.columns, on_error, st, errors)
    stats.absorb(st)
    stats.errors += errors
    return ds.to_list()


# ----------------------------------------------------------------------------------------------
# Rendering: each row -> text plus the character spans that carry loss
# ----------------------------------------------------------------------------------------------


def chat_template_for(tokenizer, choice: str = "auto") -> tuple[str, str]:
    """(template, which): the tokenizer's chat template, or the built-in one."""
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, dict):
        tmpl = tmpl.get("default")
    if choice == "builtin" or not tmpl:
        return BUILTIN_CHAT_TEMPLATE, "built-in"
    return tmpl, "tokenizer's"


class TemplateError(ConfigError):
    pass


def render_chat(messages: list[dict], tokenizer, template: str) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; every assistant turn carries loss. The template is applied to growing
    prefixes so each turn's characters are known exactly: a turn's span runs from the end of the
    generation prompt to the end of the turn (whitespace the template puts between turns excluded)."""

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise TemplateError(
                "the chat template does not render a conversation's prefixes as prefixes of the whole "
                "(it rewrites earlier turns), so assistant turns cannot be located; set data.chat_template=builtin"
            )
        spans.append((len(prefix), max(len(prefix), len(upto.rstrip()))))
    return full, spans


def _text(value, name: str) -> tuple[str | None, str | None]:
    """(text, problem) for a field that must be text."""
    if value is None:
        return None, f"no field '{name}'"
    if isinstance(value, str):
        return value, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value), None
    return None, f"field '{name}' must be text, got {type(value).__name__}"


def _messages(value) -> tuple[list | None, str | None]:
    if value is None:
        return None, "no field 'messages'"
    if not isinstance(value, list) or not value:
        return None, "field 'messages' must be a non-empty list of {role, content}"
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return None, f"message {j} has no 'role' (each message is {{role, content}})"
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            return None, f"message {j} content must be text, got {type(content).__name__}"
        clean = {k: v for k, v in m.items() if v is not None}
        clean["content"] = content or ""
        out.append(clean)
    return out, None


def render_row(row: dict, fmt: str, tokenizer, template: str | None = None) -> tuple[str | None, list, str | None]:
    """(text, loss_spans, problem): loss_spans are [start, end) character ranges of what is learned."""
    eos = tokenizer.eos_token or ""
    if fmt == "text":
        text, bad = _text(row.get("text"), "text")
        return (None, [], bad) if bad else (text + eos, [(0, len(text) + len(eos))], None)
    if fmt == "alpaca":
        ins, bad = _text(row.get("instruction"), "instruction")
        out, bad2 = _text(row.get("output"), "output")
        inp, bad3 = _text(row.get("input"), "input") if row.get("input") is not None else ("", None)
        if bad or bad2 or bad3:
            return None, [], bad or bad2 or bad3
        prompt = (ALPACA_PROMPT_WITH_INPUT if inp else ALPACA_PROMPT).format(instruction=ins, input=inp)
        return prompt + out + eos, [(len(prompt), len(prompt) + len(out) + len(eos))], None
    if fmt == "completion":
        prompt, bad = _text(row.get("prompt"), "prompt")
        out, bad2 = _text(row.get("completion"), "completion")
        if bad or bad2:
            return None, [], bad or bad2
        return prompt + out + eos, [(len(prompt), len(prompt) + len(out) + len(eos))], None
    if fmt == "chat":
        msgs, bad = _messages(row.get("messages"))
        if bad:
            return None, [], bad
        try:
            text, spans = render_chat(msgs, tokenizer, template or chat_template_for(tokenizer)[0])
        except TemplateError:
            raise
        except Exception as e:  # the template refused the conversation (unknown role, order...)
            return None, [], f"the chat template failed ({type(e).__name__}: {e})"
        return text, spans, None
    raise ConfigError(f"unknown data format '{fmt}'")


# ----------------------------------------------------------------------------------------------
# Tokenising: text + spans -> flat token arrays with shifted targets
# ----------------------------------------------------------------------------------------------


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


def tokenize_columns(cols: dict, n: int, fmt: str, tokenizer, *, seq_len: int, train_on_inputs: bool, on_error: str, overlong: str,
                     chat_template: str, origin: _Origin, st: SourceStats, errors: list, key: str = "data.sources.N") -> TokenPart:
    """Render and tokenise n rows given as columns ({name: list of values})."""
    fields = REQUIRED[fmt] + OPTIONAL.get(fmt, ())
    template, which = chat_template_for(tokenizer, chat_template) if fmt == "chat" else (None, "")
    texts, spans = [], []
    for i in range(n):
        text, sp, bad = render_row({f: cols[f][i] for f in fields if f in cols}, fmt, tokenizer, template)
        if bad:
            _row_problem(f"{origin.at(i)}: {bad} (format '{fmt}')", on_error, st, errors,
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
                  overlong: str = "truncate", chat_template: str = "auto"):
    """Tokenise a list of row dicts; returns a list of (input_ids, targets) int64 tensors."""
    st = SourceStats(origin, fmt)
    st.rows = len(rows)
    errors: list = []
    names = {k for r in rows for k in r}
    cols = {k: [r.get(k) for r in rows] for k in names}
    part = tokenize_columns(cols, len(rows), fmt, tokenizer, seq_len=seq_len, train_on_inputs=train_on_inputs, on_error=on_error,
                            overlong=overlong, chat_template=chat_template, origin=_Origin(origin), st=st, errors=errors)
    stats.absorb(st)
    stats.errors += errors
    return _part_samples(part)


# ----------------------------------------------------------------------------------------------
# Tokenise once: rank 0 tokenises and writes a cache keyed by everything that changes the tokens
# ----------------------------------------------------------------------------------------------


@dataclass
class _PartSpec:
    split: str  # train | val
    source: int  # index in data.sources (-1: data.val_path)
    path: str
    format: str
    columns: dict
    key: str  # recipe key, for messages


def _plan(cfg: DataConfig) -> list[_PartSpec]:
    specs = [_PartSpec("train", i, s.path, s.format, dict(s.columns), f"data.sources.{i}") for i, s in enumerate(cfg.sources)]
    if cfg.val_path:
        s0 = cfg.sources[0]
        specs.append(_PartSpec("val", -1, cfg.val_path, s0.format, dict(s0.columns), "data.val_path"))
    specs += [_PartSpec("val", i, s.val_path, s.format, dict(s.columns), f"data.sources.{i}.val_path") for i, s in enumerate(cfg.sources) if s.val_path]
    return specs


TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template", "spiece")


def _tokenizer_fingerprint(tokenizer) -> str:
    """Content hash of the tokenizer's files (or of its serialised state when it has no directory)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    d = Path(str(getattr(tokenizer, "name_or_path", "")))
    files = sorted(p for p in d.iterdir() if p.is_file() and (p.name.startswith(TOKENIZER_FILES) or p.suffix in (".model", ".tiktoken"))) if d.is_dir() else []
    if files:
        for p in files:
            h.update(p.name.encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    else:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        h.update(backend.to_str().encode() if backend is not None else repr(tokenizer).encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, getattr(tokenizer, "chat_template", None)], default=str).encode())
    return h.hexdigest()


def _file_fingerprint(path: str) -> list:
    p = Path(path)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    return [[str(x.relative_to(p)) if p.is_dir() else x.name, x.stat().st_size, x.stat().st_mtime_ns] for x in files]


def cache_key(cfg: DataConfig, tokenizer) -> tuple[str, dict]:
    """(hash, the document hashed): tokenizer files, each file's path + size + mtime, formats, column
    maps, templates, seq_len and every option that changes the tokens."""
    specs = _plan(cfg)
    doc = {
        "version": CACHE_VERSION,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "templates": [ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT,
                      chat_template_for(tokenizer, cfg.chat_template)[0] if any(s.format == "chat" for s in specs) else None],
        "parts": [{**dataclasses.asdict(s), "path": str(Path(s.path).resolve()), "files": _file_fingerprint(s.path)} for s in specs],
        "seq_len": cfg.seq_len,
        "overlong": cfg.overlong,
        "train_on_inputs": cfg.train_on_inputs,
        "on_error": cfg.on_error,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest(), doc


def _tokenize_all(cfg: DataConfig, tokenizer, tmp_dir: str | None) -> tuple[list[TokenPart], list[str]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"the tokenizer of '{tokenizer.name_or_path}' is not a fast tokenizer; the data pipeline needs tokenizer.json")
    parts, errors = [], []
    for spec in _plan(cfg):
        st = SourceStats(spec.path, spec.format, spec.split)
        ds, origin = load_source(spec.path, spec.format, spec.columns, cfg.on_error, st, errors, spec.key, tmp_dir)
        fields = [f for f in REQUIRED[spec.format] + OPTIONAL.get(spec.format, ()) if f in ds.column_names]
        cols = ds.select_columns(fields).to_dict()
        part = tokenize_columns(cols, len(ds), spec.format, tokenizer, seq_len=cfg.seq_len, train_on_inputs=cfg.train_on_inputs,
                                on_error=cfg.on_error, overlong=cfg.overlong, chat_template=cfg.chat_template, origin=origin,
                                st=st, errors=errors, key=spec.key)
        if not len(part.lengths):
            raise ConfigError(
                f"{spec.path}: no samples left of {st.rows} rows: {st.skipped} skipped as bad, {st.dropped_overlong} dropped as longer "
                f"than data.seq_len={cfg.seq_len}, {st.dropped_no_target} without any target token; fix the data or the settings"
            )
        parts.append(part)
    return parts, errors


def _save_cache(entry: Path, parts: list[TokenPart], errors: list, doc: dict, tokenize_s: float) -> None:
    from safetensors.numpy import save_file

    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp", dir=entry.parent))
    arrays = {}
    for k, p in enumerate(parts):
        arrays.update({f"{k}.ids": p.ids, f"{k}.targets": p.targets, f"{k}.lengths": p.lengths})
    save_file(arrays, str(tmp / "tokens.safetensors"))
    meta = {"key": doc, "stats": [dataclasses.asdict(p.stats) for p in parts], "errors": errors[:MAX_EXAMPLES * 10], "tokenize_s": tokenize_s}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        tmp.rename(entry)  # atomic: readers see a whole entry or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another job wrote the same entry first
        if not (entry / "meta.json").is_file():
            raise


def _load_cache(entry: Path) -> tuple[list[TokenPart], list[str], float]:
    from safetensors.numpy import load_file

    meta = json.loads((entry / "meta.json").read_text())
    arrays = load_file(str(entry / "tokens.safetensors"))
    parts = [TokenPart(SourceStats(**s), arrays[f"{k}.ids"], arrays[f"{k}.targets"], arrays[f"{k}.lengths"]) for k, s in enumerate(meta["stats"])]
    return parts, meta["errors"], meta["tokenize_s"]


def tokenize_once(cfg: DataConfig, tokenizer, *, cache_dir: str | None, rank: int = 0, world_size: int = 1, say=print):
    """Tokenised parts (one per file). With a cache_dir, rank 0 tokenises (or finds the cache of an earlier
    run) and the other ranks wait, then load its files; an error on rank 0 is raised on every rank.
    Returns (parts, errors, cache status, seconds spent tokenising)."""
    entry = None
    if cache_dir:
        key, doc = cache_key(cfg, tokenizer)
        entry = Path(cache_dir) / f"tokens-{key[:20]}"
    status, err = "off", None
    parts, errors, tok_s = None, [], 0.0
    if rank == 0 or entry is None:
        try:
            if entry is not None and (entry / "meta.json").is_file():
                parts, errors, tok_s = _load_cache(entry)
                status = "hit"
                say(f"data: tokenised data from the cache {entry}")
            else:
                t0 = time.perf_counter()
                if entry is not None:
                    entry.parent.mkdir(parents=True, exist_ok=True)
                parts, errors = _tokenize_all(cfg, tokenizer, str(entry.parent) if entry is not None else None)
                tok_s = time.perf_counter() - t0
                who = f"rank {rank}" if world_size > 1 else "data"
                print(f"{who}: tokenised {sum(p.stats.rows for p in parts):,} rows in {tok_s:.1f}s", flush=True)
                if entry is not None:
                    status = "miss"
                    try:
                        _save_cache(entry, parts, errors, doc, tok_s)
                        say(f"data: wrote the cache {entry}")
                    except OSError as e:
                        say(f"data: could not write the cache {entry} ({e}); other ranks tokenise for themselves")
        except ConfigError as e:
            err = str(e)
    if world_size > 1 and entry is not None and torch.distributed.is_initialized():
        box = [err, status]
        torch.distributed.broadcast_object_list(box, src=0)
        err, status = box
    if err is not None:
        raise ConfigError(err)
    if parts is None:  # rank > 0 with a cache
        if (entry / "meta.json").is_file():
            parts, errors, tok_s = _load_cache(entry)
        else:
            print(f"rank {rank}: the data cache {entry} is not visible here (not a shared filesystem?); tokenising locally", flush=True)
            parts, errors = _tokenize_all(cfg, tokenizer, None)
    return parts, errors, status, tok_s


# ----------------------------------------------------------------------------------------------
# Samples: list-like views over the flat token arrays
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Split, mix, pack (pure functions of the data and the seed)
# ----------------------------------------------------------------------------------------------


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
    specs = _plan(cfg)
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


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------


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


def flat_batches(cfg: DataConfig, model) -> bool:
    """Whether micro-batches are laid out as one row: padding_free always; packing under flash-attn,
    whose varlen path reads sample boundaries from position_ids only when the batch is a single row."""
    attn = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    return bool(cfg.padding_free or (cfg.packing and "flash" in attn))


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
        self.grad_accum = global_batch // (micro_batch * world_size)
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
