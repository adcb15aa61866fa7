"""Real learning of a classification head: recipe sentiment_qlora trains a three-class head on
SmolLM2-135M-Instruct (ZeRO-3 QLoRA, 2 CPU ranks, bitsandbytes' repacking path forced on any CPU) and
its held-out accuracy goes from chance to near perfect. Every figure the harness logged is then
reproduced with plain libraries only:
- plain transformers + bitsandbytes (the freshly quantised base with the head's documented starting weight,
  rebuilt with plain torch): the validation loss and confusion matrix of the untrained model (step 0);
- plain transformers + bitsandbytes + peft (the saved adapter on a freshly quantised base, each review
  alone and unpadded): the same validation loss (mean cross-entropy) and the same confusion matrix;
- plain `pipeline("text-classification")` on the `merged` export of the run's step-5 ZeRO-3 checkpoint
  (each rank's shards, consolidated by tools/export.py): the validation loss and confusion matrix the
  harness logged at step 5.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from tests import reference as ref
from tests.helpers import REPO, child_env, launch, read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.real_model]
RECIPE = str(REPO / "harness" / "recipes" / "sentiment_qlora.yaml")
VAL = REPO / "harness" / "assets" / "sentiment_val.jsonl"
LABELS = ["negative", "neutral", "positive"]
# MID: the step of the mid-run eval and checkpoint. Shortened from the recipe's 30 steps and 150 reviews for the CI time budget.
STEPS, MID, N_VAL = 10, 5, 48
# Measured (fp32, 2 CPU ranks): accuracy 0.375 before (the untrained head), 0.917 after 10 steps (macro-F1 0.284 -> 0.921); the recipe's
# 30 steps: 34.0% -> 100.0% on all 150 (macro-F1 0.272 -> 1.000). Chance is 1/3 on the balanced classes.
MAX_BEFORE = 0.5
# name: (overrides, MIN_AFTER). prompt_tuning: the head and 8 virtual tokens over the frozen 16-bit base (ZeRO-3, 2 ranks);
# measured 31.2% -> 81.2% (macro-F1 0.278 -> 0.803) on the 48 after 10 steps. CI runs qlora; HARNESS_REAL_CLASSIFICATION=all
# runs both (the soft prompt's own learning and plain-peft round trip on the real model: tests/real_model/test_prompt_tuning.py,
# and classification with a soft prompt under ZeRO-3 against one process and plain peft: tests/distributed/test_zero3.py).
ROWS = {"qlora": (["train.lr=2e-3"], 0.85),
        "prompt_tuning": (["method=prompt_tuning", "prompt_tuning.num_virtual_tokens=8", "train.lr=1e-2"], 0.75)}
RUN = list(ROWS) if os.environ.get("HARNESS_REAL_CLASSIFICATION") == "all" else ["qlora"]


@pytest.mark.parametrize("row", RUN)
def test_sentiment_head_learns_and_plain_libraries_agree(real_model, tmp_path, row):
    extra, min_after = ROWS[row]
    run = tmp_path / "run"
    marker = tmp_path / "repack_forced_in"
    env = child_env(PYTHONPATH=f"{REPO / 'tests' / 'bnb_repack'}:{REPO}", BNB_REPACK_MARKER=str(marker))
    over = [f"model.path={real_model}", f"output_dir={run}", "log.progress_bar=false", f"train.max_steps={STEPS}",
            f"eval.every_steps={MID}", f"eval.max_samples={N_VAL}", "eval.batch_size=24", "train.warmup_steps=2",
            f"checkpoint.every_steps={MID}", *extra]
    proc = launch(["--config", RECIPE, *over], nproc=2, timeout_s=900, env=env)
    quantized = row == "qlora"
    if quantized:
        assert len(set(marker.read_text().split())) >= 2, "the forced repacking path did not load in both ranks"
    evals = {r["step"]: r for r in read_metrics(run) if "val_loss" in r}
    before, after = evals[0], evals[STEPS]
    print(f"\nsentiment head: accuracy {before['val_accuracy']:.3f} -> {after['val_accuracy']:.3f}, macro-F1 {before['val_f1']:.3f} -> "
          f"{after['val_f1']:.3f}, val_loss {before['val_loss']:.4f} -> {after['val_loss']:.4f} on {N_VAL} held-out reviews")
    assert before["val_accuracy"] <= MAX_BEFORE and after["val_accuracy"] >= min_after
    assert "held-out accuracy" in proc.stdout and (run / "classification_report.md").is_file()

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    rows = ref.read_jsonl(VAL, N_VAL)
    truth = [LABELS.index(r["label"]) for r in rows]
    tok = AutoTokenizer.from_pretrained(str(real_model))
    head = dict(num_labels=3, pad_token_id=tok.pad_token_id)
    base = ref.load_base(real_model, quantized=quantized, attn="sdpa", auto=AutoModelForSequenceClassification, **head)

    def loss_and_confusion(model) -> tuple[float, list]:
        with torch.no_grad():  # each review alone, unpadded: (1, C) logits each
            logits = torch.cat([model(input_ids=tok(r["text"], return_tensors="pt").input_ids).logits.float() for r in rows])
        predicted = logits.argmax(-1).tolist()
        return (float(F.cross_entropy(logits, torch.tensor(truth))),
                [[sum(1 for t, p in zip(truth, predicted) if (t, p) == (i, j)) for j in range(3)] for i in range(3)])

    if quantized:
        # Before: LoRA's B is 0, so the untrained model is the quantised base with the head's documented start
        # (README, task: classification): normal(0, initializer_range) drawn from a torch generator seeded
        # train.seed + 7919 (the recipe's seed: 0), rebuilt here with plain torch.
        g = torch.Generator().manual_seed(0 + 7919)
        with torch.no_grad():
            base.score.weight.copy_(torch.randn(base.score.weight.shape, generator=g) * base.config.initializer_range)
        loss0, confusion0 = loss_and_confusion(base.eval())
        print(f"plain transformers + bitsandbytes, untrained head: val_loss {loss0:.6f} (harness {before['val_loss']:.6f}), "
              f"confusion {confusion0} (harness {before['confusion']})")
        assert abs(loss0 - before["val_loss"]) <= 1e-4 * max(1.0, loss0) + 1e-6
        assert confusion0 == before["confusion"]
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    loss, confusion = loss_and_confusion(model)
    print(f"plain peft: val_loss {loss:.6f} (harness {after['val_loss']:.6f}), confusion {confusion} (harness {after['confusion']})")
    assert abs(loss - after["val_loss"]) <= 1e-4 * max(1.0, loss) + 1e-6
    assert confusion == after["confusion"]
    if not quantized:  # a soft prompt is an input, not weights: no merged export (refused)
        return

    # The merged export of the step-5 checkpoint (2 ranks' ZeRO-3 shards of the adapter and head, and the
    # 4-bit base dequantised), read by plain pipeline(): the loss and predictions the run logged at step 5.
    mid = evals[MID]
    # The export quantises the base again and verifies by logits (eval-mode forwards): the repacking path forced there too
    export_marker = tmp_path / "repack_forced_in_export"
    export = launch([str(run), "--format", "merged", "--from", f"step_{MID}", "--out", str(tmp_path / "merged")],
                    script=str(REPO / "tools" / "export.py"), timeout_s=600,
                    env=child_env(PYTHONPATH=f"{REPO / 'tests' / 'bnb_repack'}:{REPO}", BNB_REPACK_MARKER=str(export_marker)))
    assert export_marker.read_text().split(), "the forced repacking path did not load in the export"
    assert f"exporting checkpoint {run / 'checkpoints' / f'step_{MID:08d}'} (step {MID})" in export.stdout, export.stdout[-2000:]
    classify = pipeline("text-classification", model=str(tmp_path / "merged"), tokenizer=tok, device="cpu", top_k=None)
    scores = [{o["label"]: o["score"] for o in out} for out in classify([r["text"] for r in rows], batch_size=1)]  # softmax per review
    pipe_loss = sum(-math.log(s[LABELS[t]]) for s, t in zip(scores, truth)) / N_VAL
    pipe_predicted = [LABELS.index(max(s, key=s.get)) for s in scores]
    pipe_confusion = [[sum(1 for t, p in zip(truth, pipe_predicted) if (t, p) == (i, j)) for j in range(3)] for i in range(3)]
    print(f"pipeline on the merged step-{MID} checkpoint: val_loss {pipe_loss:.6f} (harness {mid['val_loss']:.6f}), "
          f"confusion {pipe_confusion} (harness {mid['confusion']})")
    assert abs(pipe_loss - mid["val_loss"]) <= 1e-4 * max(1.0, pipe_loss) + 1e-6
    assert pipe_confusion == mid["confusion"]
