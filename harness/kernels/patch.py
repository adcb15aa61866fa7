"""Switch the fused kernels into a loaded Hugging Face model, per module instance.

One table row per architecture names the classes whose instances get a new `forward`. The kernels run
*inside* those modules' forwards, so DeepSpeed ZeRO-3's per-module hooks have gathered exactly the
parameters each kernel reads (and gather them again for the backward). Nothing is patched at class or
module level: other models in the process are untouched, and `remove_kernels` restores a model.

linear_cross_entropy changes the interface in one place: the causal LM accepts `token_targets`
(targets already aligned with the inputs, IGNORE_INDEX = -100) and then returns
`CausalLMOutputWithPast(loss=<fp32 sum of token losses>, logits=None)`. The loss is computed in the
forward of `lm_head` itself (never in the caller, which is what breaks Liger under ZeRO-3: the
head's weight is only gathered inside its own module's forward).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from harness import _optional
from harness.kernels.linear_cross_entropy import linear_cross_entropy
from harness.kernels.nf4 import nf4_linear
from harness.kernels.rmsnorm import rmsnorm
from harness.kernels.rope import rope
from harness.kernels.swiglu import swiglu
from harness.numerics import IGNORE_INDEX



@dataclass(frozen=True)
class ArchSpec:
    causal_lm: str
    norm: str
    attention: str
    mlp: str
    # The `sliding_window` the architecture's own attention forward passes to the attention function
    # (None: it passes none).
    sliding_window: Callable[[torch.nn.Module], Any] | None


ARCHS = {
    "llama": ArchSpec("LlamaForCausalLM", "LlamaRMSNorm", "LlamaAttention", "LlamaMLP", None),
    "mistral": ArchSpec("MistralForCausalLM", "MistralRMSNorm", "MistralAttention", "MistralMLP",
                        lambda attn: getattr(attn.config, "sliding_window", None)),
    "qwen2": ArchSpec("Qwen2ForCausalLM", "Qwen2RMSNorm", "Qwen2Attention", "Qwen2MLP", lambda attn: attn.sliding_window),
}


def resolve_kernel_names(value) -> list[str]:
    """`all`, a list of names, or [] -> the list of kernel names (the one check: harness/plan.py)."""
    from harness.plan import resolve_kernels

    return list(resolve_kernels(value)[0])


# ---- the replacement forwards (bound to module instances) -----------------------------------------


def _rmsnorm_forward(self, hidden_states):
    return rmsnorm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
    """The architectures' own attention forward with the q/k rotation replaced by the fused kernel."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hq, T, D)
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hk, T, D)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings  # (B, T, D), computed from position_ids by the model's rotary module
    query, key = rope(query, key, cos, sin)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    eager = sys.modules[type(self).__module__].eager_attention_forward
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    extra = {"sliding_window": self._harness_sliding_window(self)} if self._harness_sliding_window is not None else {}
    out, weights = attention(self, query, key, value, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **extra, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _nf4_linear_forward(self, x):
    """bitsandbytes Linear4bit.forward with the dequantisation done by the nf4 kernel."""
    qs = getattr(self.weight, "quant_state", None) or getattr(self, "quant_state", None)
    if qs is None or qs.quant_type != "nf4" or getattr(qs, "packing_format_for_cpu", False):
        return type(self).forward(self, x)  # layouts the kernel does not read: bitsandbytes' own path
    compute = self.compute_dtype or x.dtype
    bias = None if self.bias is None else self.bias.to(compute)
    return nf4_linear(x.to(compute), self.weight, qs, bias).to(x.dtype)


def _lm_head_forward(self, hidden_states, token_targets=None):
    if token_targets is None:
        return F.linear(hidden_states, self.weight, self.bias)
    return linear_cross_entropy(hidden_states, self.weight, token_targets, ignore_index=IGNORE_INDEX, reduction="sum", bias=self.bias)


def _causal_lm_forward(self, *args, token_targets=None, **kwargs):
    if token_targets is None:
        return type(self).forward(self, *args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    for key in ("labels", "logits_to_keep", "return_dict"):
        if kwargs.pop(key, None) not in (None, 0, True):
            raise ValueError(f"token_targets (fused linear_cross_entropy) cannot be combined with {key}")
    outputs = self.model(*args, **kwargs)
    loss = self.lm_head(outputs.last_hidden_state, token_targets=token_targets)  # lm_head's own forward: ZeRO-3 gathers it
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


# ---- applying and removing ------------------------------------------------------------------------


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM under a DeepSpeed engine and / or a peft wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _bind(module: torch.nn.Module, fn, kernel: str) -> None:
    module.forward = types.MethodType(fn, module)
    module._harness_kernel = kernel


def apply_kernels(model: torch.nn.Module, names) -> dict[str, int]:
    """Patch `names` (see resolve_kernel_names) into `model`; returns {kernel: modules patched}.
    Call after the model (and its LoRA adapters) are built and before deepspeed.initialize."""
    explicit = names != "all"  # with "all", nf4 applies only where there are 4-bit layers
    names = resolve_kernel_names(names)
    if not names:
        return {}
    base = _base_model(model)
    model_type = getattr(base.config, "model_type", "?")
    spec = ARCHS.get(model_type)
    classifier = spec is not None and type(base).__name__ == spec.causal_lm.replace("ForCausalLM", "ForSequenceClassification")
    if spec is None or (type(base).__name__ != spec.causal_lm and not classifier):
        raise ValueError(f"kernels are available for {', '.join(a.causal_lm for a in ARCHS.values())} (and their sequence classifiers); "
                         f"this model is {type(base).__name__} (model_type {model_type}); set kernels: []")
    if classifier and not explicit:  # no LM head to fuse with the loss (config.validate refuses it by name)
        names = tuple(n for n in names if n != "linear_cross_entropy")
    if "swiglu" in names and base.config.hidden_act not in ("silu", "swish"):
        raise ValueError(f"kernel swiglu needs hidden_act silu, the model uses {base.config.hidden_act}; drop swiglu from kernels")
    counts = dict.fromkeys(names, 0)
    linear4bit = _optional.require("bitsandbytes").nn.Linear4bit if "nf4" in names and _optional.available("bitsandbytes") else None
    for module in base.modules():
        cls = type(module).__name__
        if "rmsnorm" in names and cls == spec.norm:
            _bind(module, _rmsnorm_forward, "rmsnorm")
            counts["rmsnorm"] += 1
        elif "swiglu" in names and cls == spec.mlp:
            _bind(module, _mlp_forward, "swiglu")
            counts["swiglu"] += 1
        elif "rope" in names and cls == spec.attention:
            _bind(module, _attention_forward, "rope")
            module._harness_sliding_window = spec.sliding_window
            counts["rope"] += 1
        elif linear4bit is not None and isinstance(module, linear4bit):  # peft's LoRA base_layer (peft's wrapper is also "Linear4bit")
            _bind(module, _nf4_linear_forward, "nf4")
            counts["nf4"] += 1
    if "linear_cross_entropy" in names:
        head = base.lm_head
        if type(head) is not torch.nn.Linear:
            raise ValueError(f"linear_cross_entropy needs a plain nn.Linear lm_head, found {type(head).__name__} "
                             "(LoRA or quantisation on the head?); drop linear_cross_entropy from kernels")
        _bind(head, _lm_head_forward, "linear_cross_entropy")
        _bind(base, _causal_lm_forward, "linear_cross_entropy")
        counts["linear_cross_entropy"] = 1
    if not explicit and counts.get("nf4") == 0:
        del counts["nf4"]
    missing = [k for k, n in counts.items() if n == 0]
    if missing:
        raise ValueError(f"kernels {missing} found no module to patch in {spec.causal_lm} (nf4 needs 4-bit layers: method=qlora)")
    return counts


def remove_kernels(model: torch.nn.Module) -> int:
    """Undo apply_kernels: the class forwards come back. Returns the number of modules restored."""
    restored = 0
    for module in _base_model(model).modules():
        if hasattr(module, "_harness_kernel"):
            del module.forward, module._harness_kernel
            module.__dict__.pop("_harness_sliding_window", None)
            restored += 1
    return restored


def fused_loss_enabled(model: torch.nn.Module) -> bool:
    """Whether the model takes `token_targets` and returns the loss sum (linear_cross_entropy on)."""
    return getattr(_base_model(model), "_harness_kernel", None) == "linear_cross_entropy"
