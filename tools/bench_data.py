#!/usr/bin/env python
"""Benchmark the data pipeline (prints figures; not a test).

(a) Training throughput with packing versus padding on a dataset of mixed lengths. harness/train.py
    runs as one plain process (ZeRO-0, LoRA, fp32 on CPU) on a tiny random Llama-shaped model, once per
    batch layout:
      padded          micro-batches of --micro-batch samples, right-padded to the longest
      padded+grouped  the same with data.group_by_length
      padding-free    each micro-batch laid end to end in one row (position ids restart per sample)
      packed          rows of data.seq_len tokens packed with several samples
    tokens/s counts non-padding tokens (metrics.jsonl): total tokens / total step time over the steps
    after --warmup-steps. Samples per optimizer step are kept comparable: the unpacked layouts take
    2 micro-batches of --micro-batch samples; packed takes 2 micro-batches of k rows with
    k = round(--micro-batch / mean samples per row), so it sees about as many samples per step.
(b) Time to tokenise --rows short alpaca rows (generated) with the harness's own path:
    datasets.load_dataset -> render -> fast tokenizer with offsets -> loss masks, then split and mix
    (data.build_datasets without a cache); and the time to load the result back from the cache.

    python tools/bench_data.py                       # both parts
    python tools/bench_data.py --skip-train --rows 100000 --json /tmp/data.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORDS = ("alpha beta gamma delta river stone cloud green seven market window orange quiet table north "
         "signal paper garden metal winter copper yellow silent forest button candle").split()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per training run (default 30)")
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the figures (default 5)")
    p.add_argument("--micro-batch", type=int, default=8, help="samples per micro-batch without packing (default 8)")
    p.add_argument("--seq-len", type=int, default=512, help="data.seq_len (default 512)")
    p.add_argument("--hidden", type=int, default=256, help="model width (default 256)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--train-rows", type=int, default=3000, help="rows of the mixed-length training set (default 3000)")
    p.add_argument("--rows", type=int, default=100_000, help="short rows to tokenise in part (b) (default 100000)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-tokenize", action="store_true")
    p.add_argument("--work-dir", type=Path, default=None, help="model, data and runs (default: a new /tmp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args(argv)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def mixed_length_rows(n: int, seed: int = 0) -> list[dict]:
    """Alpaca rows whose lengths span two orders of magnitude: most short, a long tail."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        long_ = rng.random() < 0.2
        rows.append({"instruction": words(rng, rng.randint(3, 12)), "input": words(rng, rng.randint(0, 20)),
                     "output": words(rng, rng.randint(60, 160) if long_ else rng.randint(2, 25))})
    return rows


def short_rows(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": words(rng, rng.randint(3, 8)), "input": words(rng, rng.randint(0, 4)), "output": words(rng, rng.randint(1, 8))}
            for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_train(model: Path, data_path: Path, out: Path, args, overrides: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "harness" / "train.py"), "--config", str(REPO / "harness" / "recipes" / "tiny_qlora.yaml"),
           f"model.path={model}", f"output_dir={out}", "method=lora", "deepspeed.config=ds_configs/zero0.json",
           "train.gradient_checkpointing=none", f"train.max_steps={args.steps}", "train.warmup_steps=1", "eval.every_steps=0",
           "log.every_steps=1", "log.progress_bar=false", f"data.seq_len={args.seq_len}", "data.val_path=",
           f"data.sources=[{{path: '{data_path}', format: alpaca}}]", f"data.cache_dir={out.parent / 'cache'}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training run failed ({' '.join(overrides)}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    prev, rows = 0.0, []
    for r in steps:
        rows.append((r["step"], r["tokens_seen"] - prev, r["step_s"]))
        prev = r["tokens_seen"]
    measured = [(t, s) for step, t, s in rows if step > args.warmup_steps]
    tokens, secs = sum(t for t, _ in measured), sum(s for _, s in measured)
    return {"tokens_per_s": tokens / secs, "tokens_per_step": tokens / len(measured), "step_s": secs / len(measured),
            "data": records[0]["data"]}


def bench_train(args, work: Path) -> list[dict]:
    from make_tiny_model import make_tiny_model
    from transformers import AutoTokenizer

    from harness import data
    from harness.config import DataConfig, SourceConfig

    model = make_tiny_model("llama-3.1-8b", work / "model", layers=args.layers, hidden=args.hidden, intermediate=2 * args.hidden)
    data_path = write_jsonl(work / "mixed.jsonl", mixed_length_rows(args.train_rows))
    tok = AutoTokenizer.from_pretrained(model)
    cfg = DataConfig(sources=[SourceConfig(path=str(data_path), format="alpaca")], seq_len=args.seq_len, packing=True)
    train, _, stats = data.build_datasets(cfg, tok, 0)
    per_row = stats.train_samples / stats.train_rows
    lengths = data.sample_lengths(data.build_datasets(DataConfig(sources=cfg.sources, seq_len=args.seq_len), tok, 0)[0])
    print(f"dataset: {args.train_rows} rows, sample length min {lengths.min()} / median {int(sorted(lengths)[len(lengths) // 2])} / "
          f"max {lengths.max()} tokens; packing: {per_row:.2f} samples per row of {args.seq_len}, {100 * stats.packing_efficiency:.1f}% full")
    mb = args.micro_batch
    k = max(1, round(mb / per_row))
    layouts = [
        ("padded", mb, [f"train.micro_batch_size={mb}", f"train.global_batch_size={2 * mb}"]),
        ("padded+grouped", mb, [f"train.micro_batch_size={mb}", f"train.global_batch_size={2 * mb}", "data.group_by_length=true"]),
        ("padding-free", mb, [f"train.micro_batch_size={mb}", f"train.global_batch_size={2 * mb}", "data.padding_free=true"]),
        ("packed", k * per_row, [f"train.micro_batch_size={k}", f"train.global_batch_size={2 * k}", "data.packing=true"]),
    ]
    results = []
    for name, samples_per_mb, over in layouts:
        t0 = time.perf_counter()
        r = run_train(model, data_path, work / "runs" / name, args, over)
        r.update(layout=name, samples_per_step=2 * samples_per_mb, wall_s=time.perf_counter() - t0)
        results.append(r)
        print(f"  {name:15s} {r['tokens_per_s']:10,.0f} tokens/s  ({r['samples_per_step']:.1f} samples/step, {r['step_s']:.3f} s/step)", flush=True)
    return results


def bench_tokenize(args, work: Path) -> dict:
    from make_tiny_model import make_tiny_model
    from transformers import AutoTokenizer

    from harness import data
    from harness.config import DataConfig, SourceConfig

    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the tokenizer's own threads, as in a training run's rank 0
    model = work / "model" if (work / "model" / "tokenizer.json").is_file() else make_tiny_model("llama-3.1-8b", work / "model")
    tok = AutoTokenizer.from_pretrained(model)
    path = write_jsonl(work / "short.jsonl", short_rows(args.rows))
    cfg = DataConfig(sources=[SourceConfig(path=str(path), format="alpaca")], seq_len=args.seq_len)
    t0 = time.perf_counter()
    train, _, stats = data.build_datasets(cfg, tok, 0, cache_dir=str(work / "tok_cache"))
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, _, hit = data.build_datasets(cfg, tok, 0, cache_dir=str(work / "tok_cache"))
    cached = time.perf_counter() - t0
    assert hit.cache == "hit"
    out = {"rows": args.rows, "tokens": int(sum(s.tokens for s in stats.sources)), "seconds": total, "tokenize_s": stats.tokenize_s,
           "rows_per_s": args.rows / total, "cache_load_s": cached, "cpus": os.cpu_count()}
    print(f"tokenise {args.rows:,} short alpaca rows ({out['tokens']:,} tokens) on {out['cpus']} cores: {total:.2f} s "
          f"({out['rows_per_s']:,.0f} rows/s; load+render+tokenise {stats.tokenize_s:.2f} s, the rest split/mix/cache write); "
          f"from the cache: {cached:.2f} s", flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    result = {}
    if not args.skip_tokenize:
        result["tokenize"] = bench_tokenize(args, work)
    if not args.skip_train:
        result["train"] = bench_train(args, work)
        base = result["train"][0]["tokens_per_s"]
        print("\n| layout | tokens/s | vs padded | samples/step | s/step |\n|---|---|---|---|---|")
        for r in result["train"]:
            print(f"| {r['layout']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x | {r['samples_per_step']:.1f} | {r['step_s']:.3f} |")
        for r in result["train"]:
            r.pop("data")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
