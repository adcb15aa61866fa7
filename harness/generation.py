"""What the model says: greedy answers to validation prompts, scored by exact match.

A validation sample is (input_ids, targets) with -100 on the prompt (harness/data). Its prompt is
every token before the first learned one, and its expected answer is the first run of learned tokens,
decoded without special tokens (so the EOS that ends an answer is not part of it). The model answers
each prompt greedily until an end token (the tokenizer's EOS, the model's generation-config EOS ids,
and the special token that ends the expected answers, such as a chat template's end of turn) or
`max_new_tokens`; an answer is correct when it equals the expected one after stripping surrounding
whitespace. That needs a prompt: formats alpaca, completion and chat (the first assistant turn);
config.validate refuses `text` and `train_on_inputs`, where every token is learned.

Batching does not depend on the world size: samples are cut into batches of `batch_size`
consecutive prompts (left-padded), and batch k runs on rank k % world_size. The answers are then the
same on 1 or N ranks, and a plain transformers / peft model given the same batches reproduces them.
Under ZeRO-3 there are two ways to run the model:
- `gathered` (default): the whole model is gathered on every rank once for the pass, and each rank
  generates on its own. Fast, but every rank then holds all the (4-bit) weights for a while.
- layer by layer: ZeRO-3 gathers each module's weights for every generated token, as in training,
  so memory stays at a rank's shard; every rank runs the same number of `generate` calls (ranks
  short of batches repeat batch 0 and discard it) with `synced_gpus`, so the gathers stay in step.
  On CPU with gloo each gather costs about a millisecond, hundreds of times per token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from harness.data import IGNORE_INDEX


@dataclass
class Answer:
    index: int  # position in the validation set
    prompt: str
    expected: str
    answer: str

    @property
    def correct(self) -> bool:
        return self.answer == self.expected


def samples_to_show(answers: list[Answer], count: int = 3) -> list[Answer]:
    """The answers a log shows: up to count - 1 right ones (what training taught) and the first wrong
    ones to fill count (what it did not), in validation order; the first `count` when all are alike."""
    right = [a for a in answers if a.correct]
    wrong = [a for a in answers if not a.correct]
    shown = right[: count - 1] if wrong else right[:count]
    return sorted(shown + wrong[: count - len(shown)], key=lambda a: a.index)


def split_prompt(sample) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids, expected answer ids) of a validation sample. targets[t] is the token at t + 1."""
    ids, targets = sample[0], sample[1]
    learned = (targets != IGNORE_INDEX).nonzero().flatten()
    assert len(learned), "the data pipeline drops samples without learned tokens"
    first = int(learned[0])
    gaps = (learned[1:] - learned[:-1] != 1).nonzero().flatten()
    last = int(learned[gaps[0]]) if len(gaps) else int(learned[-1])
    return ids[: first + 1], targets[first : last + 1]


def batches(num_samples: int, batch_size: int, world_size: int, rank: int) -> list[tuple[list[int], bool]]:
    """This rank's generation batches as (sample indices, is_real): consecutive groups of batch_size,
    batch k on rank k % world_size; every rank gets the same number, filler ones repeat batch 0."""
    groups = [list(range(a, min(a + batch_size, num_samples))) for a in range(0, num_samples, batch_size)]
    per_rank = -(-len(groups) // world_size)
    return [(groups[k], True) if k < len(groups) else (groups[0], False) for k in range(rank, per_rank * world_size, world_size)]


def end_tokens(model, tokenizer, expected: list[torch.Tensor]) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS, the model's generation-config EOS ids (Llama 3
    chat ends a turn with <|eot_id|>, not its EOS), and the special tokens the expected answers end with."""
    ids = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        ids.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    special = set(tokenizer.all_special_ids)
    ids.update(int(e[-1]) for e in expected if len(e) and int(e[-1]) in special)
    return sorted(ids)


def left_pad(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, max_len): prompts end at the right edge, where generation continues."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


_HOOK_API = ("_remove_module_hooks", "setup_zero_stage3_hooks", "forward_hooks", "backward_hooks")  # DeepSpeed 0.19


def can_gather(engine) -> bool:
    """Whether this DeepSpeed has the ZeRO-3 hook API whole_model_gathered switches off and on again."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    return offload is not None and all(hasattr(offload, a) for a in _HOOK_API)


@contextlib.contextmanager
def whole_model_gathered(engine):
    """Every ZeRO-3 parameter of the engine's module gathered on this rank, and ZeRO-3's module hooks
    off, for the duration (call on all ranks: the gather and the re-partition are collectives).

    With the hooks on, each forward would fetch and release every module's weights again, and record
    its module order into ZeRO-3's prefetch trace: `generate` never calls the root module's forward,
    where ZeRO-3 closes a step, so a whole generation pass becomes one huge trace that the next training
    step then walks per module (measured: step 1 after 64 answers took 96 s instead of 15 s). The hooks
    are registered again on the way out, which also invalidates the trace, so training re-records it.
    """
    import deepspeed
    from deepspeed.runtime.zero import parameter_offload

    offload = engine.optimizer.parameter_offload  # DeepSpeedZeRoOffload: owns ZeRO-3's module hooks
    params = [p for p in engine.module.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params):  # sync point: one coalesced all-gather
        offload._remove_module_hooks()
        try:
            yield
        finally:
            offload.forward_hooks, offload.backward_hooks = [], []
            if offload.module in parameter_offload.FWD_MODULE_STACK:  # set up again below; keep one entry
                parameter_offload.FWD_MODULE_STACK.remove(offload.module)
            offload.setup_zero_stage3_hooks()


@contextlib.contextmanager
def zero3_step_per_forward(engine):
    """Layer-by-layer generation under ZeRO-3 (ranks in step): close a ZeRO-3 step at every forward of
    the model `generate` calls, as ZeRO-3 does at every forward of the root module (a peft wrapper,
    whose forward `generate` skips), so its prefetch trace stays one forward long."""
    root = engine.module
    inner = root.get_base_model() if hasattr(root, "get_base_model") else root
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if inner is root or not hasattr(offload, "get_param_coordinator"):
        yield
        return
    coordinator = offload.get_param_coordinator()
    handle = inner.register_forward_pre_hook(lambda _module, _args: coordinator.reset_step(), prepend=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def greedy_answers(model, tokenizer, samples, *, count: int, batch_size: int, max_new_tokens: int, world_size: int = 1,
                   rank: int = 0, synced: bool = False, device: torch.device | None = None) -> list[Answer]:
    """This rank's answers to the first `count` validation samples (call on every rank together when
    `synced`: ZeRO-3 across ranks). `model` is a transformers / peft causal LM in eval mode."""
    count = min(count, len(samples))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = end_tokens(model, tokenizer, [split_prompt(samples[i])[1] for i in range(count)])
    out = []
    for idx, is_real in batches(count, batch_size, world_size, rank):
        if not (is_real or synced):  # a filler batch only keeps ZeRO-3's collective gathers in step
            continue
        split = [split_prompt(samples[i]) for i in idx]
        ids, mask = left_pad([p for p, _ in split], pad_id)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=stop, use_cache=True, synced_gpus=synced)
        if not is_real:
            continue
        for i, (prompt, expected), row in zip(idx, split, gen[:, ids.shape[1]:].cpu()):
            out.append(Answer(i, tokenizer.decode(prompt, skip_special_tokens=True),
                              tokenizer.decode(expected, skip_special_tokens=True).strip(),
                              tokenizer.decode(row, skip_special_tokens=True).strip()))
    return out
