"""Independent references for the harness's numbers: plain torch, transformers, peft and bitsandbytes.

Nothing here imports `harness`. Rows are rendered and tokenised here from the documented formats
(README "Data"), each sample runs alone (no padding, no packing), attention is eager (the harness
runs sdpa), losses are summed in fp32 and normalised by the number of learned tokens, and the
optimizer step is torch's AdamW after torch's gradient clipping. So a harness figure that matches one
of these was computed right, not merely computed the same way twice.

QLoRA has two references: the model quantised by transformers + bitsandbytes (`Linear4bit`, what a
user of plain transformers gets), and that model dequantised into plain fp32 `Linear` weights, on
which gradients are computed by ordinary autograd.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

IGNORE = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


# ---- data ----------------------------------------------------------------------------------------

def read_jsonl(path, n: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:n] if n else rows


def alpaca_prompt(row: dict) -> str:
    tmpl = ALPACA_PROMPT_WITH_INPUT if row.get("input") else ALPACA_PROMPT
    return tmpl.format(instruction=row["instruction"], input=row.get("input", ""))


def alpaca_example(row: dict, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (T,), labels (T,)) of one alpaca row: the text is prompt + output + EOS, and a token is
    learned when its first character lies in output + EOS. Labels are unshifted (HF convention)."""
    prompt = alpaca_prompt(row)
    text = prompt + row["output"] + tokenizer.eos_token
    enc = tokenizer(text, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"])
    starts = torch.tensor([s for s, _ in enc["offset_mapping"]])
    labels = torch.where(starts >= len(prompt), ids, torch.full_like(ids, IGNORE))
    return ids, labels


def examples(rows: list[dict], tokenizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [alpaca_example(r, tokenizer) for r in rows]


# ---- models --------------------------------------------------------------------------------------

@dataclass
class Lora:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: object = "all-linear"


def keep_bnb_layout(model) -> None:
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel at the first eval-mode forward on
    an AVX512-BF16 CPU; that path has no input gradient and another layout. Its own switch keeps the
    standard layout, so the reference computes what the published QLoRA method computes."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def load_base(path, quantized: bool, attn: str = "eager", auto=None, **config):
    """fp32 CausalLM (or another `auto` class, with `config` settings) from `path`; `quantized`: NF4 with
    double quantisation, fp32 compute and storage. Eager attention by default (the harness runs sdpa);
    generation checks use transformers' default, sdpa."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = dict(dtype=torch.float32, attn_implementation=attn, **config)
    if quantized:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
        kw["device_map"] = {"": "cpu"}
    model = (auto or AutoModelForCausalLM).from_pretrained(str(path), **kw)
    keep_bnb_layout(model)
    model.config.use_cache = False
    return model


def dequantized(model):
    """The same network with every 4-bit weight replaced by its fp32 dequantisation (plain Linear)."""
    return model.dequantize(dtype=torch.float32)


def with_lora(model, lora: Lora, init: dict[str, torch.Tensor] | None = None):
    """peft LoRA on `model`; `init` (name -> tensor) sets the adapters' starting values."""
    import peft

    cfg = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.targets,
                          task_type="CAUSAL_LM", bias="none")
    model = peft.get_peft_model(model, cfg)
    if init is not None:
        set_trainable(model, init)
    return model


class SoftPrompt(torch.nn.Module):
    """Prompt tuning written out in plain torch: P trainable embeddings put before the token embeddings of
    a frozen causal LM; `logits` are those of the T real positions. The prompt's parameter has peft's
    name (prompt_encoder.default.embedding.weight), so gradients compare by name."""

    def __init__(self, model, prompt: torch.Tensor):
        super().__init__()
        for p in model.parameters():
            p.requires_grad_(False)
        self.base = model
        embedding = torch.nn.Embedding(*prompt.shape)
        with torch.no_grad():
            embedding.weight.copy_(prompt)
        self.prompt_encoder = torch.nn.ModuleDict({"default": torch.nn.ModuleDict({"embedding": embedding})})

    def forward(self, input_ids):
        prompt = self.prompt_encoder["default"]["embedding"].weight
        tokens = self.base.get_input_embeddings()(input_ids)  # (B, T, H)
        embeds = torch.cat([prompt[None].expand(len(input_ids), -1, -1).to(tokens.dtype), tokens], dim=1)  # (B, P + T, H)
        logits = self.base(inputs_embeds=embeds).logits[:, len(prompt):]
        return type("Output", (), {"logits": logits})()


class PeftSoftPrompt(torch.nn.Module):
    """The same soft prompt through plain peft's own prompt tuning (PromptTuningConfig, CAUSAL_LM) instead of
    the concatenation written out above: `logits` of the T real positions (peft returns P + T)."""

    def __init__(self, model, prompt: torch.Tensor):
        import peft

        super().__init__()
        self.peft_model = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=len(prompt)))
        with torch.no_grad():
            self.peft_model.prompt_encoder["default"].embedding.weight.copy_(prompt)
        self.virtual = len(prompt)

    def forward(self, input_ids):
        logits = self.peft_model(input_ids=input_ids).logits[:, self.virtual:]
        return type("Output", (), {"logits": logits})()


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def set_trainable(model, values: dict[str, torch.Tensor]) -> None:
    params = trainable(model)
    if set(params) != set(values):
        raise AssertionError(f"trainable tensors differ: only in the model {sorted(set(params) - set(values))[:3]}, "
                             f"only in the values {sorted(set(values) - set(params))[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(values[n])


# ---- numbers -------------------------------------------------------------------------------------

def loss_sum(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of one sample, in fp32."""
    logits = model(input_ids=ids[None]).logits[0, :-1].float()
    return F.cross_entropy(logits, labels[1:], ignore_index=IGNORE, reduction="sum")


def n_targets(exs) -> int:
    return sum(int((lab[1:] != IGNORE).sum()) for _, lab in exs)


@torch.no_grad()
def mean_loss(model, exs) -> float:
    """Token-weighted mean loss over the samples, each run alone, in eval mode."""
    model.eval()
    total = sum(float(loss_sum(model, ids, lab)) for ids, lab in exs)
    return total / n_targets(exs)


def gradients(model, exs) -> dict[str, torch.Tensor]:
    """d(mean token loss over all samples)/d(every trainable tensor), dropout off."""
    model.eval()  # what the harness's runs here use: lora.dropout 0 and no dropout in the base model
    model.zero_grad(set_to_none=True)
    denom = n_targets(exs)
    for ids, lab in exs:
        (loss_sum(model, ids, lab) / denom).backward()
    return {n: p.grad.detach().clone() for n, p in trainable(model).items()}


def adamw_step(model, grads: dict[str, torch.Tensor], lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
               max_grad_norm: float = 1.0, state: dict | None = None) -> dict:
    """One torch AdamW step from `grads` after global-norm clipping; returns the optimizer to reuse."""
    params = trainable(model)
    opt = state or torch.optim.AdamW(list(params.values()), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    for n, p in params.items():
        p.grad = grads[n].clone()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
    opt.step()
    model.zero_grad(set_to_none=True)
    return opt


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||; 0 when both are exactly zero (LoRA A at step 1, where B = 0)."""
    diff = float(torch.linalg.vector_norm((got.float() - want.float()).flatten()))
    norm = float(torch.linalg.vector_norm(want.float().flatten()))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm


def worst_gradient_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    if set(got) != set(want):
        raise AssertionError(f"gradients of different tensors: only harness {sorted(set(got) - set(want))[:3]}, "
                             f"only reference {sorted(set(want) - set(got))[:3]}")
    errs = {n: relative_error(got[n], want[n]) for n in want}
    name = max(errs, key=errs.get)
    return errs[name], name


# ---- generation ----------------------------------------------------------------------------------

@torch.no_grad()
def greedy_answers(model, tokenizer, rows: list[dict], max_new_tokens: int = 24, batch: int = 16) -> list[str]:
    """Greedy continuations of the rows' alpaca prompts up to EOS, stripped (plain transformers generate)."""
    model.eval()
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(rows), batch):
        enc = tokenizer([alpaca_prompt(r) for r in rows[i : i + batch]], return_tensors="pt", padding=True)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        out += [t.strip() for t in tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out
