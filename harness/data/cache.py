"""Tokenise once: rank 0 tokenises and writes a cache keyed by everything that changes the tokens;
the other ranks wait and load it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
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
    specs += [_PartSpec("val", i, s.val_path, s.format, dict(s.columns), f"data.sources.{i}.val_path")
              for i, s in enumerate(cfg.sources) if s.val_path]
    return specs


TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template", "spiece")


def _tokenizer_fingerprint(tokenizer) -> str:
    """Content hash of the tokenizer's files (or of its serialised state when it has no directory)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    d = Path(str(getattr(tokenizer, "name_or_path", "")))
    candidates = sorted(d.iterdir()) if d.is_dir() else []
    files = [p for p in candidates if p.is_file() and (p.name.startswith(TOKENIZER_FILES) or p.suffix in (".model", ".tiktoken"))]
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
        "labels": list(cfg.labels),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest(), doc


def _tokenize_all(cfg: DataConfig, tokenizer, tmp_dir: str | None) -> tuple[list[TokenPart], list[str]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"the tokenizer of '{tokenizer.name_or_path}' is not a fast tokenizer; the data pipeline needs tokenizer.json")
    parts, errors = [], []
    for spec in source_plan(cfg):
        st = SourceStats(spec.path, spec.format, spec.split)
        ds, origin = load_source(spec.path, spec.format, spec.columns, cfg.on_error, st, errors, spec.key, tmp_dir,
                                 need_label=bool(cfg.labels))
        fields = [f for f in REQUIRED[spec.format] + OPTIONAL.get(spec.format, ()) + (("label",) if cfg.labels else ()) if f in ds.column_names]
        cols = ds.select_columns(fields).to_dict()
        part = tokenize_columns(cols, len(ds), spec.format, tokenizer, seq_len=cfg.seq_len, train_on_inputs=cfg.train_on_inputs,
                                on_error=cfg.on_error, overlong=cfg.overlong, chat_template=cfg.chat_template, origin=origin,
                                st=st, errors=errors, key=spec.key, labels=cfg.labels or None)
        if not len(part.lengths):
            raise ConfigError(
                f"{spec.path}: no samples left of {st.rows} rows: {st.skipped} skipped as bad, {st.dropped_overlong} dropped as longer "
                f"than data.seq_len={cfg.seq_len}, {st.dropped_no_target} without any target token; fix the data or the settings"
            )
        parts.append(part)
    return parts, errors


def content_digest(cfg: DataConfig) -> str:
    """Hash of the bytes of every data file (rank 0, once per run). The cache key holds sizes and mtimes,
    which an in-place edit can leave unchanged; this catches such an edit. BLAKE2b reads at disk speed,
    far faster than tokenising the same bytes."""
    h = hashlib.blake2b(digest_size=32)
    for spec in source_plan(cfg):
        p = Path(spec.path)
        for x in sorted(y for y in p.rglob("*") if y.is_file()) if p.is_dir() else [p]:
            h.update(str(x).encode())
            with open(x, "rb") as f:
                h.update(hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=32)).digest())
    return h.hexdigest()


def _shareable(path: Path) -> None:
    """mkdtemp makes 0700 directories: give the entry the permissions the umask allows, so a cache_dir
    shared between users (a team's data cache) is readable by the others."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for f in path.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _save_cache(entry: Path, parts: list[TokenPart], errors: list, doc: dict, tokenize_s: float, digest: str) -> None:
    """Write the entry into a temporary directory, then rename it into place (readers see a whole entry or
    none). Any failure (a full disk shows as a SafetensorError) removes the temporary directory."""
    from safetensors.numpy import save_file

    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp", dir=entry.parent))
    try:
        arrays = {}
        for k, p in enumerate(parts):
            arrays.update({f"{k}.ids": p.ids, f"{k}.targets": p.targets, f"{k}.lengths": p.lengths})
        save_file(arrays, str(tmp / "tokens.safetensors"))
        meta = {"key": doc, "content": digest, "stats": [dataclasses.asdict(p.stats) for p in parts],
                "errors": errors[:MAX_EXAMPLES * 10], "tokenize_s": tokenize_s}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _shareable(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if entry.exists():  # a stale or unreadable entry of the same key (its data changed in place): replace it
        shutil.rmtree(entry, ignore_errors=True)
    try:
        tmp.rename(entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another job wrote the same entry first
        if not (entry / "meta.json").is_file():
            raise


def _load_cache(entry: Path, digest: str | None = None) -> tuple[list[TokenPart], list[str], float]:
    """The entry's parts; ValueError when it cannot be read whole or (with `digest`) was made from other bytes."""
    from safetensors.numpy import load_file

    try:
        meta = json.loads((entry / "meta.json").read_text())
        if digest is not None and meta.get("content") != digest:
            raise ValueError("the data files changed since it was written (same sizes and times, other bytes)")
        arrays = load_file(str(entry / "tokens.safetensors"))
        parts = [TokenPart(SourceStats(**s), arrays[f"{k}.ids"], arrays[f"{k}.targets"], arrays[f"{k}.lengths"]) for k, s in enumerate(meta["stats"])]
        return parts, meta["errors"], meta["tokenize_s"]
    except ValueError:
        raise
    except Exception as e:  # truncated JSON or safetensors, a missing array: whatever a crash or a disk left
        raise ValueError(f"unreadable ({type(e).__name__}: {str(e)[:120]})") from e


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
            digest = content_digest(cfg) if entry is not None else ""
            if entry is not None and (entry / "meta.json").is_file():
                try:
                    parts, errors, tok_s = _load_cache(entry, digest)
                    status = "hit"
                    say(f"data: tokenised data from the cache {entry}")
                except ValueError as e:
                    say(f"data: the cache {entry} is not usable: {e}; tokenising again and replacing it")
            if parts is None:
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
                        _save_cache(entry, parts, errors, doc, tok_s, digest)
                        say(f"data: wrote the cache {entry}")
                    except Exception as e:  # OSError, or safetensors' SafetensorError on a full disk: the cache is optional
                        say(f"data: could not write the cache {entry} ({type(e).__name__}: {e}); other ranks tokenise for themselves")
        except ConfigError as e:
            err = str(e)
    if world_size > 1 and entry is not None and torch.distributed.is_initialized():
        box = [err, status]
        torch.distributed.broadcast_object_list(box, src=0)
        err, status = box
    if err is not None:
        raise ConfigError(err)
    if parts is None:  # rank > 0 with a cache (rank 0 has checked, or rewritten, it)
        try:
            parts, errors, tok_s = _load_cache(entry)
        except (FileNotFoundError, ValueError) as e:
            print(f"rank {rank}: the data cache {entry} is not readable here ({e}; not a shared filesystem?); tokenising locally", flush=True)
            parts, errors = _tokenize_all(cfg, tokenizer, None)
    return parts, errors, status, tok_s
