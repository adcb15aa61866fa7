"""Streamed, sharded loading for ZeRO-3: no rank ever holds the whole model.

Hugging Face's path under ZeRO-3 + 4-bit skips `deepspeed.zero.Init`, so every rank materialises the
whole quantised model and DeepSpeed partitions it only at `deepspeed.initialize` (70B NF4: ~40 GB per
rank, times the ranks per node in host RAM). Here:

1. the model skeleton is built on the meta device (no storage); for qlora/int8 Hugging Face's own
   bitsandbytes quantiser swaps in the 4/8-bit Linear modules, exactly as `from_pretrained` would;
2. the checkpoint is read one unit at a time (a decoder layer, or a single top-level tensor such as
   the embedding), from memory-mapped safetensors shards (one file or an index), each tensor cast to the
   compute dtype and, for quantised Linear weights, quantised with the same `Params4bit(...).to(device)`
   call transformers uses (so the packed bytes are identical);
3. each unit is handed to ZeRO-3 partitioning (`deepspeed.zero.Init(module=unit)`, the conversion
   `deepspeed.initialize` would otherwise do) before the next unit is read: a rank keeps its 1/N shard
   and frees the rest.

Peak per rank: its shards of the units read so far + about one whole unit (plus its quantisation
temporaries). Tied embeddings are re-tied after the embedding is loaded; buffers that are computed,
not stored (rotary `inv_freq`), are rebuilt from the config.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

import torch

_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")


def checkpoint_index(path: str | Path) -> dict[str, Path]:
    """tensor name -> safetensors file, for `model.safetensors` or a sharded `*.index.json`."""
    from safetensors import safe_open

    d = Path(path)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return {k: d / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{d} has no *.safetensors weights (streamed loading reads safetensors only)")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: f for k in fh.keys()})
    return out


def units(names: list[str]) -> "OrderedDict[str, list[str]]":
    """Group tensor names into loading units: `...layers.N` prefixes, else each tensor's module."""
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for name in names:
        m = _LAYER.match(name)
        key = m.group(1) if m else name.rsplit(".", 1)[0]
        groups.setdefault(key, []).append(name)
    return groups


def _rebuild_computed_buffers(model, config, device) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in checkpoints; the meta skeleton has none."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            try:
                with torch.device(device):  # computed in __init__ from the config, as from_pretrained does
                    fresh = type(module)(getattr(module, "config", config))
            except TypeError as e:
                bad = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
                raise RuntimeError(f"streamed loading cannot rebuild buffers {bad} of {name} ({type(module).__name__}): {e}; "
                                   f"use model.loader=hf") from None
            model.set_submodule(name, fresh)


def load_streamed(path: str, *, dtype: torch.dtype, attn_implementation: str, device: torch.device, ds_config: dict | None,
                  quantization_config=None, trust_remote_code: bool = False, progress=None, task: str = "causal_lm",
                  config_overrides: dict | None = None, seed: int = 0):
    """The model of `path` for `task` (a causal LM, or a sequence classifier whose head `score` is new),
    partitioned by ZeRO-3 unit by unit (`ds_config` None: not partitioned, for comparisons on one
    process). Same modules and weights as `from_pretrained` with the same quantisation config; the
    classification head starts from model.initial_head_weight (seeded by `seed`)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from harness import model as model_lib

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **(config_overrides or {}))
    with torch.device("meta"):
        model = model_lib.auto_class(task).from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                       trust_remote_code=trust_remote_code)
    quantizer = None
    if quantization_config is not None:
        from transformers.quantizers import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
        quantizer.preprocess_model(model, device_map={"": device}, dtype=dtype)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    index = checkpoint_index(path)
    if task == "classification":  # the LM head is replaced by the classification head
        index = {k: v for k, v in index.items() if not k.startswith("lm_head.")}
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(index) - set(params))
    if unknown:
        raise ValueError(f"{path}: checkpoint tensors the model does not have: {unknown[:3]} (wrong config.json?)")

    if ds_config is not None:
        import deepspeed

    groups = units(list(index))
    for i, (unit, names) in enumerate(groups.items()):
        loaded = {}
        # Memory-mapped reads of only this unit's tensors. Each file is closed before the next unit:
        # mapped pages that were touched count in the process's RSS until the mapping goes away.
        for f in dict.fromkeys(index[n] for n in names):
            with safe_open(str(f), framework="pt") as fh:
                loaded.update({n: fh.get_tensor(n) for n in names if index[n] == f})
        for name in names:
            tensor = loaded.pop(name)
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            module_name, pname = name.rsplit(".", 1)
            module = model.get_submodule(module_name)
            old = module._parameters.get(pname)
            if old is None:  # a persistent buffer
                module._buffers[pname] = tensor.to(device)
                continue
            if type(old).__name__ in ("Params4bit", "Int8Params"):  # quantise exactly as transformers does
                new = type(old)(tensor, requires_grad=False, **old.__dict__).to(device)
            else:
                new = torch.nn.Parameter(tensor.to(device), requires_grad=old.requires_grad)
            module._parameters[pname] = new
            del tensor
        if tied and model.get_output_embeddings() is not None and any(n.endswith("embed_tokens.weight") for n in names):
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        if ds_config is not None:
            # ZeRO-3 keeps this rank's 1/N of every tensor of the unit and frees the rest now.
            deepspeed.zero.Init(module=model.get_submodule(unit), config_dict_or_path=ds_config, mem_efficient_linear=False)
        if progress is not None:
            progress(i + 1, len(groups), unit)

    if task == "classification" and model.get_submodule(model_lib.HEAD).weight.is_meta:  # a new head: the last unit
        head = model.get_submodule(model_lib.HEAD)
        std = float(getattr(config, "initializer_range", 0.02))
        head.weight = torch.nn.Parameter(model_lib.initial_head_weight(tuple(head.weight.shape), std, seed).to(dtype).to(device))
        if ds_config is not None:
            deepspeed.zero.Init(module=head, config_dict_or_path=ds_config, mem_efficient_linear=False)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    _rebuild_computed_buffers(model, config, device)
    if quantizer is not None:
        quantizer.postprocess_model(model)
        model.hf_quantizer = quantizer
    model.eval()  # from_pretrained returns eval mode too; training calls engine.train()
    return model
