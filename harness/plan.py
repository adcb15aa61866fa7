"""The run plan: every decision a run takes from its recipe, DeepSpeed file, world size and machine,
taken once, here.

    machine = Machine.detect(world_size)
    plan = resolve_plan(recipe, world_size, machine, model_cfg)
    plan.precision, plan.attn, plan.loader, plan.zero_stage, plan.micro_batch_size, plan.ds ...

`train.py` builds the run from the plan, the memory budget models the plan (`memory.setup_from_plan`),
`--dry-run` prints it with the reason for every "auto" (`plan.lines()`), and the tools read it. Nothing
else decides these again: a budget that modelled flash-attn while the run trained with sdpa (flash-attn
not importable) under-predicted the peak by 1.4-12 GiB.

Budget-driven "auto" (train.gradient_checkpointing, train.micro_batch_size): the least recomputation
(none, then every_k from the largest k down, then full), then the largest micro-batch that divides the
per-rank batch, that the budget says fits the device with its safety margin. The device is the GPU on
CUDA and this rank's share of host RAM on CPU.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from harness.config import ConfigError, Recipe

AUTO = "auto"


@dataclass(frozen=True)
class Machine:
    """What the run can use on this machine (or, for the memory CLI, on the target machine)."""

    device: str = "cpu"  # cuda | cpu
    flash_attn: bool = False  # flash-attn imports and CUDA is there
    device_memory_bytes: int | None = None  # one rank's memory: the GPU's, or its share of host RAM on CPU; None = unknown

    @classmethod
    def detect(cls, world_size: int = 1) -> "Machine":
        import torch

        from harness import _optional

        if torch.cuda.is_available():
            return cls("cuda", _optional.flash_attn_usable(), int(torch.cuda.get_device_properties(0).total_memory))
        return cls("cpu", False, host_ram_per_rank_bytes(world_size))


def host_ram_per_rank_bytes(world_size: int) -> int | None:
    """This host's RAM (its cgroup limit when lower) shared by the ranks on it."""
    try:
        import psutil

        total = int(psutil.virtual_memory().total)
    except Exception:  # no psutil / no /proc: unknown, so auto settings take their safe values
        return None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(path).read().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or world_size)
    return total // max(local, 1)


@dataclass(frozen=True)
class RunPlan:
    """Every resolved run decision. `why` holds one line per decision that was "auto" (or forced)."""

    world_size: int
    device: str
    precision: str
    attn: str
    packed: bool  # data.packing: samples concatenated into rows of seq_len
    flat_batches: bool  # micro-batches laid out as one unpadded row (padding_free, or packing under flash-attn)
    loader: str  # streamed | hf
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    micro_batch_size: int
    grad_accum: int
    eval_batch_size: int  # validation samples per rank per forward
    gradient_checkpointing: str  # none | full | every_k
    checkpoint_every_k: int
    kernels: tuple  # kernel names (harness/kernels)
    kernels_explicit: bool  # listed by name (False: "all", which skips kernels the model has nothing for)
    ds: dict  # the DeepSpeed config deepspeed.initialize receives, no "auto" left
    device_memory_bytes: int | None = None
    why: dict = field(default_factory=dict)
    warnings: tuple = ()  # what the run may do but the user should know (logged with the plan)

    @property
    def layout(self) -> str:
        return "one unpadded row per micro-batch" if self.flat_batches else "packed rows" if self.packed else "padded rows"

    def with_ds(self, ds: dict) -> "RunPlan":
        return dataclasses.replace(self, ds=ds)

    def lines(self) -> list[str]:
        """The plan, one decision per line, with why each "auto" became what it is."""
        ckpt = self.gradient_checkpointing + (f" (k={self.checkpoint_every_k})" if self.gradient_checkpointing == "every_k" else "")
        rows = [
            ("precision", self.precision), ("attention", self.attn), ("batch layout", self.layout),
            ("loader", self.loader), ("zero_stage", self.zero_stage),
            ("offload", ", ".join(n for n, on in (("optimizer", self.offload_optimizer), ("parameters", self.offload_param)) if on) or "none"),
            ("micro_batch_size", self.micro_batch_size), ("grad_accum", self.grad_accum), ("eval_batch_size", self.eval_batch_size),
            ("gradient_checkpointing", ckpt), ("kernels", ", ".join(self.kernels) or "none"),
        ]
        out = [f"world_size: {self.world_size} on {self.device}"
               + (f" ({self.device_memory_bytes / 2**30:.1f} GiB per rank)" if self.device_memory_bytes else "")]
        for key, value in rows:
            reason = self.why.get(key)
            out.append(f"{key}: {value}" + (f"  # {reason}" if reason else ""))
        return out + [f"warning: {w}" for w in self.warnings]


def resolve_precision(requested: str, device: str) -> tuple[str, str | None]:
    if requested != AUTO:
        return requested, None
    if device == "cuda":
        return "bf16", "auto: bf16 on CUDA"
    return "fp32", "auto: fp32 on CPU (CPU bf16 matmuls are slow, and fp32 keeps runs comparable with references)"


def resolve_attn(requested: str, machine: Machine, precision: str) -> tuple[str, str | None]:
    if requested != AUTO:
        if requested == "flash_attention_2" and not machine.flash_attn:
            raise ConfigError("model.attn_implementation=flash_attention_2 but flash-attn is not usable here (it needs CUDA and "
                              "`pip install flash-attn --no-build-isolation`); set model.attn_implementation=sdpa or auto")
        return requested, None
    if machine.device == "cuda" and precision in ("bf16", "fp16"):
        if machine.flash_attn:
            return "flash_attention_2", "auto: flash-attn imports, CUDA, 16-bit"
        return "sdpa", "auto: flash-attn is not importable here (pip install flash-attn for varlen packing)"
    return "sdpa", f"auto: flash-attn needs CUDA and 16-bit ({machine.device}, {precision})"


def resolve_kernels(value) -> tuple[tuple, bool]:
    """The one check of recipe `kernels` ("all", a name or a list of names): (names, listed by name)."""
    import difflib

    from harness.config import KERNELS

    if value == "all":
        return tuple(KERNELS), False
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)):
        raise ConfigError(f"kernels must be a list of {', '.join(KERNELS)} or 'all'; got {value!r}")
    for name in names:
        if name not in KERNELS:
            close = difflib.get_close_matches(str(name), KERNELS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"kernels: unknown kernel '{name}'; {hint}kernels are: {', '.join(KERNELS)} or 'all'")
    if len(set(names)) != len(names):
        raise ConfigError(f"kernels lists a name twice: {list(names)}")
    return tuple(names), True


def micro_batch_choices(recipe: Recipe, world_size: int) -> list[int]:
    """Micro-batches that divide the per-rank share of the global batch, largest first."""
    per_rank = recipe.train.global_batch_size // world_size
    return [m for m in range(per_rank, 0, -1) if per_rank % m == 0]


def checkpointing_choices(recipe: Recipe, n_layers: int) -> list[tuple[str, int]]:
    """(policy, k) from the least recomputation to the most: none, every_k with k = layers .. 2, full."""
    t = recipe.train
    if t.gradient_checkpointing != AUTO:
        return [(t.gradient_checkpointing, t.checkpoint_every_k)]
    every_k, counts = [], set()
    for k in range(n_layers, 1, -1):  # k and k' that checkpoint as many layers cost the same: keep the larger
        n = len(range(0, n_layers, k))
        if n not in counts:
            counts.add(n)
            every_k.append(("every_k", k))
    return [("none", t.checkpoint_every_k), *every_k, ("full", t.checkpoint_every_k)]


def resolve_plan(recipe: Recipe, world_size: int, machine: Machine, model_cfg: dict, *, src: str | None = None) -> RunPlan:
    """The run's plan. `recipe` passed config.validate for this world size."""
    from harness.config import load_ds_json
    from harness.deepspeed_config import offloads, resolve_ds_config, zero_stage

    t, why = recipe.train, {}
    src = src or recipe.deepspeed.config
    ds_file = load_ds_json(recipe.deepspeed.config)
    precision, why["precision"] = resolve_precision(t.precision, machine.device)
    attn, why["attn"] = resolve_attn(recipe.model.attn_implementation, machine, precision)
    why["attention"] = why.pop("attn")
    stage = zero_stage(ds_file)
    loader = recipe.model.loader
    if loader == AUTO:
        loader = "streamed" if stage == 3 else "hf"
        why["loader"] = "auto: ZeRO-3 partitions layer by layer as it reads (streamed)" if stage == 3 else "auto: from_pretrained (no ZeRO-3)"
    kernels, explicit = resolve_kernels(recipe.kernels)
    if recipe.task == "classification" or recipe.method == "prompt_tuning":  # no per-position fused loss (listing it is refused in config)
        kernels = tuple(k for k in kernels if k != "linear_cross_entropy")
    flat = bool(recipe.data.padding_free or (recipe.data.packing and attn == "flash_attention_2"))
    if recipe.data.packing and not flat:
        why["batch layout"] = f"packed rows with a block-diagonal mask ({attn} has no varlen path)"
    warnings = []
    max_pos = model_cfg.get("max_position_embeddings")
    if isinstance(max_pos, int) and recipe.data.seq_len > max_pos:
        warnings.append(f"data.seq_len={recipe.data.seq_len} exceeds the model's max_position_embeddings={max_pos}: positions past it "
                        "are extrapolated by RoPE, which the model was not trained on (lower data.seq_len, or extend the context on purpose)")
    base = dict(world_size=world_size, device=machine.device, precision=precision, attn=attn, packed=bool(recipe.data.packing),
                flat_batches=flat, loader=loader,
                zero_stage=stage, offload_optimizer=offloads(ds_file, "offload_optimizer"),
                offload_param=offloads(ds_file, "offload_param"),
                kernels=kernels, kernels_explicit=explicit, device_memory_bytes=machine.device_memory_bytes, warnings=tuple(warnings))
    hidden = int(model_cfg["hidden_size"])

    def plan_for(micro: int, policy: str, k: int) -> RunPlan:
        ds = resolve_ds_config(ds_file, recipe, world_size=world_size, hidden_size=hidden, precision=precision,
                               on_cuda=machine.device == "cuda", micro_batch_size=micro, src=src)
        return RunPlan(**base, micro_batch_size=micro, grad_accum=ds["gradient_accumulation_steps"],
                       eval_batch_size=recipe.eval.batch_size or micro, gradient_checkpointing=policy, checkpoint_every_k=k, ds=ds,
                       why=dict(why))

    micros = [t.micro_batch_size] if t.micro_batch_size != AUTO else micro_batch_choices(recipe, world_size)
    pinned = ds_file.get("train_micro_batch_size_per_gpu", AUTO)
    if t.micro_batch_size == AUTO and pinned != AUTO:
        micros = [m for m in micros if m == pinned] or micros  # the DeepSpeed file decides (a mismatch is an error below)
    policies = checkpointing_choices(recipe, int(model_cfg["num_hidden_layers"]))
    if len(micros) == 1 and len(policies) == 1:
        return plan_for(micros[0], *policies[0])
    return _fit_auto(recipe, machine, model_cfg, micros, policies, plan_for)


def _fit_auto(recipe: Recipe, machine: Machine, model_cfg: dict, micros: list[int], policies: list[tuple[str, int]], plan_for) -> RunPlan:
    """The first (policy, micro-batch) in preference order that the memory budget says fits."""
    from harness import memory

    t = recipe.train
    auto_ckpt, auto_micro = t.gradient_checkpointing == AUTO, t.micro_batch_size == AUTO
    what = " and ".join(n for n, on in (("gradient_checkpointing", auto_ckpt), ("micro_batch_size", auto_micro)) if on)
    safe = plan_for(micros[-1], *policies[-1])  # the least memory: most recomputation, smallest micro-batch
    if machine.device_memory_bytes is None:
        return _explained(safe, auto_ckpt, auto_micro, "auto: the device memory is unknown here, so the safe value")
    try:
        shape = memory.ModelShape.from_config(model_cfg, name=str(recipe.model.path))
        tried = 0
        for policy, k in policies:
            for micro in micros:
                plan = plan_for(micro, policy, k)
                b = memory.budget_for_plan(recipe, plan, shape=shape)
                if b.fits:
                    before = f"the {tried} with less recomputation or a larger micro-batch do not" if tried else "the first choice"
                    return _explained(plan, auto_ckpt, auto_micro,
                                      f"auto: budget peak {b.peak_bytes / 2**30:.2f} GiB ({b.peak_phase}) + "
                                      + (f"{b.uncertainty:.0%} uncalibrated-GPU band + " if b.uncertainty else "")
                                      + f"{b.safety_margin:.0%} margin "
                                      f"fits {b.device_memory_bytes / 2**30:.2f} GiB per rank; {before}")
                tried += 1
    except (ValueError, KeyError) as e:  # an architecture the budget does not model
        return _explained(safe, auto_ckpt, auto_micro, f"auto: the memory budget cannot model this model ({e}), so the safe value")
    return _explained(safe, auto_ckpt, auto_micro, f"auto: nothing fits {machine.device_memory_bytes / 2**30:.2f} GiB per the budget "
                                                   f"(its {what} search), so the least memory")


def _explained(plan: RunPlan, auto_ckpt: bool, auto_micro: bool, reason: str) -> RunPlan:
    why = dict(plan.why)
    if auto_ckpt:
        why["gradient_checkpointing"] = reason
    if auto_micro:
        why["micro_batch_size"] = reason if not auto_ckpt else "auto: the largest that fits with that checkpointing (see gradient_checkpointing)"
    return dataclasses.replace(plan, why=why)
