"""task=classification under ZeRO-3 on 2 gloo ranks, against one plain process (tiny Llama-shaped model).

Rows: lora with the hf loader (from_pretrained under deepspeed.zero.Init, the new head initialised
while partitioned) and qlora with the streamed loader (the head is the last unit partitioned). The
real-model tier (tests/real_model/test_classification.py) checks the numbers against plain
transformers / peft / pipeline.
"""

from __future__ import annotations

import pytest

from tests.distributed.test_zero3 import common, rel_err
from tests.helpers import REPO, launch, read_metrics, train_losses

pytestmark = pytest.mark.distributed

ASSETS = REPO / "harness" / "assets"
CLASSIFY = {"task": "classification", "data.labels": "[negative,neutral,positive]", "data.sources.0.format": "text",
            "data.sources.0.path": ASSETS / "sentiment_train.jsonl", "data.val_path": ASSETS / "sentiment_val.jsonl",
            "data.seq_len": 64, "eval.every_steps": 5, "eval.max_samples": 32, "eval.batch_size": 8, "train.lr": 3e-3}


def last_eval(run_dir) -> dict:
    return [r for r in read_metrics(run_dir) if "val_loss" in r][-1]


@pytest.mark.parametrize("method,loader,tol", [("lora", "hf", 1e-4), ("qlora", "streamed", 1e-2)])
def test_classification_zero3_two_ranks_match_one_process(tiny_llama, tmp_path, method, loader, tol):
    extra = {**CLASSIFY, "method": method, "model.loader": loader}
    launch(common(tiny_llama, tmp_path / "single", **extra, **{"deepspeed.config": "ds_configs/zero0.json"}), nproc=1)
    launch(common(tiny_llama, tmp_path / "zero3", **extra, **{"deepspeed.config": "ds_configs/zero3.json"}), nproc=2)
    single, zero3 = train_losses(tmp_path / "single"), train_losses(tmp_path / "zero3")
    assert len(single) == len(zero3) == 5
    assert single[-1] < single[0], f"loss did not move: {single}"
    err = rel_err(zero3, single)
    v1, v2 = last_eval(tmp_path / "single"), last_eval(tmp_path / "zero3")
    val_err = abs(v2["val_loss"] - v1["val_loss"]) / v1["val_loss"]
    print(f"{method}/{loader}: single {single}\n  zero3 {zero3}\n  max relative loss error {err:.2e}; val_loss {v1['val_loss']:.6f} "
          f"vs {v2['val_loss']:.6f} ({val_err:.2e}); accuracy {v1['val_accuracy']:.3f} vs {v2['val_accuracy']:.3f}")
    assert err <= tol and val_err <= tol
    assert sum(map(sum, v2["confusion"])) == 32  # every validation sample scored once, whatever the world size
    if method == "lora":  # fp32 end to end: the same predictions
        assert v1["confusion"] == v2["confusion"]


def test_early_stopping_watches_eval_metric(tiny_llama, tmp_path):
    """eval.metric=accuracy: with a learning rate too small to change a prediction, the second eval
    brings no accuracy gain and patience 1 stops the run there (one process)."""
    over = {**CLASSIFY, "method": "lora", "train.max_steps": 20, "train.lr": 1e-9, "eval.every_steps": 1, "eval.metric": "accuracy",
            "eval.early_stopping_patience": 1, "deepspeed.config": "ds_configs/zero0.json"}
    proc = launch(common(tiny_llama, tmp_path / "run", **over), nproc=1)
    assert "early stopping at step 2: no val_accuracy gain in 1 evals" in proc.stdout, proc.stdout[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "val_accuracy" in r] == [0, 1, 2]
