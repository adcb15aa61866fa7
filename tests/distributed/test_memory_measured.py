"""Predicted peak memory per rank against the peak measured in real training runs (CPU, gloo).

Each configuration runs the real entry-point code path under tests/distributed/memory_probe.py, which
counts live tensor storages over the whole run (DeepSpeed's flat buffers included) without touching
harness/memory. The budget for the same recipe, world size and device (CPU: no CUDA context, allocator
or communicator terms) must be within TOLERANCE of the measured peak on every rank and must never say
"fits" for a device smaller than the measured peak.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/distributed/test_memory_measured.py -q
    .venv/bin/python tests/distributed/test_memory_measured.py   # prints the table for every configuration
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


from tests.helpers import REPO, child_env, launch, read_metrics

PROBE = str(REPO / "tests" / "distributed" / "memory_probe.py")
TOLERANCE = 0.05  # acceptance: predicted peak within 5% of measured (goal 3%)

# Tiny shapes where activations and states are both meaningful but a run stays well under 30 s.
TINY = dict(layers=4, hidden=256, heads=4, kv_heads=2, intermediate=688, vocab_size=512)


@dataclass(frozen=True)
class Case:
    name: str
    like: str  # shipped architecture the tiny model is shaped like
    method: str
    zero: int
    nproc: int
    seq_len: int
    checkpointing: str
    micro_batch: int = 4
    task: str = "causal_lm"  # classification: the 3-class sentiment head on the bundled reviews
    packing: bool = True  # False: one sample per row, padded to the batch's longest (here: truncated to seq_len)
    lora_targets: str = "all-linear"  # lora.target_modules
    micro_batch_real: int = 0  # >0: the real SmolLM2-135M-Instruct fixture (vocabulary 49,152) instead of a tiny model
    untied_vocab: int = 0  # >0: a tiny model with this many embedding rows and an untied LM head of its own
    kernels: str = "[]"  # the recipe's kernels: list ([linear_cross_entropy]: the fused, chunked loss head)
    row_reviews: int = 0  # >0 (packing false): every row but SHORT_ROWS holds the same this-many reviews, shorter than seq_len
    accum: int = 1  # gradient accumulation: micro-batches per rank per optimizer step
    ds: str = ""  # a ds_configs/ file other than zero{zero}.json (zero3_offload_optimizer: Adam on the host)


# 21 configurations covering: full / LoRA / QLoRA / prompt tuning, ZeRO-0 on one process, ZeRO-3 on 1 and 2
# ranks, checkpointing none / full, seq_len 256 / 512, Llama and Qwen2 shapes, a classification head, the real
# SmolLM2-135M-Instruct. (The whole file runs in ~5 min of 2 idle cores; llama-full-z0-s256-full also passed, +2.0%, and was dropped to
# stay in budget.)
CASES = [
    Case("llama-full-z0-s512-none", "llama-3.1-8b", "full", 0, 1, 512, "none"),
    Case("llama-qlora-z0-s512-none", "llama-3.1-8b", "qlora", 0, 1, 512, "none"),
    Case("llama-full-z3-1r-s512-full", "llama-3.1-8b", "full", 3, 1, 512, "full"),
    Case("llama-full-z3-2r-s256-none", "llama-3.1-8b", "full", 3, 2, 256, "none"),
    # (issue 19: these two at a 32,000-token vocabulary, untied: full checkpointing keeps the embedding gathered, below)
    Case("llama-untied32k-qlora-z3-2r-s512-full", "llama-3.1-8b", "qlora", 3, 2, 512, "full", untied_vocab=32000),
    Case("qwen-untied32k-full-z3-2r-s512-full", "qwen2.5-7b", "full", 3, 2, 512, "full", untied_vocab=32000),
    Case("qwen-qlora-z3-1r-s256-none", "qwen2.5-7b", "qlora", 3, 1, 256, "none"),
    Case("qwen-lora-z0-s512-full", "qwen2.5-7b", "lora", 0, 1, 512, "full"),
    # issue 13: a classification head (no LM head: 3 x hidden scores; the head trains beside the adapters) and
    # a soft prompt (20 virtual tokens before every row of a frozen 16-bit base, whose every linear then saves
    # its input under ZeRO-3: DeepSpeed's memory_efficient_linear). One sample per row (both refuse packing),
    # each longer than seq_len and cut to it (long_reviews), so a padded batch is seq_len long, as the budget
    # assumes for any batch.
    Case("llama-cls-qlora-z3-2r-s256-none", "llama-3.1-8b", "qlora", 3, 2, 256, "none", task="classification", packing=False),
    Case("llama-pt-z3-2r-s256-none", "llama-3.1-8b", "prompt_tuning", 3, 2, 256, "none", packing=False),
    # LoRA on two targets under ZeRO-3: the frozen k/o and MLP linears save their inputs too (the budget without
    # that: analytic -13.4%, trace -11.4%; with it +1.7%).
    Case("llama-lora2-z3-2r-s256-none", "llama-3.1-8b", "lora", 3, 2, 256, "none", lora_targets="[q_proj, v_proj]"),
    # The same two on the real model (30 layers, its 49,152-token head: the loss's logits are a large part of the peak)
    Case("smollm2-pt-z3-2r-s256-none", "real", "prompt_tuning", 3, 2, 256, "none", packing=False, micro_batch_real=2),
    Case("smollm2-lora2-z3-2r-s256-none", "real", "lora", 3, 2, 256, "none", lora_targets="[q_proj, v_proj]", packing=False, micro_batch_real=2),
    # The sentiment head on the real model's 4-bit base (sentiment_qlora's set-up). A classifier has no V x hidden head,
    # so no 49,152 x 576 fp32 matrix is gathered at its peak; the budget that counted the embedding there: +11.6% on both ranks
    # (the tiny model's 512-token vocabulary hid it: llama-cls-qlora-z3-2r-s256-none passed either way).
    Case("smollm2-cls-qlora-z3-2r-s256-none", "real", "qlora", 3, 2, 256, "none", task="classification", packing=False, micro_batch_real=2),
    # An untied 32,000-row embedding and LM head (Llama's layout, at a vocabulary where they matter): ZeRO-3 releases the
    # input embedding after the lookup and gathers the head at the loss. The budget that kept the embedding gathered
    # too: +5.98% on both ranks.
    Case("llama-untied32k-lora-z3-2r-s256-none", "llama-3.1-8b", "lora", 3, 2, 256, "none", untied_vocab=32000),
]
# issue 19: at a vocabulary where the loss head matters (32,000, untied): the fused, chunked loss kernel (the budget
# that ignored it: +214%), and one sample per row, each shorter than seq_len (a padded micro-batch is as long as its
# longest sample: the budget that charged seq_len, +126% analytic / +129% trace).
CASES += [
    Case("llama-untied32k-fused-lora-z3-2r-s256-none", "llama-3.1-8b", "lora", 3, 2, 256, "none", untied_vocab=32000,
         kernels="[linear_cross_entropy]"),
    Case("llama-untied32k-short-lora-z3-2r-s512-none", "llama-3.1-8b", "lora", 3, 2, 512, "none", untied_vocab=32000,
         packing=False, row_reviews=6),
    # Checkpointing every 2nd layer, 2 micro-batches per step: transformers' checkpointing makes the embedding's output
    # require grad, so ZeRO-3 keeps the untied embedding gathered to its backward use (without it: -6.2%).
    Case("llama-untied32k-everyk-accum-qlora-z3-2r-s256", "llama-3.1-8b", "qlora", 3, 2, 256, "every_k", untied_vocab=32000, accum=2),
    # Full fine-tuning with Adam offloaded (on CPU the host is this memory): the host's fp32 gradient buffer is resident
    # from the first step, and the trained embedding stays gathered to its backward use (without both: -23.5%).
    Case("llama-untied32k-offload-full-z3-2r-s256-none", "llama-3.1-8b", "full", 3, 2, 256, "none", untied_vocab=32000,
         ds="zero3_offload_optimizer"),
]
# The same terms on the real SmolLM2-135M-Instruct (its tied 49,152 x 576 head): the fused loss over LoRA, rows shorter
# than seq_len (16 reviews, one sample per row, seq_len 512), full checkpointing; and the sentiment head under full
# checkpointing, where the embedding (no LM head to share it) stays gathered to its backward use. Measured: -0.9% and
# -1.9%; the budget without the fused term +23.8%, with rows charged at seq_len +7.9% (206-token rows), without the
# gathered embedding about -34% (49,152 x 576 x 4 B = 108 MiB).
CASES += [
    Case("smollm2-fused-short-lora-z3-2r-s512-full", "real", "lora", 3, 2, 512, "full", packing=False, micro_batch_real=2,
         kernels="[linear_cross_entropy]", row_reviews=16),
    Case("smollm2-cls-qlora-z3-2r-s256-full", "real", "qlora", 3, 2, 256, "full", task="classification", packing=False,
         micro_batch_real=2),
]
OPEN: list = []  # known misses, run by name only (python tests/distributed/test_memory_measured.py ROOT NAME); none now
ALPACA = f"[{{path: {REPO}/harness/assets/tiny_instruct_val.jsonl, format: alpaca}}]"  # 200 samples: enough packed rows


# Every fourth row, and row 26: with train.seed 0 the data order then gives every rank's second-step micro-batch (2 or 4
# rows) both a cut row and a short one. Picked by hand for that order; `measure` asserts it (a change to the shuffle
# fails there by name, not as a budget error: with row 26 cut, the real soft prompt's rank 0 read +4.2%, not +0.3%).
SHORT_ROWS = frozenset([k for k in range(64) if k % 4 == 3] + [26])


def long_reviews(root: Path, per_row: int = 16, same: bool = False) -> Path:
    """64 rows {text, label} of bundled reviews joined (the label of the first): `per_row` of them (16: ~550 tokens of
    the tiny tokenizer; 40: over 256 of SmolLM2's; longer than the case's seq_len: cut to it) and, in rows SHORT_ROWS,
    3 (~100 tokens). A micro-batch with one of each is seq_len long and, as in most real batches, has padding:
    transformers passes sdpa a mask, not is_causal, and repeats the grouped K/V heads (SmolLM2, 9 query / 3 KV heads:
    60 MiB more at 2 x 256 tokens than an unpadded batch). The budget assumes that batch; `measure` checks that every
    rank's last micro-batch (the peak: Adam's m and v exist from the first step on) was one.

    same: every row but SHORT_ROWS is the same `per_row` reviews (row 0's), so each is exactly as long, here shorter
    than seq_len: a micro-batch is then padded to that length, which the run's data path reports."""
    out = root / f"long_reviews_{per_row}{'_same' if same else ''}.jsonl"
    if not out.exists():
        rows = [json.loads(line) for line in (REPO / "harness" / "assets" / "sentiment_train.jsonl").read_text().splitlines()]
        joined = []
        for k in range(64):
            first = 0 if same and k not in SHORT_ROWS else k
            take = [rows[(first * per_row + j) % len(rows)] for j in range(3 if k in SHORT_ROWS else per_row)]
            joined.append({"text": " ".join(r["text"] for r in take), "label": take[0]["label"]})
        out.write_text("".join(json.dumps(r) + "\n" for r in joined))
    return out


def make_model(like: str, root: Path, untied_vocab: int = 0) -> Path:
    if like == "real":
        from tools.real_model import ensure

        return ensure()
    out = root / (f"tiny-{like}" + (f"-untied{untied_vocab}" if untied_vocab else ""))
    if not (out / "config.json").exists():
        from tools.make_tiny_model import make_tiny_model

        extra = dict(tie_embeddings=False, model_vocab_size=untied_vocab) if untied_vocab else {}
        make_tiny_model(like, out, **TINY, **extra)
    return out


def write_recipe(case: Case, model_dir: Path, root: Path) -> Path:
    recipe = root / f"{case.name}.yaml"
    micro = case.micro_batch_real or case.micro_batch
    reviews = (long_reviews(root, case.row_reviews, same=True) if case.row_reviews
               else long_reviews(root, 40 if case.micro_batch_real else 16))
    recipe.write_text(
        f"""model:
  path: {model_dir}
method: {case.method}
task: {case.task}
lora: {{r: 8, alpha: 16, dropout: 0.0, target_modules: {case.lora_targets}}}
prompt_tuning: {{num_virtual_tokens: 20}}
data:
  sources: {ALPACA if case.packing else f"[{{path: {reviews}, format: text}}]"}
  labels: {"[negative, neutral, positive]" if case.task == "classification" else "[]"}
  packing: {str(case.packing).lower()}
  cache_dir: {root}/data_cache
  seq_len: {case.seq_len}
kernels: {case.kernels}
train:
  micro_batch_size: {micro}
  global_batch_size: {micro * case.nproc * case.accum}
  max_steps: 2
  warmup_steps: 1
  gradient_checkpointing: {case.checkpointing}
eval: {{every_steps: 0}}
log: {{progress_bar: false}}
deepspeed: {{config: {REPO}/ds_configs/{case.ds or f'zero{case.zero}'}.json}}
output_dir: {root}/out-{case.name}
"""
    )
    return recipe


def measure(case: Case, root: Path) -> dict:
    model_dir = make_model(case.like, root, case.untied_vocab)
    recipe = write_recipe(case, model_dir, root)
    out = root / f"{case.name}.json"
    # bitsandbytes' AVX512-BF16 repacking path forced on any CPU (tests/bnb_repack), so a 4-bit case measures the
    # same code on every machine (the harness keeps the standard layout: harness/model.py)
    marker = root / f"{case.name}.repack_forced_in"
    env = child_env(PYTHONPATH=f"{REPO / 'tests' / 'bnb_repack'}:{REPO}", BNB_REPACK_MARKER=str(marker))
    # The fused loss on CPU takes its PyTorch path on any machine: not the Triton interpreter (TRITON_INTERPRET=1)
    env.pop("TRITON_INTERPRET", None)
    launch([str(out), "--config", str(recipe)], nproc=case.nproc, timeout_s=300, script=PROBE, env=env)
    if case.method == "qlora":
        assert len(set(marker.read_text().split())) >= case.nproc, "the forced repacking path did not load in every rank"
    ranks = json.loads(out.read_text())["ranks"]
    # The run's own data path reports the longest padded row of its steps (one sample per row; None when packed):
    # the budget is given it, as the run's memory report is.
    data_record = next(r["data"] for r in read_metrics(root / f"out-{case.name}") if "data" in r)
    row_tokens = data_record["longest_padded_row_tokens"]
    if not case.packing:  # the budget's batch: that long (seq_len for cut rows), with padding (see long_reviews), at the peak step
        assert row_tokens == case.seq_len or (case.row_reviews and row_tokens < case.seq_len), row_tokens
        for r in ranks:  # the probe saw it: independent of the harness's sampler arithmetic
            assert r["batches"][-1] == [row_tokens, True], (f"{case.name} rank {r['rank']}: the last micro-batch [length, padded] "
                                                            f"is {r['batches'][-1]}, not [{row_tokens}, True]; re-pick SHORT_ROWS")
    return {"recipe": str(recipe), "ranks": ranks, "row_tokens": row_tokens}


def predict(case: Case, recipe_path: str, data_bytes: int, engine: str, device_memory_bytes: int | None = None,
            row_tokens: int | None = None):
    from harness.config import load_recipe
    from harness.memory import budget_for_recipe

    recipe = load_recipe(recipe_path)
    return budget_for_recipe(recipe, world_size=case.nproc, device_memory_bytes=device_memory_bytes, device="cpu",
                             engine=engine, host_data_bytes=data_bytes, row_tokens=row_tokens)


def compare(case: Case, root: Path, engines=("analytic", "trace")) -> list[dict]:
    measured = measure(case, root)
    rows = []
    for r in measured["ranks"]:
        for engine in engines:
            budget = predict(case, measured["recipe"], r["data_bytes"], engine, row_tokens=measured["row_tokens"])
            # A device one byte smaller than the measured peak cannot hold the run: the verdict must say so.
            verdict = predict(case, measured["recipe"], r["data_bytes"], engine, device_memory_bytes=r["peak_bytes"] - 1,
                              row_tokens=measured["row_tokens"])
            rows.append({"case": case.name, "rank": r["rank"], "engine": engine, "predicted_bytes": budget.peak_bytes,
                         "measured_bytes": r["peak_bytes"], "error": (budget.peak_bytes - r["peak_bytes"]) / r["peak_bytes"],
                         "false_fits": bool(verdict.fits), "predicted_phase": budget.peak_phase,
                         "measured_phases": r["phase_peak_bytes"], "predicted_phases": budget.phase_bytes})
    return rows


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_predicted_peak_matches_measured(case: Case, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "memory_measured"
    root.mkdir(exist_ok=True)
    for row in compare(case, root):
        assert abs(row["error"]) <= TOLERANCE, row
        assert not row["false_fits"], row


def main() -> int:
    import tempfile

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="memory_measured_"))
    root.mkdir(parents=True, exist_ok=True)
    names = set(sys.argv[2:])
    all_rows = []
    for case in CASES + [c for c in OPEN if c.name in names]:
        if names and case.name not in names:
            continue
        rows = compare(case, root)
        all_rows += rows
        for row in rows:
            print(f"{row['case']:28s} rank {row['rank']} {row['engine']:8s} predicted {row['predicted_bytes'] / 2**20:9.2f} MiB  measured "
                  f"{row['measured_bytes'] / 2**20:9.2f} MiB  error {100 * row['error']:+6.2f}%  false fits {row['false_fits']}  "
                  f"({row['predicted_phase']})", flush=True)
    (root / "results.json").write_text(json.dumps(all_rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
