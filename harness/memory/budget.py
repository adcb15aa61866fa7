"""Compose a per-rank budget: parameters, gradients, optimizer states and ZeRO buffers (closed forms of
what DeepSpeed allocates) plus an ActivationProfile (analytic or traced), per phase, with a verdict."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from harness.memory.analytic import (
    GIB, INT8_BYTES_PER_PARAM, NF4_DQ_BYTES_PER_PARAM, ActivationProfile, Cluster, ModelShape, TrainSetup, activation_profile,
    adapter_layer_numel, head_numel, logit_width, total_numel,
)

PHASES = ("load", "forward", "backward", "step")  # training; "eval" and "generate" join them when the recipe asks
EVAL, GENERATE = "eval", "generate"
# GPU-only constants (not measurable on CPU; published estimates, to be calibrated on a GPU: PyTorch's CUDA
# context on H100-class GPUs, NVIDIA/nccl issue #964 for the communicators):
CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context + cuBLAS workspace on H100-class GPUs
NCCL_BYTES_PER_COMMUNICATOR = 700 * 2**20  # NCCL #964: 544-688 MB per communicator
ALLOCATOR_MARGIN = 0.10  # caching-allocator fragmentation reserve on top of allocated bytes
# The verdict asks for this much above the predicted peak: the CPU-measured error band is -2.7%..+2.1%
# (tests/distributed/test_memory_measured.py), so 3% keeps every measured configuration from a false "fits".
SAFETY_MARGIN = 0.03
# On CUDA the budget is uncalibrated: set against 34 published, fully specified GPU runs of the Hugging Face stack
# (issue 19: PEFT docs ZeRO-3 / FSDP QLoRA of Llama-2-70B, Answer.AI fsdp_qlora benchmarks, ...) it erred by a median
# 11.5-13.2% and at worst -24.9% ((predicted - measured) / measured: that run needed 1 / (1 - 0.249) = 1.33 x the
# prediction), and the CUDA context, NCCL and allocator terms above are published estimates, not measured here.
# Until a GPU calibrates them (the GPU issue), "fits" on CUDA needs the prediction x (1 + this) (plus the safety margin)
# to fit; a run whose point estimate fits but whose upper end does not is "may not fit": training warns and goes on,
# `auto` settings pick a choice whose upper end fits.
GPU_UNCALIBRATED_BAND = 0.33


@dataclass
class Line:
    name: str
    category: str  # params | grads | optimizer | zero | activations | runtime | host
    bytes: float
    phases: tuple = PHASES  # phases in which this line is resident
    note: str = ""


@dataclass
class Budget:
    model: str
    engine: str
    world_size: int
    device: str
    lines: list = field(default_factory=list)  # per-rank Lines
    host_lines: list = field(default_factory=list)  # per-host Lines
    phase_bytes: dict = field(default_factory=dict)
    peak_bytes: int = 0
    peak_phase: str = ""
    device_memory_bytes: int | None = None
    host_ram_bytes: int | None = None
    host_bytes: int = 0
    fits: bool | None = None  # the upper end of the uncertainty band (+ the safety margin) fits
    safety_margin: float = SAFETY_MARGIN
    headroom_bytes: int | None = None  # of the point estimate (+ the safety margin)
    uncertainty: float = 0.0  # the band's upper end as a fraction of the peak: GPU_UNCALIBRATED_BAND on CUDA, 0 on CPU (measured)
    verdict: str = ""  # "fits" | "may not fit" (the point estimate fits, the band's upper end does not) | "does not fit"
    activations: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _trainable_numel(m: ModelShape, t: TrainSetup) -> int:
    if not t.peft:
        return total_numel(m, t)
    # A classifier's head trains with the adapters (harness/model.py make_head_trainable); a soft prompt is
    # (P, hidden) embeddings.
    return adapter_layer_numel(m, t) * m.layers + (head_numel(m, t) if t.num_labels else 0) + t.virtual_tokens * m.hidden


def _mark_resident(lines: list, extra_phases: tuple) -> None:
    """Add `extra_phases` to the lines resident the whole run (weights, gradient partition, buffers, Adam
    m and v from the first step on) and to bitsandbytes' transient dequantised weight (any forward)."""
    for ln in lines:
        always = ln.phases == PHASES or (ln.category == "optimizer" and "step" in ln.phases and ln.phases != ("step",))
        if always or ln.name.startswith("dequantised weight"):
            ln.phases = ln.phases + extra_phases


def _eval_lines(m: ModelShape, t: TrainSetup, gathered_bytes: float) -> list:
    """A validation forward with eval.batch_size > micro_batch (no grad): the weights gathered as in a
    training forward, one layer's transient activations, and the logits with their fp32 copy (the loss
    in fp32), unless the fused loss takes them in chunks."""
    d, tokens = t.dtype_bytes, t.eval_batch * (t.eval_seq_len or t.seq_len)
    logits_bytes = 0 if t.fused_loss else tokens * logit_width(m, t) * (d + 4)
    out = [Line("eval forward: one layer's activations + logits", "activations", 3 * tokens * m.intermediate * d + logits_bytes,
                phases=(EVAL,), note=f"eval.batch_size {t.eval_batch} x seq {t.seq_len}")]
    if gathered_bytes:
        out.append(Line("gathered parameters (eval)", "zero", gathered_bytes, phases=(EVAL,)))
    return out


def _generation_lines(m: ModelShape, t: TrainSetup, n: int, full_bytes: float, gathered_bytes: float) -> list:
    """The eval's greedy generation (harness/generation.py): the weights gathered for it, the KV cache,
    one layer's activations over the prompts and the last position's logits."""
    d = t.dtype_bytes
    out = []
    if t.zero_stage == 3 and n > 1:
        if t.generate_gather:
            out.append(Line("whole model gathered for generation", "zero", full_bytes, phases=(GENERATE,),
                            note="eval.generate_gather: every weight (4-bit, 16-bit and LoRA) on every rank while answering"))
        else:
            out.append(Line("gathered parameters (generation, layer by layer)", "zero", gathered_bytes, phases=(GENERATE,)))
    kv_bytes = 2 * m.layers * m.kv_dim * t.generate_tokens * t.generate_batch * d
    out.append(Line("KV cache (generation)", "activations", kv_bytes, phases=(GENERATE,),
                    note=f"{t.generate_batch} prompts x {t.generate_tokens} tokens, K and V of every layer"))
    # The prompts' forward (no grad): one layer's transient activations at a time, the widest being the
    # MLP (gate, up, their product: 3 x intermediate per token); then the last position's logits and
    # generate's fp32 copy of them.
    prefill_bytes = 3 * t.generate_batch * t.generate_tokens * m.intermediate * d
    logits_bytes = t.generate_batch * m.vocab * (d + 4)
    out.append(Line("prompt forward + last logits (generation)", "activations", prefill_bytes + logits_bytes, phases=(GENERATE,)))
    return out


def compose(m: ModelShape, t: TrainSetup, world_size: int, profile: ActivationProfile | None = None, *,
            cluster: Cluster | None = None, host_data_bytes: int = 0, safety_margin: float = SAFETY_MARGIN) -> Budget:
    """The budget of one rank (ZeRO partitions are taken as even: Psi/N, padding ignored)."""
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    profile = profile or activation_profile(m, t)
    d = t.dtype_bytes
    n = world_size if t.zero_stage == 3 else 1
    n_opt = world_size if t.zero_stage >= 1 else 1
    n_grad = world_size if t.zero_stage >= 2 else 1
    trainable = _trainable_numel(m, t)
    linear = m.layers * m.layer_linear_numel()
    small = m.layers * m.layer_small_numel() + m.hidden
    embed_head = m.embed_numel() + head_numel(m, t)
    trained_head = head_numel(m, t) if t.peft and t.num_labels else 0  # in `trainable`, not frozen
    lines: list[Line] = []
    gpu = t.device == "cuda"

    # --- parameters (compute-dtype copies, ZeRO-3 partitions them all, frozen ones included) ---
    if t.method == "qlora":
        lines.append(Line("frozen 4-bit weights + quant constants", "params", linear * NF4_DQ_BYTES_PER_PARAM / n,
                          note="NF4 + double quant: 0.516 B/param; packed in the compute dtype, ZeRO-3 partitioned"))
    elif t.method == "int8":
        lines.append(Line("frozen int8 weights + scales", "params", linear * INT8_BYTES_PER_PARAM / n))
    frozen16 = (embed_head - trained_head + small) if t.peft else 0
    if t.method == "lora":
        frozen16 += linear
    if frozen16:
        lines.append(Line("frozen 16-bit weights" if d == 2 else "frozen weights", "params", frozen16 * d / n,
                          note="embeddings, lm_head, norms" + (", linears" if t.method == "lora" else "")))
    lines.append(Line("trainable weights", "params", trainable * d / n))
    # Offloaded state leaves the accelerator; on CPU the "device" is host RAM, so it stays in the device total.
    if t.offload_param and t.zero_stage == 3 and gpu:  # ZeRO-Infinity: partitions live on the host, gathered on use
        for ln in lines:
            ln.phases, ln.note = (), (ln.note + " (offloaded: on host)").strip()

    # --- gradients and optimizer ---
    grad_bytes = t.grad_accum_dtype_bytes or d
    opt_lines: list[Line] = []
    if t.zero_stage == 0:
        lines.append(Line("gradients", "grads", trainable * d, phases=("step",), note="all of them after backward"))
        if d != 4:  # bf16/fp16 ZeRO-0: DeepSpeed's BF16_Optimizer keeps fp32 master params and grads
            opt_lines.append(Line("fp32 master weights + grads", "optimizer", trainable * 8))
        opt_lines.append(Line("Adam m, v", "optimizer", trainable * 8, phases=("forward", "backward", "step"),
                              note="created at the first step"))
    else:
        # Stage 3: grad_partitions_flat_buffer; stage 2: the partitioned averaged_gradients; stage 1: whole.
        lines.append(Line("gradient partition (flat)" if t.zero_stage >= 2 else "gradients (stage 1: not partitioned)", "grads",
                          trainable * grad_bytes / n_grad, note="grad_accum_dtype (default: the model dtype)"))
        # fp32 master partition: a clone even when the model is fp32.
        opt_lines.append(Line("fp32 master partition", "optimizer", trainable * 4 / n_opt))
        opt_lines.append(Line("Adam m, v (fp32)", "optimizer", trainable * 8 / n_opt, phases=("forward", "backward", "step"),
                              note="created at the first step"))
        # _prepare_fp32_grad_for_sub_group flattens the grad partition into a new fp32 tensor for the step
        # (a copy even when the model is fp32), one sub-group at a time.
        # With offload_optimizer it is a host buffer allocated with the optimizer's state at initialize, which backward
        # fills (measured on CPU: resident in every phase, 4 B x trainable / N).
        opt_lines.append(Line("fp32 gradient for the step", "optimizer", trainable * 4 / n_opt,
                              phases=PHASES if t.offload_optimizer else ("step",),
                              note="one sub-group at a time (sub_group_size 1e9: the whole partition)"
                                   + ("; offload: a host buffer filled in backward" if t.offload_optimizer else "")))
        if t.zero_stage in (1, 2):
            lines.append(Line("reduce (IPG) bucket", "zero", min(t.reduce_bucket_numel, max(trainable, 1)) * d,
                              note=f"reduce_bucket_size {t.reduce_bucket_numel:,} x {d} B"))
    for ln in opt_lines:
        if t.offload_optimizer and gpu:
            ln.phases = ()
            ln.note += " (offloaded: host)"
        elif t.offload_optimizer:
            ln.note += " (offloaded to the host: on CPU that is this memory)"
    lines += opt_lines

    # --- ZeRO-3 buffers ---
    full_bytes = gathered = 0.0
    if t.zero_stage == 3:
        bucket = min(t.reduce_bucket_numel, max(trainable, 1)) * d
        lines.append(Line("reduce (IPG) bucket", "zero", bucket, note=f"reduce_bucket_size {t.reduce_bucket_numel:,} x {d} B"))
        quant_bytes = NF4_DQ_BYTES_PER_PARAM if t.method == "qlora" else INT8_BYTES_PER_PARAM if t.method == "int8" else d
        full_bytes = linear * quant_bytes + (embed_head - trained_head + small) * d  # the trained head: in `trainable`
        # Parameters stay gathered while their next use is within stage3_max_reuse_distance elements
        # (after the first step has recorded the trace), capped by stage3_max_live_parameters; at least
        # the largest module is gathered at a time.
        frac = min(1.0, (t.prefetch_bucket_numel + min(t.max_reuse_distance_numel, t.max_live_numel)) / total_numel(m, t))
        # At the peak (the loss head, then backward from the top) a causal LM has its V x hidden LM head gathered
        # (tied or not: the same matrix). The input embedding is released right after the lookup (its next use is
        # the next step's), and a classifier has no V x hidden head at all: the real SmolLM2-135M sentiment head's
        # measured peak holds no gathered 49,152 x 576 embedding (counting it over-predicted by 11.6%).
        lm_head = 0 if t.num_labels else m.vocab * m.hidden
        # Unless backward reaches the embedding: it trains (method=full), or activation checkpointing is on
        # (transformers' activation_checkpointing_enable calls enable_input_require_grads: the embedding's output
        # requires grad). ZeRO-3 then visits the embedding in backward too, and while that use lies within
        # stage3_max_reuse_distance of the lookup (the trace between: about every parameter twice) the embedding
        # stays gathered from the lookup to the end of backward (measured, an untied 32,000-row tiny Llama: +V x
        # hidden x d at both peaks; without it -6.2% under checkpointing, -4.3% for full fine-tuning). Tied to a
        # causal LM's head, it is that matrix already.
        embed_kept = ((t.checkpointing != "none" or not t.peft) and not (lm_head and m.tie_embeddings)
                      and 2 * total_numel(m, t) <= t.max_reuse_distance_numel)
        at_peak_bytes = linear * quant_bytes + (lm_head + small + (m.embed_numel() if embed_kept else 0)) * d
        largest = max(max(x * y for x, y in m.linear_shapes().values()) * quant_bytes, lm_head * d)
        # Gathered copies are separate full-size buffers beside each rank's partition (one rank: none).
        gathered = max(frac * at_peak_bytes, largest) if n > 1 else 0.0
        lines.append(Line("gathered parameters (prefetch / live / reuse)", "zero", gathered, phases=("forward", "backward"),
                          note="parameters kept gathered within stage3_max_reuse_distance, capped by max_live_parameters"))
        persistent = small * d * (1 - 1 / n)
        lines.append(Line("persistent small parameters", "zero", persistent, note="below stage3_param_persistence_threshold"))

    # --- activations ---
    L = m.layers
    act_fwd = profile.fwd_peak(L)
    act_bwd = profile.bwd_peak(L)
    lines.append(Line("activations (peak in forward)", "activations", act_fwd, phases=("forward",),
                      note=f"{profile.engine}: saved {profile.saved(L) / GIB:.2f} GiB at the end of forward"))
    lines.append(Line("activations + loss head (peak in backward)", "activations", act_bwd, phases=("backward",)))
    if t.zero_stage <= 1:
        # Unpartitioned gradients fill up while activations are freed, layer by layer from the top. Two
        # candidate peaks: at the top (activation peak + the head's and one layer's gradients) or at the
        # bottom (every layer's gradients + the embedding's, with the activation base still counted).
        if t.peft:
            g_layer = adapter_layer_numel(m, t) * d
            g_head, g_embed = trained_head * d, t.virtual_tokens * m.hidden * d
        else:
            g_layer = (m.layer_linear_numel() + m.layer_small_numel()) * d
            g_head = (head_numel(m, t) + m.hidden) * d
            g_embed = m.embed_numel() * d
        top = g_head + g_layer
        bottom = profile.bwd_peak_base_bytes + g_head + L * g_layer + g_embed - act_bwd
        lines.append(Line("gradients live at the backward peak", "grads", max(top, bottom), phases=("backward",)))
    if t.method == "qlora":
        big = max(a * b for a, b in m.linear_shapes().values())
        lines.append(Line("dequantised weight (transient)", "activations", big * d, phases=("forward", "backward"),
                          note="bitsandbytes dequantises one 4-bit weight to the compute dtype per matmul"))
    # Optimizer step temporaries. CUDA: fused AdamW, none to speak of. CPU: the single-tensor AdamW makes
    # about two temporaries of the tensor it steps (sqrt of v, the denominator): ZeRO steps one flat
    # partition, ZeRO-0 one parameter at a time (the largest matters).
    if gpu or t.offload_optimizer:
        step_tmp = 0.0
    elif t.zero_stage >= 1:
        step_tmp = 2 * 4 * trainable / n_opt
    else:
        step_tmp = 2 * 4 * min(trainable, max(m.intermediate * m.hidden, m.embed_numel()))
    lines.append(Line("optimizer-step temporaries", "optimizer", step_tmp, phases=("step",)))
    if not gpu and host_data_bytes:
        lines.append(Line("tokenised data set (host)", "runtime", host_data_bytes, note="on CPU the data shares the device"))
    if gpu:
        lines.append(Line("CUDA context + workspaces", "runtime", CUDA_CONTEXT_BYTES, note="not allocator-visible"))
        comms = 1 if world_size == 1 else (2 if t.zero_stage == 0 else 3)
        lines.append(Line("NCCL communicators", "runtime", NCCL_BYTES_PER_COMMUNICATOR * (comms if world_size > 1 else 0)))

    # --- load phase ---
    if t.zero_stage == 3 and t.loader == "streamed":
        # harness/loading.py reads one decoder layer at a time in the compute dtype (plus its quantised
        # copy for qlora) and partitions it before the next: one whole layer beyond this rank's shards.
        layer_bytes = m.layer_linear_numel() * (d + (NF4_DQ_BYTES_PER_PARAM if t.method == "qlora" else 0))
        lines.append(Line("one layer being read and partitioned (streamed loader)", "params", layer_bytes, phases=("load",)))
    elif t.method == "qlora" and t.zero_stage == 3 and n > 1:
        # from_pretrained: the whole quantised model on every rank until deepspeed.initialize
        lines.append(Line("unpartitioned 4-bit model before initialize", "params", linear * NF4_DQ_BYTES_PER_PARAM * (1 - 1 / n),
                          phases=("load",)))

    extra = ((EVAL,) if t.eval_batch else ()) + ((GENERATE,) if t.generate_batch else ())
    _mark_resident(lines, extra)
    if t.eval_batch:
        lines += _eval_lines(m, t, gathered)
    if t.generate_batch:
        lines += _generation_lines(m, t, n, full_bytes + trainable * d, gathered)
    phases = PHASES + extra
    phase_bytes = {}
    for ph in phases:
        # Load = after deepspeed.initialize: parameters, ZeRO buffers, the fp32 master and grad partition
        # (ZeRO >= 1); Adam's m and v appear at the first step.
        total = sum(ln.bytes for ln in lines if ph in ln.phases)
        phase_bytes[ph] = total
    if gpu:
        for ph in phases:
            phase_bytes[ph] *= 1 + ALLOCATOR_MARGIN
        lines.append(Line(f"allocator margin ({ALLOCATOR_MARGIN:.0%})", "runtime", 0, note="added per phase"))
    peak_phase = max(phase_bytes, key=phase_bytes.get)
    peak = int(math.ceil(phase_bytes[peak_phase]))

    # --- host RAM per node ---
    gpn = cluster.gpus_per_node if cluster else world_size
    host: list[Line] = []
    if t.offload_optimizer:
        host.append(Line("offloaded optimizer (fp32 master, m, v, grad)", "host", trainable * 16 / n_opt * gpn))
    if t.offload_param and t.zero_stage == 3:
        offloaded = linear * NF4_DQ_BYTES_PER_PARAM if t.method == "qlora" else total_numel(m, t) * d
        host.append(Line("offloaded parameters", "host", offloaded / n * gpn))
    # Loading: each rank reads safetensors shards through mmap and materialises its copy; with QLoRA +
    # ZeRO-3 each rank briefly holds the 16-bit weights of one shard (~5 GB) to quantise them.
    host.append(Line("model loading (per rank: one 5 GB shard + dataset)", "host", gpn * (5e9 + host_data_bytes)))
    host_bytes = int(sum(x.bytes for x in host))

    b = Budget(model=m.name, engine=profile.engine, world_size=world_size, device=t.device, lines=lines, host_lines=host,
               phase_bytes={k: int(math.ceil(v)) for k, v in phase_bytes.items()}, peak_bytes=peak, peak_phase=peak_phase, host_bytes=host_bytes,
               activations={"saved_end_of_forward_bytes": profile.saved(L), "forward_peak_bytes": act_fwd,
                            "backward_peak_bytes": act_bwd, "one_layer_bytes": profile.layer_full_bytes})
    b.uncertainty = GPU_UNCALIBRATED_BAND if gpu else 0.0
    if gpu:
        b.notes.append(f"uncalibrated on GPU: up to +{b.uncertainty:.0%} (the published comparison's worst miss); 'fits' needs that to fit")
    if cluster is not None:
        b.device_memory_bytes = cluster.gpu_memory_bytes
        b.host_ram_bytes = cluster.host_ram_bytes
        b.safety_margin = safety_margin
        b.headroom_bytes = int(cluster.gpu_memory_bytes - peak * (1 + safety_margin))
        host_ok = host_bytes <= cluster.host_ram_bytes
        point = b.headroom_bytes >= 0 and host_ok
        b.fits = point and cluster.gpu_memory_bytes >= peak * (1 + b.uncertainty + safety_margin)
        b.verdict = "fits" if b.fits else "may not fit" if point else "does not fit"
    return b
