"""An eval pass changes nothing: ZeRO-3 QLoRA on 2 ranks trains the same losses, bit for bit, with an
eval after every step (the loss and greedy answers) as with eval off, and saves checkpoints after those
evals. One case generates with the whole model gathered, the other layer by layer (synced ranks); both
must give the same answers.

The ranks run with tests/bnb_repack on PYTHONPATH, which makes bitsandbytes take its AVX512-BF16 CPU
repacking path on any CPU (see that file; it leaves a marker, checked here, in every process it ran
in), so this fails without harness/model.py's keep_standard_4bit_layout on every machine, not only on
CPUs with the feature.
"""

from __future__ import annotations

import pytest

from tests.helpers import REPO, child_env, launch, read_metrics, train_losses

pytestmark = pytest.mark.distributed
RECIPE = str(REPO / "harness" / "recipes" / "tiny_qlora.yaml")
FORCE_REPACK = REPO / "tests" / "bnb_repack"
ANSWERS: dict[str, list[str]] = {}  # case -> answer files' text, to compare the two generation paths
NO_EVAL: dict[str, list[float]] = {}  # loader -> the losses of the run without eval (the same for both cases)

CASES = {  # name: (loader, eval.generate_gather); the hf loader's guard is in tests/test_bnb_layout.py
    "gathered": ("streamed", True),
    "layer-by-layer": ("streamed", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_eval_every_step_leaves_training_bit_exact(tiny_llama, tmp_path, case):
    loader, gather = CASES[case]
    marker = tmp_path / "repack_forced_in"
    env = child_env(PYTHONPATH=f"{FORCE_REPACK}:{REPO}", BNB_REPACK_MARKER=str(marker))
    common = ["--config", RECIPE, f"model.path={tiny_llama}", f"model.loader={loader}", "train.max_steps=3", "train.warmup_steps=1",
              "train.micro_batch_size=4", "train.global_batch_size=8", "train.gradient_checkpointing=none", "eval.max_samples=8",
              "log.every_steps=1", "log.progress_bar=false", "log.memory_every_steps=0"]
    with_eval, without = tmp_path / "eval", tmp_path / "no_eval"
    launch([*common, f"output_dir={with_eval}", "eval.every_steps=1", "checkpoint.every_steps=2", "eval.generate_samples=6",
            "eval.max_new_tokens=4", "eval.generate_batch_size=2", f"eval.generate_gather={str(gather).lower()}"], nproc=2, env=env)
    assert len(set(marker.read_text().split())) >= 2, "the forced repacking path did not load in both ranks"
    if loader not in NO_EVAL:
        launch([*common, f"output_dir={without}", "eval.every_steps=0"], nproc=2, env=env)
        NO_EVAL[loader] = train_losses(without)

    assert train_losses(with_eval) == NO_EVAL[loader]  # bit for bit (fp32, same data order)
    assert len(NO_EVAL[loader]) == 3
    vals = [r["val_loss"] for r in read_metrics(with_eval) if "val_loss" in r]
    assert len(vals) == 4 and vals[-1] < vals[0]  # step 0 and after each step; it learns
    assert len([r for r in read_metrics(with_eval) if "val_exact_match" in r]) == 4
    # The checkpoint after the step-2 eval was saved whole, and the final adapter after the last eval.
    assert (with_eval / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    assert (with_eval / "adapter" / "adapter_model.safetensors").is_file()

    # Training is bit-exact and evals change nothing, so the two generation paths see the same weights
    # at every eval and must give the same answers.
    ANSWERS[case] = [p.read_text() for p in sorted((with_eval / "answers").glob("step_*.jsonl"))]
    assert len(ANSWERS[case]) == 4
    if len(ANSWERS) == len(CASES):
        first, second = ANSWERS.values()
        assert first == second
