"""tools/export.py on real 2-rank ZeRO-3 runs: peft adapter, LoRA merged into a dequantised 4-bit base,
consolidated full model; each export's own logit checks, and checkpoint sizes."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from harness import checkpoint, export
from tests.helpers import REPO, child_env, launch, run_bounded
from tests.distributed.test_zero3 import common

pytestmark = pytest.mark.distributed
EXPORT = str(REPO / "tools" / "export.py")


def dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """A QLoRA run (checkpoint at step 2, final adapter at 3) and a full fine-tuning run of the same
    model (checkpoint at step 1, final model at 2), both ZeRO-3 on 2 ranks."""
    root = tmp_path_factory.mktemp("export_runs")
    launch(common(tiny_models["llama"], root / "qlora", **{"train.max_steps": 3, "checkpoint.every_steps": 2}), nproc=2)
    launch(common(tiny_models["llama"], root / "full", method="full", **{"train.max_steps": 2, "checkpoint.every_steps": 1}), nproc=2)
    return root


def test_adapter_and_merged_exports_verify(runs, tmp_path):
    qlora = runs / "qlora"
    adapter = export.export(qlora, "adapter", tmp_path / "adapter", which="step_2")
    assert adapter["step"] == 2 and adapter["reload_max_diff"] == 0.0  # same weights, same kernels
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    # latest = the final adapter (step 3), newer than the last checkpoint
    merged = export.export(qlora, "merged", tmp_path / "merged", which="latest")
    print(f"merged (4-bit base dequantised, LoRA folded in) vs adapter on the 4-bit base: max |logit diff| {merged['merged_max_diff']:.2e}")
    assert merged["source"] == str(qlora / "adapter") and merged["merged_max_diff"] < 1e-5
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in cfg  # a plain model directory
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert not any("lora" in name for name, _ in plain.named_parameters())


def test_merged_from_a_checkpoint_and_bad_requests(runs, tmp_path):
    report = export.export(runs / "qlora", "merged", tmp_path / "m2", which="2", dtype="bf16")
    assert report["merged_max_diff"] < 1e-5 and "reload_max_diff" not in report  # written in bf16: no fp32 reload check
    proc = run_bounded([sys.executable, EXPORT, str(runs / "qlora"), "--format", "hf", "--out", str(tmp_path / "x")], child_env(), 120)
    assert proc.returncode == 2 and "does not apply to a method=qlora run; use adapter or merged" in proc.stderr
    proc = run_bounded([sys.executable, EXPORT, str(runs / "qlora"), "--format", "adapter", "--from", "step_7", "--out", str(tmp_path / "x")],
                       child_env(), 120)
    assert proc.returncode == 2 and "no checkpoint 'step_7'" in proc.stderr


def test_full_model_export_and_checkpoint_sizes(runs, tmp_path):
    from safetensors.torch import load_file

    full = runs / "full"
    report = export.export(full, "hf", tmp_path / "hf", which="step_1")
    assert report["reload_max_diff"] == 0.0
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    recipe = (full / "recipe.yaml").read_text()
    base_path = next(line.split(":", 1)[1].strip().strip("'\"") for line in recipe.splitlines() if line.strip().startswith("path:"))
    base = load_file(f"{base_path}/model.safetensors")
    changed = [k for k in base if k in exported and not torch.equal(base[k], exported[k])]
    assert len(changed) >= len(base) // 2, "the consolidated weights are not the trained ones"

    # sizes on disk: a QLoRA checkpoint holds only the adapter (fp32 weights + 2 Adam moments + scheduler)
    q_dir = runs / "qlora" / checkpoint.CHECKPOINTS / "step_00000002"
    q_ckpt = dir_bytes(q_dir)
    f_ckpt = dir_bytes(full / checkpoint.CHECKPOINTS / "step_00000001")
    model_bytes = (tmp_path / "hf" / "model.safetensors").stat().st_size
    lora = load_file(str(runs / "qlora" / "adapter" / "adapter_model.safetensors"))
    lora_numel = sum(v.numel() for v in lora.values())
    print(f"checkpoint bytes: QLoRA {q_ckpt:,}, full fine-tuning {f_ckpt:,} ({q_ckpt / f_ckpt:.3f}x); "
          f"fp32 model {model_bytes:,} (QLoRA checkpoint {q_ckpt / model_bytes:.3f}x); LoRA params {lora_numel:,}")
    optim_bytes = sum(p.stat().st_size for p in q_dir.glob("*optim_states.pt"))
    module_bytes = sum(p.stat().st_size for p in q_dir.glob("*model_states.pt"))
    print(f"QLoRA checkpoint: optimizer files {optim_bytes / lora_numel:.2f} B per LoRA parameter, module files {module_bytes:,} B")
    assert 12 * lora_numel <= optim_bytes < 12.5 * lora_numel  # fp32 weight + exp_avg + exp_avg_sq, nothing else
    assert module_bytes < 4 * lora_numel  # the frozen 4-bit base (140,608 stored fp32 elements = 562 KB) is not in it
    assert f_ckpt > 3 * model_bytes  # full fine-tuning: fp32 weights + 2 moments (+ 16-bit module)
