"""Trace engine: run the real HF model at full width with 1 and 2 decoder layers under FakeTensorMode
(no real memory), count live activation storages through forward + loss + backward, and fit
value(L) = base + per_layer * L to scale to all layers.

Why a hand-written counter rather than torch's MemTracker: MemTracker registers a grad hook on every
parameter and fails on frozen (LoRA/QLoRA) parameters, and we only want the activation side here (the
static side is closed-form in harness/memory/budget.py). Parameters and buffers are excluded by storage,
and backward is taken with respect to the embedding output only, so no weight gradient is kept.

QLoRA is traced as LoRA over a frozen compute-dtype base: bitsandbytes' MatMul4Bit saves only the packed
weight (already counted as a parameter), so the saved activations are the same; the transient dequantised
weight is a closed-form line of the budget. PEFT is applied on the meta device and the parameters are then
replaced by fake CPU tensors directly (Module.to() cannot swap fake parameters). A 16-bit base under ZeRO-3 is
traced with DeepSpeed's own F.linear replacement, which saves every linear's input (see _zero3_linear); a soft
prompt (virtual_tokens) as the frozen base with gradient flowing to its input, over P + T positions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from harness.memory.analytic import ActivationProfile, ModelShape, TrainSetup, layer_saved_bytes
from harness.numerics import DTYPES



class _LiveBytes(TorchDispatchMode):
    """Bytes of distinct live storages created by operators (excluding `exclude` storages) and the peak."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude = exclude
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key in self.exclude or key in self.live:
                    continue
                self.live[key] = st.nbytes()
                self.current += st.nbytes()
                weakref.finalize(st, self._release, key)
                self.peak = max(self.peak, self.current)
        return out


def _build(cfg: dict, setup: TrainSetup, layers: int, fake_mode):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = dict(cfg)
    cfg["num_hidden_layers"] = layers
    cfg.pop("quantization_config", None)
    cfg.pop("layer_types", None)
    model_type = cfg.pop("model_type")
    if setup.num_labels:  # task=classification: the score head (pad id 0: the trace has no padding to find)
        cfg.update(num_labels=setup.num_labels, pad_token_id=0)
    hf_cfg = AutoConfig.for_model(model_type, **cfg)
    dtype = DTYPES[setup.precision]
    attn = setup.attn if setup.attn != "flash_attention_2" else "sdpa"  # flash-attn cannot run on CPU: sdpa's saved set
    auto = AutoModelForSequenceClassification if setup.num_labels else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(hf_cfg, dtype=dtype, attn_implementation=attn)
    if setup.virtual_tokens:
        # A soft prompt over a frozen base: no adapters. The traced input (`emb`, below) stands for peft's
        # concatenation of the (P, hidden) prompt and the token embeddings, so gradient flows through every
        # layer to it, as to the prompt.
        for p in model.parameters():
            p.requires_grad_(False)
        if setup.num_labels:
            from harness.model import make_head_trainable

            make_head_trainable(model)
    elif setup.peft:
        import peft

        from harness.model import lora_config

        targets = "all-linear" if setup.lora_targets in ("all-linear", ("all-linear",)) else list(setup.lora_targets)
        with torch.device("meta"):  # (alpha only scales the update: no memory of its own)
            model = peft.get_peft_model(model, lora_config(setup.lora_r, 2 * setup.lora_r, setup.lora_dropout, targets,
                                                           task="classification" if setup.num_labels else "causal_lm"))
        if setup.num_labels:
            from harness.model import make_head_trainable

            make_head_trainable(model)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    exclude: set[int] = set()
    with fake_mode:
        for mod in model.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    t = torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype, device="cpu")
                    mod._parameters[name] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
                    exclude.add(t.untyped_storage()._cdata)
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    t = torch.ones(b.shape, dtype=b.dtype, device="cpu")
                    mod._buffers[name] = t
                    exclude.add(t.untyped_storage()._cdata)
    model.config.use_cache = False
    model.train()
    # The harness's own policy code (non-reentrant, every layer or every k-th).
    from harness.model import apply_gradient_checkpointing

    apply_gradient_checkpointing(model, setup.checkpointing, setup.checkpoint_every_k)
    return model, exclude


@contextlib.contextmanager
def _zero3_linear(setup: TrainSetup):
    """Trace with the F.linear the run has: under ZeRO-3 (memory_efficient_linear, DeepSpeed's default)
    DeepSpeed's own zero3_linear_wrap, which saves every linear's input, frozen or not. Only a 16-bit
    base is affected: bitsandbytes' layers (qlora, int8; traced here as 16-bit linears) never call it."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as ZeroInit

    now = torch.nn.functional.linear
    plain = getattr(ZeroInit, "linear_bk", now)  # a zero.Init in this process replaced F.linear for good
    zero3 = setup.zero_stage == 3 and setup.memory_efficient_linear and setup.method == "lora"
    torch.nn.functional.linear = zero3_linear_wrap if zero3 else plain
    try:
        yield
    finally:
        torch.nn.functional.linear = now


def _measure(cfg: dict, setup: TrainSetup, layers: int) -> tuple[int, int, int]:
    """(saved at the end of forward, forward peak, backward peak) in bytes for a `layers`-layer model."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode()
    model, exclude = _build(cfg, setup, layers, fake_mode)
    b, s = setup.micro_batch, setup.seq_len
    dtype = DTYPES[setup.precision]
    with fake_mode:
        emb = torch.empty(b, s, int(cfg["hidden_size"]), dtype=dtype, requires_grad=True)
        targets = torch.zeros(b if setup.num_labels else b * s, dtype=torch.long)  # one class per row, or per token
        kwargs = {"use_cache": False}
        if setup.packed:  # two samples per row: position ids restart, transformers builds a block mask
            pos = torch.arange(s).remainder(max(s // 2, 1)).unsqueeze(0).expand(b, s)
            kwargs["position_ids"] = pos
        exclude |= {emb.untyped_storage()._cdata, targets.untyped_storage()._cdata}
        counter = _LiveBytes(exclude)
        with counter, _zero3_linear(setup):
            # `emb * 1` stands for the embedding output: a tensor of the run, kept only if something saves
            # it (fp32 norms, a checkpointed first layer), and gone otherwise.
            if setup.fused_loss and not setup.num_labels:
                saved, fwd_peak, loss = _fused_head(model, emb, targets, kwargs, counter)
                counter.peak = counter.current
                (grad,) = torch.autograd.grad(loss, emb)
                return saved, fwd_peak, counter.peak
            logits = model(inputs_embeds=emb * 1, **kwargs).logits
            if setup.virtual_tokens and not setup.num_labels:  # the loss drops the P virtual positions, as train.py
                logits = logits[:, setup.virtual_tokens:]
                targets = targets[: b * (s - setup.virtual_tokens)]
            # (b, C) pooled scores for a classifier (transformers pools one position per row), else (b, s, V)
            flat = logits.float() if setup.num_labels else logits.float().flatten(0, 1)
            loss = torch.nn.functional.cross_entropy(flat, targets, reduction="sum")
            del flat  # (the fp32 copy is transient in the run too: only log_softmax's output is saved)
            del logits
            saved, fwd_peak = counter.current, counter.peak
            counter.peak = counter.current
            (grad,) = torch.autograd.grad(loss, emb)
            bwd_peak = counter.peak
            del grad, loss
    return saved, fwd_peak, bwd_peak


def _fused_head(model, emb, targets, kwargs, counter):
    """kernels: [linear_cross_entropy]: the decoder's last hidden state into the harness's fused kernel, as
    harness/kernels/patch.py routes it (its autograd function directly: the public entry's target range check
    reads values, which fake tensors do not have)."""
    from harness.kernels.linear_cross_entropy import LinearCrossEntropyFunction, default_chunk_tokens

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(inputs_embeds=emb * 1, **kwargs).last_hidden_state
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    weight = base.lm_head.weight
    chunk = default_chunk_tokens(hidden2d.shape[0], weight.shape[1], weight.shape[0])
    loss = LinearCrossEntropyFunction.apply(hidden2d, weight, None, targets, -100, "sum", chunk)
    del hidden, hidden2d
    return counter.current, counter.peak, loss


def trace_profile(cfg: dict, setup: TrainSetup) -> ActivationProfile:
    """ActivationProfile measured on the real model (1 and 2 layers, full width) and scaled linearly.
    Cached per (config, setup): the fit search and repeated budgets re-use one trace."""
    return _trace_profile_cached(json.dumps(cfg, sort_keys=True), setup)


@functools.lru_cache(maxsize=64)
def _trace_profile_cached(cfg_json: str, setup: TrainSetup) -> ActivationProfile:
    cfg = json.loads(cfg_json)
    if "hidden_size" not in cfg or "model_type" not in cfg:
        raise ValueError("trace engine needs a Hugging Face config.json with model_type and hidden_size")
    k = max(setup.checkpoint_every_k, 1) if setup.checkpointing == "every_k" else 1
    n1, n2 = k, 2 * k  # whole periods of the checkpointing pattern
    m1 = _measure(cfg, setup, n1)
    m2 = _measure(cfg, setup, n2)
    per = [(b2 - b1) / (n2 - n1) for b1, b2 in zip(m1, m2)]
    base = [b1 - p * n1 for b1, p in zip(m1, per)]
    shape = ModelShape.from_config(cfg)
    return ActivationProfile(
        engine="trace",
        saved_base_bytes=base[0], saved_per_layer_bytes=per[0],
        fwd_peak_base_bytes=base[1], fwd_peak_per_layer_bytes=per[1],
        bwd_peak_base_bytes=base[2], bwd_peak_per_layer_bytes=per[2],
        layer_full_bytes=layer_saved_bytes(shape, setup, cpu_sdpa=setup.device == "cpu" and setup.attn == "sdpa"),
    )
