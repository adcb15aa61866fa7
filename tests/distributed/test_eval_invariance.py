"""An eval pass changes nothing: ZeRO-3 QLoRA on 2 ranks trains the same losses, bit for bit, with an
eval after every step (loss and greedy answers, the whole model gathered for generation) as with eval
off, and saves checkpoints after those evals.

The ranks run with tests/bnb_repack on PYTHONPATH, which makes bitsandbytes take its AVX512-BF16 CPU
repacking path on any CPU (see that file), so this fails without harness/model.py's
keep_standard_4bit_layout on every machine, not only on CPUs with the feature.
"""

from __future__ import annotations

import pytest

from tests.helpers import REPO, child_env, launch, read_metrics, train_losses

pytestmark = pytest.mark.distributed
RECIPE = str(REPO / "harness" / "recipes" / "tiny_qlora.yaml")
FORCE_REPACK = REPO / "tests" / "bnb_repack"


@pytest.mark.parametrize("loader", ["streamed", "hf"])
def test_eval_every_step_leaves_training_bit_exact(tiny_llama, tmp_path, loader):
    env = child_env(PYTHONPATH=f"{FORCE_REPACK}:{REPO}")
    common = ["--config", RECIPE, f"model.path={tiny_llama}", f"model.loader={loader}", "train.max_steps=4", "train.warmup_steps=1",
              "train.micro_batch_size=4", "train.global_batch_size=8", "train.gradient_checkpointing=none", "eval.max_samples=8",
              "log.every_steps=1", "log.progress_bar=false", "log.memory_every_steps=0"]
    with_eval, without = tmp_path / "eval", tmp_path / "no_eval"
    launch([*common, f"output_dir={with_eval}", "eval.every_steps=1", "checkpoint.every_steps=2", "eval.generate_samples=6",
            "eval.max_new_tokens=4", "eval.generate_batch_size=2"], nproc=2, env=env)
    launch([*common, f"output_dir={without}", "eval.every_steps=0"], nproc=2, env=env)

    assert train_losses(with_eval) == train_losses(without)  # bit for bit (fp32, same data order)
    assert len(train_losses(without)) == 4
    vals = [r["val_loss"] for r in read_metrics(with_eval) if "val_loss" in r]
    assert len(vals) == 5 and vals[-1] < vals[0]  # step 0 and after each step; it learns
    assert len([r for r in read_metrics(with_eval) if "val_exact_match" in r]) == 5
    # The checkpoint after the step-2 eval was saved whole, and the final adapter after the last eval.
    assert (with_eval / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    assert (with_eval / "adapter" / "adapter_model.safetensors").is_file()
