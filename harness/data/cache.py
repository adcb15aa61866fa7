"""Tokenise once: rank 0 tokenises and writes a cache keyed by everything that changes the tokens;
the other ranks wait and load it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.config import ConfigError, DataConfig
from harness.data.render import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, OPTIONAL, REQUIRED, chat_template_for
from harness.data.sources import load_source
from harness.data.stats import MAX_EXAMPLES, SourceStats
from harness.data.tokens import TokenPart, tokenize_columns

CACHE_VERSION = 1


@dataclass
class _PartSpec:
    split: str  # train | val
    source: int  # index in data.sources (-1: data.val_path)
    path: str
    format: str
    columns: dict
    key: str  # recipe key, for messages


def source_plan(cfg: DataConfig) -> list[_PartSpec]:
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
    specs = source_plan(cfg)
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
    for spec in source_plan(cfg):
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
