"""Build the model to train from a local Hugging Face directory: precision, quantisation, LoRA,
frozen layers and the gradient-checkpointing policy. No launcher, Slurm or process-group code here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness import _optional
from harness.numerics import DTYPES



@dataclass
class ParamCounts:
    trainable: int
    total: int  # logical size: a 4-bit weight counts as its unquantised number of elements

    def line(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return f"parameters: {self.trainable:,} trainable of {self.total:,} total ({pct:.3f}%)"


def logical_numel(p: torch.nn.Parameter) -> int:
    """Elements a parameter stands for, whether it is ZeRO-3 partitioned and/or 4-bit packed."""
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return math.prod(qs.shape)
    if hasattr(p, "ds_numel"):  # ZeRO-3 partitioned: the local tensor is a shard (or empty)
        return int(p.ds_numel)
    return p.numel()


def count_parameters(model: torch.nn.Module) -> ParamCounts:
    trainable = total = 0
    for p in model.parameters():
        n = logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return ParamCounts(trainable, total)


def quantization_config(method: str, compute_dtype: torch.dtype):
    """bitsandbytes settings. For 4-bit the packed bytes are stored in `compute_dtype` tensors
    (`bnb_4bit_quant_storage`) so ZeRO-3 sees one dtype and partitions them like any other weight;
    uint8 storage would be cast (and corrupted) by DeepSpeed's dtype conversion."""
    if method not in ("qlora", "int8"):
        return None
    _optional.require("bitsandbytes")
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,
    )


def keep_standard_4bit_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights in place; returns the number of 4-bit layers.

    bitsandbytes >= 0.48 on a CPU with AVX512-BF16 rewrites a `Linear4bit` weight into a CPU-only layout
    at its first forward in eval mode on an input without grad (`support_avx512bf16_for_cpu`, read from
    the CPU at construction). From then on the layer computes through `gemv_4bit`, which has no
    autograd (every adapter below gets a wrong gradient), ZeRO-3 re-gathers the original bytes under a
    quant state that says "packed" (a garbage loss), and `state_dict()` asserts. An eval pass must not
    change the model, so every 4-bit layer the harness builds keeps the standard layout on every CPU.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes.nn.Linear4bit (and its subclasses)
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def assert_standard_4bit_layout(model: torch.nn.Module) -> None:
    """Internal invariant: no 4-bit weight has been repacked (see keep_standard_4bit_layout)."""
    for name, module in model.named_modules():
        qs = getattr(getattr(module, "weight", None), "quant_state", None)
        assert not getattr(qs, "packing_format_for_cpu", False), f"{name}: bitsandbytes repacked this 4-bit weight in place"


def lora_config(r: int, alpha: float, dropout: float, target_modules, task: str = "causal_lm"):
    """The one peft LoraConfig the harness builds (training, export, the memory trace).

    task=classification gets no peft task type: peft's SEQ_CLS wrapper deep-copies the head into
    `modules_to_save`, and a deep copy of a ZeRO-3 partitioned parameter still gathers into the
    original. The head is trained in place instead (make_head_trainable) and written in peft's
    modules_to_save layout by the export (export.save_classification_adapter)."""
    peft = _optional.require("peft")
    if task == "classification" and target_modules == "all-linear":
        # without a task type peft's "all-linear" would also wrap the head, which is trained whole
        from harness.config import DECODER_LINEAR_NAMES

        target_modules = list(DECODER_LINEAR_NAMES)
    return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                           task_type="CAUSAL_LM" if task == "causal_lm" else None, bias="none")


HEAD = "score"  # transformers' *ForSequenceClassification head (Llama, Mistral, Qwen2): Linear(hidden, num_labels, bias=False)


def auto_class(task: str):
    """The transformers auto class of a task."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def classification_config(recipe) -> dict:
    """config.json settings of the classification head: the classes (id2label names them for
    pipeline("text-classification")) and the pad id, which transformers' pooling uses to find each
    row's last real token; it must be the id the data pads with (data.pad_token_id)."""
    from transformers import AutoTokenizer

    from harness.data import pad_token_id

    labels = list(recipe.data.labels)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {x: i for i, x in enumerate(labels)},
            "pad_token_id": pad_token_id(tokenizer)}


def initial_head_weight(shape: tuple, std: float, seed: int) -> torch.Tensor:
    """The head's starting weight, from its own seeded generator (fp32, normal(0, initializer_range) as
    transformers initialises it): the same on every rank, for any world size and loader, whatever
    random numbers loading consumed."""
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.randn(shape, generator=g) * std


def init_head(model: torch.nn.Module, seed: int) -> None:
    """Overwrite the freshly initialised head with initial_head_weight (under ZeRO-3 gathered, written
    by rank 0 and re-partitioned: with modifier_rank=None DeepSpeed would discard the write)."""
    head = getattr(model, HEAD)
    w = head.weight
    std = float(getattr(model.config, "initializer_range", 0.02))
    if hasattr(w, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([w], modifier_rank=0):
            with torch.no_grad():
                w.data.copy_(initial_head_weight(tuple(w.ds_shape), std, seed).to(w.dtype))
        return
    with torch.no_grad():
        w.copy_(initial_head_weight(tuple(w.shape), std, seed).to(w.dtype))


def has_trained_head(path: str) -> bool:
    """Whether the checkpoint at `path` is already a classifier (its `score` weights are kept)."""
    from harness.loading import checkpoint_index

    return any(k.startswith(f"{HEAD}.") for k in checkpoint_index(path))


def make_head_trainable(model: torch.nn.Module) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for p in getattr(base, HEAD).parameters():
        p.requires_grad_(True)


def load_model(recipe, *, precision: str, attn_implementation: str, device: torch.device, loader: str = "hf",
               ds_config: dict | None = None, lora_dropout: float | None = None):
    """Load recipe.model as recipe.method trains it (recipe.lora's adapters, recipe.freeze_layers; the
    adapters seeded with recipe.train.seed) and make only those parameters trainable.

    `ds_config` (a ZeRO-3 config) builds it partitioned: `loader="hf"` needs a live
    `transformers.integrations.HfDeepSpeedConfig` so `from_pretrained` runs inside `deepspeed.zero.Init`
    (each rank then holds its shard of every 16/32-bit weight, but the whole 4-bit model until
    deepspeed.initialize); `loader="streamed"` (harness/loading.py) reads and partitions one layer at a
    time, 4-bit included, and must run without one. `build_model` takes care of both.
    `lora_dropout` overrides recipe.lora.dropout (the export's deterministic forward)."""
    path, method, trust = recipe.model.path, recipe.method, recipe.model.trust_remote_code
    classify = recipe.task == "classification"
    zero3 = ds_config is not None
    dtype = DTYPES[precision]
    head_cfg = classification_config(recipe) if classify else {}
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust, **head_cfg)
    from harness.config import quantisation

    qcfg = quantization_config(quantisation(recipe) or method, dtype)
    if loader == "streamed":
        from harness import loading

        model = loading.load_streamed(path, dtype=dtype, attn_implementation=attn_implementation, device=device,
                                      ds_config=ds_config, quantization_config=qcfg, trust_remote_code=trust,
                                      task=recipe.task, config_overrides=head_cfg, seed=recipe.train.seed)
    else:
        if qcfg is not None:
            kwargs["quantization_config"] = qcfg
            if not zero3:
                # bitsandbytes quantises while placing weights on the device.
                kwargs["device_map"] = {"": device}
        model = auto_class(recipe.task).from_pretrained(path, **kwargs)
        if classify and not has_trained_head(path):  # from_pretrained initialised the new head from the global RNG
            init_head(model, recipe.train.seed)
    keep_standard_4bit_layout(model)
    model.config.use_cache = False  # the KV cache is for generation; training never reads it

    if method == "full":
        if recipe.freeze_layers >= 0:
            freeze_below(model, recipe.freeze_layers)
        return model

    peft = _optional.require("peft")
    # Seed right before the adapters are created so their init is identical on every rank and for
    # any world size, whatever random numbers model loading consumed.
    torch.manual_seed(recipe.train.seed)
    if method == "prompt_tuning":
        return with_soft_prompt(model, recipe)
    lo = recipe.lora
    model = peft.get_peft_model(model, lora_config(lo.r, lo.alpha, lo.dropout if lora_dropout is None else lora_dropout, lo.target_modules,
                                                   recipe.task))
    if classify:  # a new head learns from scratch: always trained, next to the adapters
        make_head_trainable(model)
    # peft keeps adapters in fp32 over a 16-bit base; DeepSpeed wants one dtype for trainable weights.
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def prompt_tuning_config(recipe):
    """peft's PromptTuningConfig of recipe.prompt_tuning.

    A classifier gets task type FEATURE_EXTRACTION, whose wrapper only puts the prompt before the token
    embeddings: peft's SEQ_CLS wrapper would deep-copy the ZeRO-3 partitioned head into modules_to_save
    (see lora_config), so the head trains in place, and the export writes peft's SEQ_CLS layout."""
    peft = _optional.require("peft")
    pt = recipe.prompt_tuning
    text = pt.init == "text"
    task_type = "FEATURE_EXTRACTION" if recipe.task == "classification" else "CAUSAL_LM"
    return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=pt.num_virtual_tokens,
                                   prompt_tuning_init=peft.PromptTuningInit.TEXT if text else peft.PromptTuningInit.RANDOM,
                                   prompt_tuning_init_text=pt.init_text if text else None,
                                   tokenizer_name_or_path=recipe.model.path if text else None)


def with_soft_prompt(model: torch.nn.Module, recipe):
    """The frozen base with a trainable soft prompt of recipe.prompt_tuning.num_virtual_tokens embeddings
    (peft prompt tuning: the prompt's (P, hidden) embeddings are put before every sample's token
    embeddings, and the attention mask grows by P). init=text copies the embeddings of init_text's
    tokens (tokenised as peft does, with the tokenizer's special tokens): under ZeRO-3 the embedding
    matrix is partitioned, so it is gathered for that read."""
    import contextlib

    peft = _optional.require("peft")
    emb = model.get_input_embeddings().weight
    gathered = contextlib.nullcontext()
    from transformers.integrations import is_deepspeed_zero3_enabled

    # (peft gathers it itself while transformers knows about ZeRO-3: the hf loader; the streamed one builds first)
    if hasattr(emb, "ds_id") and recipe.prompt_tuning.init == "text" and not is_deepspeed_zero3_enabled():
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([emb], modifier_rank=None)  # read only
    with gathered:
        model = peft.get_peft_model(model, prompt_tuning_config(recipe))
    if recipe.task == "classification":  # the new head learns beside the prompt
        make_head_trainable(model)
    dtype = model.get_input_embeddings().weight.dtype
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def head_module(model: torch.nn.Module) -> torch.nn.Module:
    """The classification head (`score`) of a model, peft-wrapped or a DeepSpeed engine's."""
    model = getattr(model, "module", model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, HEAD)


def virtual_tokens(model: torch.nn.Module) -> int:
    """Positions a soft prompt puts before each sample (0 without one): logits then have T + P positions."""
    model = getattr(model, "module", model)  # a DeepSpeed engine's model
    cfg = getattr(model, "active_peft_config", None)
    return int(cfg.num_virtual_tokens) if cfg is not None and cfg.is_prompt_learning else 0


def build_model(recipe, plan, device: torch.device):
    """The model the run plan trains, and the ZeRO-3 context it needs: (model, hf_ds_config).

    transformers learns that it runs under ZeRO-3 from an `HfDeepSpeedConfig` it holds only by weakref,
    so the caller keeps the returned one alive for the whole run. It must exist before `from_pretrained`
    (loader hf) and must not while the streamed loader builds its skeleton, which partitions itself."""
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = plan.zero_stage == 3
    hf_ds_config = HfDeepSpeedConfig(plan.ds) if zero3 and plan.loader == "hf" else None
    model = load_model(recipe, precision=plan.precision, attn_implementation=plan.attn, device=device, loader=plan.loader,
                       ds_config=plan.ds if zero3 else None)
    if zero3 and hf_ds_config is None:
        hf_ds_config = HfDeepSpeedConfig(plan.ds)  # from here on transformers knows it runs under ZeRO-3
    return model, hf_ds_config


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of transformer blocks (`model.layers` in Llama, Mistral, Qwen2, peft-wrapped or not)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers"):
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def freeze_below(model: torch.nn.Module, k: int) -> None:
    """Train only decoder layers >= k, the final norm and the head (transfer-learning recipe).
    Embeddings are frozen; with tied embeddings the head shares them and is frozen too."""
    layers = decoder_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[k:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    inner = getattr(model, "model", model)
    norm = getattr(inner, "norm", None)
    if norm is not None:
        for p in norm.parameters():
            p.requires_grad_(True)
    head = model.get_output_embeddings()
    if head is not None and not getattr(model.config, "tie_word_embeddings", False):
        for p in head.parameters():
            p.requires_grad_(True)
    if hasattr(model, HEAD):  # a classification head is new: always trained
        make_head_trainable(model)


def apply_gradient_checkpointing(model: torch.nn.Module, policy: str, every_k: int = 2) -> int:
    """Recompute activations in backward. `full`: every decoder layer; `every_k`: every k-th layer.
    Non-reentrant (`use_reentrant=False`): works with frozen inputs (LoRA) and with ZeRO-3's parameter
    hooks, which re-gather partitioned weights during the recompute. Returns the checkpointed count."""
    if policy == "none":
        return 0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False},
        every_n_layers=1 if policy == "full" else every_k,
    )
    return sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in decoder_layers(model))
