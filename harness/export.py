"""Turn a run into files that other tools load, each export verifying itself by comparing logits.

Three formats (the CLI is `harness-export`, or `python tools/export.py`; see `main`):
- `hf`      (method full): the ZeRO-3 shards consolidated into a Hugging Face model directory
            (safetensors + config + tokenizer). Check: the directory, reloaded by transformers, gives the
            same logits as the consolidated weights in memory.
- `adapter` (lora/qlora/int8): the LoRA weights in peft format. Check: base + the adapter reloaded by
            peft gives the same logits as base + the checkpoint's weights.
- `merged`  (lora/qlora/int8): LoRA merged into the base, written as a plain model directory. A
            quantised base is dequantised first (the weights training actually saw: NF4 or int8 values,
            not the original checkpoint's), then W' = W + (alpha / r) * B @ A. Check: the merged model's
            logits equal the adapter applied to the quantised base, the way training ran it.

Sources: a training checkpoint (`checkpoints/step_N`, any ZeRO stage and world size; read through
DeepSpeed's own consolidation, with pickles loaded weights-only) or the run's final `adapter/` or
`model/` directory. Everything runs on CPU in fp32 so the comparison means something; `dtype` only
sets what is written. Memory: the merged export holds the quantised model and an fp32 copy of the
base at once (about 4.5 bytes per parameter).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import checkpoint, config, distributed
from harness import model as model_lib
from harness.numerics import DTYPES

FORMATS = ("hf", "adapter", "merged")
TOLERANCE = 1e-5  # max |logit difference| / max(1, max |logit|), fp32: the same weights by another op order
PROBE_SHAPE = (2, 24)  # (batch, tokens) of seeded random token ids fed to both models
ATTN = "eager"  # one attention kernel for every model compared, so differences come from the weights


@dataclass
class Source:
    kind: str  # "checkpoint" | "adapter" | "model"
    path: Path
    step: int | None


# --------------------------------------------------------------------------------------------------
# The end-of-training export: the LoRA adapter in peft format or the full model in Hugging Face format,
# gathered from ZeRO-3 shards by all ranks together (a save from rank 0 alone would hang ZeRO-3)
# --------------------------------------------------------------------------------------------------


def gathered_state_dict(model: torch.nn.Module, *, only_trainable: bool, is_main: bool) -> dict[str, torch.Tensor]:
    """Full tensors on rank 0 (empty dict elsewhere). Parameters are gathered one at a time so no rank
    ever holds more than one whole parameter beyond its shard. Every rank must call this."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if only_trainable and not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # ZeRO-3 partitioned: gather (a collective), copy on rank 0, release
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if is_main:
                    state[name] = p.data.detach().to("cpu", copy=True)
        elif is_main:
            state[name] = p.detach().to("cpu", copy=True)
    return state


def check_adapter(state: dict[str, torch.Tensor]) -> None:
    """An adapter with no tensors, an empty tensor, or lora_B all zero after training is a bug
    (the ZeRO-3 '40-byte adapter'); fail loudly instead of shipping it."""
    prompt = {k: v for k, v in state.items() if k.startswith("prompt_encoder.") or k == "prompt_embeddings"}
    if prompt:  # method=prompt_tuning: the soft prompt, whole and finite
        bad = [k for k, v in prompt.items() if v.numel() == 0 or not bool(torch.isfinite(v).all())]
        if bad:
            raise RuntimeError(f"the soft prompt is empty or not finite after gathering: {bad}")
        return
    lora = {k: v for k, v in state.items() if "lora_" in k}
    if not lora:
        raise RuntimeError("the gathered adapter has no lora_ tensors; nothing would be saved")
    empty = [k for k, v in lora.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"adapter tensors are empty after gathering (ZeRO-3 shards not gathered): {empty[:3]}")
    if all(float(v.detach().abs().max()) == 0.0 for k, v in lora.items() if "lora_B" in k):
        raise RuntimeError("every lora_B is zero: the adapter was never updated; check lr and trainable parameters")


def save_adapter(model: torch.nn.Module, out: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """The peft adapter directory of `model` (tensors from `state` when given). With a classification
    head (trained in place, see model.lora_config) the head is added in peft's own modules_to_save
    layout: task_type SEQ_CLS, modules_to_save [score], the weight under its model name, so plain
    `PeftModel.from_pretrained(AutoModelForSequenceClassification...)` restores adapters and head."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    if model_lib.virtual_tokens(model):
        # peft would save the prompt by running its encoder, whose weight ZeRO-3 has partitioned: write its
        # layout directly (the config, and the (P, hidden) prompt as "prompt_embeddings")
        live = state if state is not None else {k: v.detach().cpu() for k, v in model.named_parameters()}
        prompt = next(v for k, v in live.items() if k.startswith("prompt_encoder.") and k.endswith(".embedding.weight"))
        model.peft_config["default"].save_pretrained(str(out))
        tensors = {"prompt_embeddings": prompt.contiguous()}
        if hasattr(model.get_base_model(), model_lib.HEAD):
            # a classifier (trained in place under a FEATURE_EXTRACTION wrapper): peft's SEQ_CLS prompt layout,
            # the head as "base_model.score.weight" (the live name too) and modules_to_save [score]
            head = {k: v.contiguous() for k, v in live.items() if k.startswith(f"base_model.{model_lib.HEAD}.")}
            assert head, "a classification model without its head's weights"
            tensors.update(head)
            _set_seq_cls(out / "adapter_config.json")
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        return
    # peft keeps only the adapter's keys of `state`
    model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
    base = model.get_base_model()
    if not hasattr(base, model_lib.HEAD):
        return
    head = state if state is not None else {k: v.detach().cpu() for k, v in model.named_parameters()}
    head = {k: v.contiguous() for k, v in head.items() if k.startswith(f"base_model.model.{model_lib.HEAD}.")}
    assert head, "a classification model without its head's weights"
    weights_file = out / "adapter_model.safetensors"
    save_file({**load_file(str(weights_file)), **head}, str(weights_file), metadata={"format": "pt"})
    _set_seq_cls(out / "adapter_config.json")


def _set_seq_cls(cfg_file: Path) -> None:
    """Mark a saved adapter as peft's sequence classifier with its head in modules_to_save."""
    cfg = json.loads(cfg_file.read_text())
    cfg.update(task_type="SEQ_CLS", modules_to_save=[model_lib.HEAD])
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def save_final(model: torch.nn.Module, tokenizer, output_dir: str, *, is_lora: bool, is_main: bool, steps_trained: int) -> Path:
    """Write `output_dir/adapter` (peft) or `output_dir/model` (transformers). Returns the directory."""
    out = Path(output_dir) / ("adapter" if is_lora else "model")
    state = gathered_state_dict(model, only_trainable=is_lora, is_main=is_main)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        # The model object provides the config and the file layout; the tensors come from `state`.
        if is_lora:
            save_adapter(model, out, state)
        else:
            model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(str(out))
    distributed.barrier()
    if is_main and is_lora and steps_trained > 0:
        check_adapter(state)  # after writing: a suspicious adapter is kept for inspection, and the run fails
    return out


def find_source(run_dir: str | Path, which: str = "latest") -> Source:
    """`latest` (the newer of the newest verified checkpoint and the final output), `final`, `step_N`/N,
    or a path."""
    run = Path(run_dir)
    if which in ("latest", "final"):
        final = [Source(kind, run / kind, None) for kind in ("adapter", "model") if (run / kind / "config.json").is_file()
                 or (run / kind / "adapter_config.json").is_file()]
        found = checkpoint.find_resume_dir(run, "auto", log=print) if which == "latest" else None
        if found is not None and (not final or (found / checkpoint.MANIFEST).stat().st_mtime > final[0].path.stat().st_mtime):
            return Source("checkpoint", found, checkpoint.read_manifest(found)["step"])
        if final:
            return final[0]
        raise ValueError(f"{run} has no verified checkpoint and no adapter/ or model/ directory to export")
    path = Path(which)
    if not path.is_dir():
        step = which.removeprefix("step_")
        path = run / checkpoint.CHECKPOINTS / (f"step_{int(step):08d}" if step.isdigit() else which)
    if not path.is_dir():
        raise ValueError(f"no checkpoint {which!r}: looked for {path}; choose latest, final, step_N or a directory")
    if (path / checkpoint.MANIFEST).is_file():
        problem = checkpoint.verify(path)
        if problem:
            raise ValueError(f"checkpoint {path} is not usable: {problem}")
        return Source("checkpoint", path, checkpoint.read_manifest(path)["step"])
    kind = "adapter" if (path / "adapter_config.json").is_file() else "model"
    return Source(kind, path, None)


def checkpoint_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 tensors of the weights a checkpoint holds (the trainable ones for LoRA/QLoRA, which
    excluded frozen weights), keyed by the training model's parameter names."""
    zero_files = sorted(ckpt_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    with checkpoint.weights_only_loading():
        if zero_files:  # ZeRO 1-3: DeepSpeed stitches every rank's flat fp32 partition back together
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
        else:  # no ZeRO: rank 0 saved the module's state dict whole
            state = torch.load(ckpt_dir / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    return {k: v.float() for k, v in state.items() if v.numel() > 0}


def probe_ids(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, PROBE_SHAPE, generator=g)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.float()


def compare(name: str, got: torch.Tensor, want: torch.Tensor, log=print) -> float:
    """Max |logit difference|. The limit scales with the logits' size: fp32 rounding differs between
    x @ (W + sBA)^T and x @ W^T + s (x @ A^T) @ B^T by a relative ~1e-6, more for deep, wide models."""
    diff = float((got - want).abs().max())
    limit = TOLERANCE * max(1.0, float(want.abs().max()))
    log(f"verify {name}: max |logit difference| {diff:.3g} (limit {limit:.3g}; logits up to {float(want.abs().max()):.3g})")
    if not diff <= limit:
        raise RuntimeError(f"export check failed: {name} logits differ by {diff:.3g} > {limit:.3g}")
    return diff


def _training_model(recipe: config.Recipe):
    """The model as training built it (quantised base + fresh LoRA, or the full model), fp32 on CPU."""
    return model_lib.load_model(recipe, precision="fp32", attn_implementation=ATTN, device=torch.device("cpu"))


def _quantised_base(recipe: config.Recipe):
    """The base model quantised as training quantised it (plain from_pretrained), fp32 on CPU, in
    bitsandbytes' standard layout (the logits checks run in eval mode, where it would repack them)."""
    head_cfg = model_lib.classification_config(recipe) if recipe.task == "classification" else {}
    base = model_lib.auto_class(recipe.task).from_pretrained(recipe.model.path, dtype=torch.float32, attn_implementation=ATTN,
                                                             quantization_config=model_lib.quantization_config(
                                                                 config.quantisation(recipe) or recipe.method, torch.float32),
                                                             device_map={"": "cpu"}, **head_cfg)
    model_lib.keep_standard_4bit_layout(base)
    return base


def _put_weights(model, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy `state` into `model` by parameter name; every tensor must land, and for LoRA every lora_
    weight of the model must be covered."""
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"{what} has weights the model does not: {unknown[:3]} (was it trained with another recipe?)")
    missing = sorted(k for k in params if "lora_" in k and k not in state)
    if missing:
        raise ValueError(f"{what} lacks LoRA weights {missing[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            if params[k].shape != v.shape:
                raise ValueError(f"{what}: {k} has shape {tuple(v.shape)}, the model {tuple(params[k].shape)}")
            params[k].copy_(v)


def _adapter_state(source: Source) -> dict[str, torch.Tensor]:
    if source.kind == "checkpoint":
        return checkpoint_weights(source.path)
    if source.kind != "adapter":
        raise ValueError(f"{source.path} is a full model, not a LoRA adapter; use --format hf")
    from peft.utils import load_peft_weights

    # peft stores names without the adapter name ("lora_A.weight"); the live model has "lora_A.default.weight";
    # a soft prompt is stored as "prompt_embeddings".
    def live_name(k: str) -> str:
        if k == "prompt_embeddings":
            return "prompt_encoder.default.embedding.weight"
        return k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")

    return {live_name(k): v.float() for k, v in load_peft_weights(str(source.path), device="cpu").items()}


def _save(model, tokenizer_path: str, out: Path, dtype: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(DTYPES[dtype]).save_pretrained(str(out), safe_serialization=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if tokenizer.pad_token is None and getattr(model.config, "num_labels", 0) and hasattr(model, model_lib.HEAD):
        tokenizer.pad_token = tokenizer.eos_token  # what training padded with (data.pad_token_id): batched pipelines need one
    tokenizer.save_pretrained(str(out))


def check_out_dir(out: Path, run: Path, model_path: str, overwrite: bool) -> None:
    """Refuse to write over the base model, into the run's own files, or over an existing directory
    (without `overwrite`): an export replaces config.json and *.safetensors where it writes."""
    target, base, run_dir = out.resolve(), Path(model_path).resolve(), run.resolve()
    if target == base or base in target.parents or target in base.parents:
        raise ValueError(f"--out {out} would write into the base model {base} (the run's model.path); choose a new directory")
    if target == run_dir or target in run_dir.parents:
        raise ValueError(f"--out {out} would write over the run directory {run_dir}; choose a new directory")
    if run_dir in target.parents and target.relative_to(run_dir).parts[0] in (checkpoint.CHECKPOINTS, "adapter", "model", "answers"):
        raise ValueError(f"--out {out} is inside the run's own {target.relative_to(run_dir).parts[0]}/; choose a new directory")
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ValueError(f"--out {out} already exists and is not empty; choose a new directory or pass --overwrite")


def export(run_dir: str | Path, fmt: str, out: str | Path, which: str = "latest", dtype: str = "fp32", log=print,
           trust_remote_code: bool = False, overwrite: bool = False) -> dict:
    """Write `out` in format `fmt` from `which` of `run_dir`; returns the figures of the checks.
    `trust_remote_code` must be given here (not only in the run's recipe.yaml, which may come from
    anyone) to run a model directory's own Python code."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    run = Path(run_dir)
    recipe_file = run / "recipe.yaml"
    if not recipe_file.is_file():
        raise ValueError(f"{run} is not a harness run directory (no recipe.yaml)")
    recipe = config.load_recipe(str(recipe_file))
    is_lora = recipe.method != "full"
    if recipe.method == "prompt_tuning" and fmt != "adapter":
        raise ValueError(f"format {fmt!r} does not apply to a method=prompt_tuning run: a soft prompt is an input, not weights to "
                         "merge; use --format adapter")
    if is_lora == (fmt == "hf"):
        raise ValueError(f"format {fmt!r} does not apply to a method={recipe.method} run; "
                         f"use {'adapter or merged' if is_lora else 'hf'}")
    if recipe.model.trust_remote_code and not trust_remote_code:
        raise ValueError(f"{recipe_file} sets model.trust_remote_code=true: loading {recipe.model.path} would run its Python "
                         "code; pass --trust-remote-code if you trust that directory")
    out = Path(out)
    check_out_dir(out, run, recipe.model.path, overwrite)
    source = find_source(run, which)
    log(f"exporting {source.kind} {source.path}{f' (step {source.step})' if source.step is not None else ''} as {fmt} to {out}")
    auto = model_lib.auto_class(recipe.task)  # AutoModelForCausalLM, or AutoModelForSequenceClassification
    vocab = int(config.read_model_config(recipe.model.path)["vocab_size"])
    ids = probe_ids(vocab)
    report = {"format": fmt, "source": str(source.path), "step": source.step}

    if fmt == "hf":
        if source.kind == "checkpoint":
            model = _training_model(recipe)
            _put_weights(model, checkpoint_weights(source.path), str(source.path))
        else:
            model = auto.from_pretrained(str(source.path), dtype=torch.float32, attn_implementation=ATTN)
        want = logits(model, ids)
        _save(model, recipe.model.path, out, dtype)
        if dtype == "fp32":
            report["reload_max_diff"] = compare("reloaded model vs consolidated weights", logits(
                auto.from_pretrained(str(out), dtype=torch.float32, attn_implementation=ATTN), ids), want, log)
        return report

    state = _adapter_state(source)
    check_adapter(state)
    adapted = _training_model(recipe)  # quantised base + LoRA, exactly as trained
    _put_weights(adapted, state, str(source.path))
    want = logits(adapted, ids)

    if fmt == "adapter":
        save_adapter(adapted, out)
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(_quantised_base(recipe), str(out))
        report["reload_max_diff"] = compare("base + reloaded adapter vs checkpoint weights", logits(reloaded, ids), want, log)
        return report

    # merged: dequantise the base (what training saw), apply the same LoRA, fold it into the weights
    del adapted
    import peft

    base = _quantised_base(recipe)
    if getattr(base, "hf_quantizer", None) is not None:
        base = base.dequantize(dtype=torch.float32)
    lo = recipe.lora
    wrapped = peft.get_peft_model(base, model_lib.lora_config(lo.r, lo.alpha, 0.0, lo.target_modules, recipe.task))
    if recipe.task == "classification":
        model_lib.make_head_trainable(wrapped)
    _put_weights(wrapped, state, str(source.path))
    merged = wrapped.merge_and_unload()
    report["merged_max_diff"] = compare("merged model vs adapter on the quantised base", logits(merged, ids), want, log)
    _save(merged, recipe.model.path, out, dtype)
    if dtype == "fp32":
        report["reload_max_diff"] = compare("reloaded merged directory", logits(
            auto.from_pretrained(str(out), dtype=torch.float32, attn_implementation=ATTN), ids), want, log)
    (out / "export.json").write_text(json.dumps(report, indent=1))
    return report


USAGE = """Export a harness run: consolidated Hugging Face model, peft adapter, or LoRA merged into the base.

    harness-export RUN_DIR --format merged --out exported/ [--from latest|final|step_N|PATH] [--dtype bf16]
                   [--overwrite] [--trust-remote-code]            (or: python tools/export.py ...)

  --format hf       method=full runs: ZeRO-3 shards -> safetensors model directory
  --format adapter  lora/qlora/int8 runs: the LoRA weights in peft format
  --format merged   lora/qlora/int8 runs: base (dequantised when 4/8-bit) + LoRA folded in, a plain model
  --from            latest (default: newest verified checkpoint, else the final output), final
                    (RUN_DIR/adapter or RUN_DIR/model), step_N or N, or a checkpoint/adapter directory
  --dtype           dtype written (fp32 default); the checks always run in fp32
  --overwrite       write into an existing non-empty --out (never the base model or the run's own files)
  --trust-remote-code  needed to export a run whose recipe sets model.trust_remote_code (its code runs)

Each export verifies itself (logits on seeded random tokens, max difference <= 1e-5) and exits 1 if
a check fails; bad arguments exit 2. Runs on CPU; see the module's docstring for the memory it needs.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="harness-export", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="the run's output_dir (holds recipe.yaml, checkpoints/, adapter/ or model/)")
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--out", required=True, help="directory to write (created)")
    ap.add_argument("--from", dest="which", default="latest", help="latest | final | step_N | N | a directory")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty --out directory")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="allow the model directory's own Python code (needed when the run's recipe sets model.trust_remote_code)")
    a = ap.parse_args(argv)
    try:
        report = export(a.run_dir, a.format, a.out, which=a.which, dtype=a.dtype, trust_remote_code=a.trust_remote_code, overwrite=a.overwrite)
    except (ValueError, config.ConfigError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"export: {e}", file=sys.stderr)
        return 1
    print(f"export: wrote {a.out} ({', '.join(f'{k}={v}' for k, v in report.items() if k.endswith('diff'))})")
    return 0


def cli() -> None:
    sys.exit(main())
