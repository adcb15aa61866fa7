"""Prompt tuning on the real SmolLM2-135M-Instruct: a soft prompt of 16 virtual tokens (started from a
text's embeddings) learned for the bundled instruction tasks, every model weight frozen. One process
(ZeRO-0, fp32; ZeRO-3 parity and the prompt's gradient against a plain-torch reference are in
tests/distributed/test_zero3.py and tests/real_model/test_reference.py). Checked with plain libraries:
- the untouched model (plain transformers, no prompt) has a clearly higher validation loss than the
  saved prompt put before the tokens in plain torch, whose loss equals the harness's own;
- plain peft `generate()` with the saved prompt gives the harness's logged greedy answers.
"""

from __future__ import annotations

import json

import pytest

from tests import reference as ref
from tests.helpers import REPO, SOLO_THREADS, child_env, launch, read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.real_model]
RECIPE = str(REPO / "harness" / "recipes" / "demo_qlora.yaml")
VAL = REPO / "harness" / "assets" / "tiny_instruct_val.jsonl"
N_VAL, N_ANSWERS, STEPS = 32, 8, 10


def test_soft_prompt_beats_the_untouched_model(real_model, tmp_path):
    run = tmp_path / "run"
    over = [f"model.path={real_model}", f"output_dir={run}", "log.progress_bar=false", "method=prompt_tuning", "data.packing=false",
            "prompt_tuning.num_virtual_tokens=16", "prompt_tuning.init=text", "prompt_tuning.init_text=Answer with the result only.",
            "deepspeed.config=ds_configs/zero0.json", "train.micro_batch_size=8", "train.global_batch_size=8", f"train.max_steps={STEPS}",
            "train.lr=3e-2", f"eval.every_steps={STEPS}", f"eval.max_samples={N_VAL}", "eval.batch_size=16", f"eval.generate_samples={N_ANSWERS}",
            f"eval.generate_batch_size={N_ANSWERS}", "eval.max_new_tokens=8"]
    launch(["--config", RECIPE, *over], nproc=1, timeout_s=900, env=child_env(OMP_NUM_THREADS=SOLO_THREADS))  # one process: both cores if alone
    records = read_metrics(run)
    vals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    rates = {r["step"]: r["val_exact_match"] for r in records if "val_exact_match" in r}

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(real_model))
    rows = ref.read_jsonl(VAL, N_VAL)
    exs = ref.examples(rows, tok)
    untouched = ref.load_base(real_model, quantized=False, attn="sdpa")
    untouched_loss = ref.mean_loss(untouched, exs)
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (16, 576)  # the prompt alone: no base weight
    tuned_loss = ref.mean_loss(ref.SoftPrompt(untouched, saved["prompt_embeddings"].float()), exs)  # the prompt, written out in torch
    print(f"\nsoft prompt: val_loss untouched model {untouched_loss:.4f}; harness {vals[0]:.4f} (text init) -> {vals[STEPS]:.4f}; "
          f"plain torch with the saved prompt {tuned_loss:.4f}; exact match {rates[0]:.3f} -> {rates[STEPS]:.3f} on {N_ANSWERS}")
    assert abs(tuned_loss - vals[STEPS]) <= 1e-4 * vals[STEPS]
    assert tuned_loss < 0.7 * untouched_loss  # clearly better than the model left alone

    # plain peft loads the adapter and generates: the harness's logged greedy answers, token for token
    tuned = PeftModel.from_pretrained(ref.load_base(real_model, quantized=False, attn="sdpa"), str(run / "adapter")).eval()
    logged = [json.loads(line) for line in (run / "answers" / f"step_{STEPS:08d}.jsonl").read_text().splitlines()]
    plain = ref.greedy_answers(tuned, tok, rows[:N_ANSWERS], max_new_tokens=8, batch=N_ANSWERS)
    assert plain == [a["answer"] for a in logged]
