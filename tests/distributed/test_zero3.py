"""Distributed tier: 2 gloo ranks on CPU (tests/spawn_ranks.py), against one plain process.

Covers the core acceptance points: ZeRO-3 parity with a single process (full fp32, QLoRA), real
sharding of every partitioned parameter (4-bit included), the saved adapter / model round trip, and
gradient checkpointing under ZeRO-3 + QLoRA (same losses, less activation memory).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, launch, read_metrics, train_losses

pytestmark = pytest.mark.distributed

RECIPE = str(REPO / "harness" / "recipes" / "tiny_qlora.yaml")
PROBE = str(REPO / "tests" / "distributed" / "probe_run.py")


def common(model_path, out_dir, **over) -> list[str]:
    """Overrides shared by the runs compared here: same data, seed and global batch for any world size;
    no dropout (its random stream differs per rank); every step logged; no periodic eval."""
    args = {
        "model.path": model_path,
        "output_dir": out_dir,
        "train.max_steps": 5,
        "train.warmup_steps": 1,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 8,
        "train.gradient_checkpointing": "none",
        "lora.dropout": 0.0,
        "eval.every_steps": 0,
        "log.every_steps": 1,
        "log.progress_bar": "false",
    }
    args.update(over)
    return ["--config", RECIPE] + [f"{k}={v}" for k, v in args.items()]


def rel_err(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


# a soft prompt started from a text's embeddings (ZeRO-3: read from the partitioned matrix) on a 4-bit base
SOFT_PROMPT = {"prompt_tuning.base_4bit": "true", "prompt_tuning.init": "text", "prompt_tuning.init_text": "Answer the question",
               "prompt_tuning.num_virtual_tokens": 6, "train.lr": 3e-2}


# task=classification on the bundled sentiment rows, evaluated at step 5 on 32 of them
ASSETS = REPO / "harness" / "assets"
CLASSIFY = {"task": "classification", "data.labels": "[negative,neutral,positive]", "data.sources.0.format": "text",
            "data.sources.0.path": ASSETS / "sentiment_train.jsonl", "data.val_path": ASSETS / "sentiment_val.jsonl",
            "data.seq_len": 64, "eval.every_steps": 5, "eval.max_samples": 32, "eval.batch_size": 8, "train.lr": 3e-3}
ROWS = {  # id: (method, overrides, tolerance)
    "full": ("full", {}, 1e-4),
    "qlora": ("qlora", {}, 1e-2),
    "prompt_tuning": ("prompt_tuning", SOFT_PROMPT, 1e-2),
    # the hf loader builds under deepspeed.zero.Init (the new head initialised while partitioned); the streamed
    # loader partitions the head as its last unit
    "classification-lora-hf": ("lora", {**CLASSIFY, "model.loader": "hf"}, 1e-4),
    "classification-qlora-streamed": ("qlora", {**CLASSIFY, "model.loader": "streamed"}, 1e-2),
    # a soft prompt before each review, and the head trained beside it (the head pools each row's last real token,
    # P positions further on)
    "classification-prompt_tuning": ("prompt_tuning", {**CLASSIFY, "prompt_tuning.num_virtual_tokens": 6}, 1e-4),
}


def plain_peft_val_loss(model_path, adapter, rows: int, quantized: bool) -> float:
    """The saved adapter (and head) in plain transformers + peft, every validation review alone and unpadded
    (so even peft's prompt-tuning wrapper, which pools the last position, pools the right token): mean CE."""
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests import reference as ref

    tok = AutoTokenizer.from_pretrained(str(model_path))
    labels = CLASSIFY["data.labels"].strip("[]").split(",")
    val = ref.read_jsonl(CLASSIFY["data.val_path"], rows)
    base = ref.load_base(model_path, quantized=quantized, attn="sdpa", auto=AutoModelForSequenceClassification, num_labels=len(labels),
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        logits = torch.cat([model(input_ids=tok(r["text"], return_tensors="pt").input_ids).logits.float() for r in val])
    return float(F.cross_entropy(logits, torch.tensor([labels.index(r["label"]) for r in val])))


@pytest.mark.parametrize("row", ROWS)
def test_zero3_two_ranks_match_one_process(tiny_llama, tmp_path, row):
    """Losses of the first 5 steps (and with an eval, its loss and confusion matrix): ZeRO-3 on 2 ranks
    versus one process with ZeRO disabled."""
    method, over, tol = ROWS[row]
    extra = {"method": method, "train.lr": 1e-3, **over}
    launch(common(tiny_llama, tmp_path / "single", **extra, **{"deepspeed.config": "ds_configs/zero0.json"}), nproc=1)
    # a classifier's ZeRO-3 run also checkpoints and evaluates at step 4 (exported below; the final step writes the
    # adapter, not a checkpoint)
    ckpt = {"checkpoint.every_steps": 4, "eval.every_steps": 4} if "eval.every_steps" in over else {}
    launch(common(tiny_llama, tmp_path / "zero3", **{**extra, **ckpt, "deepspeed.config": "ds_configs/zero3.json"}), nproc=2)
    single, zero3 = train_losses(tmp_path / "single"), train_losses(tmp_path / "zero3")
    assert len(single) == len(zero3) == 5
    evals = [r["val_loss"] for r in read_metrics(tmp_path / "single") if "val_loss" in r]
    # learning: the training loss of 5 batches of 8, or where there is one, the fixed validation set's loss (a classifier's
    # batches of 8 reviews vary more than 5 small steps move it)
    moved = evals[-1] < evals[0] if evals else single[-1] < single[0]
    assert moved, f"loss did not move: train {single}, val {evals}"
    err = rel_err(zero3, single)
    print(f"{row}: single {single}\n{row}: zero3  {zero3}\nmax relative error {err:.2e}")
    assert err <= tol
    if "eval.every_steps" in over:
        v1, v2 = ([r for r in read_metrics(tmp_path / d) if "val_loss" in r][-1] for d in ("single", "zero3"))
        val_err = abs(v2["val_loss"] - v1["val_loss"]) / v1["val_loss"]
        print(f"  val_loss {v1['val_loss']:.6f} vs {v2['val_loss']:.6f} ({val_err:.2e}); "
              f"accuracy {v1['val_accuracy']:.3f} vs {v2['val_accuracy']:.3f}")
        assert val_err <= tol
        assert sum(map(sum, v2["confusion"])) == 32  # every validation sample scored once, whatever the world size
        if tol <= 1e-4:  # fp32 end to end: the same predictions
            assert v1["confusion"] == v2["confusion"]
        plain = plain_peft_val_loss(tiny_llama, tmp_path / "zero3" / "adapter", 32, quantized=method == "qlora")
        print(f"  plain peft on the saved adapter: val_loss {plain:.6f} (ZeRO-3 run {v2['val_loss']:.6f})")
        assert abs(plain - v2["val_loss"]) <= tol * plain
        # harness-export --format adapter from the ZeRO-3 checkpoint of step 4: in plain peft, the loss the run evaluated then
        from harness import export

        export.export(tmp_path / "zero3", "adapter", tmp_path / "from_checkpoint", which="step_4")
        at4 = next(r for r in read_metrics(tmp_path / "zero3") if "val_loss" in r and r["step"] == 4)
        plain4 = plain_peft_val_loss(tiny_llama, tmp_path / "from_checkpoint", 32, quantized=method == "qlora")
        cfg = json.loads((tmp_path / "from_checkpoint" / "adapter_config.json").read_text())
        print(f"  adapter exported from the step-4 checkpoint ({cfg['peft_type']}, {cfg['task_type']}): plain peft val_loss "
              f"{plain4:.6f} (run at step 4 {at4['val_loss']:.6f})")
        assert cfg["task_type"] == "SEQ_CLS" and abs(plain4 - at4["val_loss"]) <= tol * plain4


@pytest.fixture(scope="module")
def qlora_probe(tiny_llama, tmp_path_factory):
    """One 2-rank ZeRO-3 QLoRA run with full checkpointing, probed (see probe_run.py)."""
    out = tmp_path_factory.mktemp("qlora_probe")
    launch([str(out / "probe.json")] + common(tiny_llama, out / "run", **{"train.gradient_checkpointing": "full", "train.lr": 1e-2}),
           nproc=2, script=PROBE)
    return out, json.loads((out / "probe.json").read_text())


def test_sharding_is_real_for_every_parameter_including_4bit(qlora_probe):
    _, probe = qlora_probe
    ranks = probe["ranks"]
    assert len(ranks) == 2
    by_name = [{r["name"]: r for r in rank["shards"]} for rank in ranks]
    assert by_name[0].keys() == by_name[1].keys()
    n_4bit = sum(r["is_4bit"] for r in by_name[0].values())
    assert n_4bit >= 14, f"expected the 2 layers x 7 projections in 4-bit, found {n_4bit}"
    for name, r0 in by_name[0].items():
        r1 = by_name[1][name]
        # ZeRO-3 pads each parameter to a multiple of the world size, then gives each rank half.
        assert r0["local_numel"] == r1["local_numel"] == math.ceil(r0["full_numel"] / 2), name


def test_qlora_adapter_round_trip(qlora_probe):
    """The saved peft adapter on a freshly quantised base reproduces the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from harness.model import quantization_config
    from tests import reference

    out, probe = qlora_probe
    saved = load_file(str(out / "logits.safetensors"))
    adapter_dir = out / "run" / "adapter"
    assert (adapter_dir / "adapter_model.safetensors").stat().st_size > 10_000  # never the 40-byte empty adapter
    base = AutoModelForCausalLM.from_pretrained(
        json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"],
        dtype=torch.float32, quantization_config=quantization_config("qlora", torch.float32), device_map={"": "cpu"},
    )
    reference.keep_bnb_layout(base)  # plain bitsandbytes would repack the weights at this eval on an AVX512-BF16 CPU
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).logits.float()
    mask = saved["attention_mask"].bool()
    diff = (logits - saved["logits"])[mask].abs().max().item()
    print(f"qlora adapter round trip: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_checkpointing_lowers_saved_activations(qlora_probe):
    _, probe = qlora_probe
    for rank in probe["ranks"]:
        act = rank["activation_bytes"]
        print(f"rank {rank['rank']}: saved activations full={act['full']:,} B none={act['none']:,} B")
        assert act["full"] < 0.7 * act["none"]


def test_checkpointing_full_gives_the_same_losses(tiny_llama, tmp_path, qlora_probe):
    """ZeRO-3 + QLoRA on 2 ranks: `full` recomputation must not change the numerics (fp32)."""
    out, _ = qlora_probe
    launch(common(tiny_llama, tmp_path / "none", **{"train.gradient_checkpointing": "none", "train.lr": 1e-2}), nproc=2)
    with_gc, without = train_losses(out / "run"), train_losses(tmp_path / "none")
    err = rel_err(with_gc, without)
    print(f"checkpointing full vs none: max relative loss difference {err:.2e}")
    assert err <= 1e-4


def test_full_finetune_model_round_trip(tiny_models, tmp_path):
    """ZeRO-3 full fine-tuning on 2 ranks (Qwen2 shape): model/ reloads with from_pretrained."""
    from transformers import AutoModelForCausalLM

    launch([str(tmp_path / "probe.json")] + common(tiny_models["qwen2"], tmp_path / "run", method="full", **{"train.max_steps": 3}),
           nproc=2, script=PROBE)
    saved = load_file(str(tmp_path / "logits.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "model"), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).logits
    mask = saved["attention_mask"].bool()
    diff = (logits - saved["logits"])[mask].abs().max().item()
    print(f"full model round trip: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4
