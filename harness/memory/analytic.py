"""Closed-form memory model for one training rank: shapes, recipe -> bytes per line item and per phase.

Units: every `*_bytes` is bytes; element counts are `*_numel`. Notation in comments: s = seq_len,
b = micro-batch, h = hidden, q = heads*head_dim, kv = kv_heads*head_dim, I = intermediate, V = vocab,
L = layers, N = ZeRO world size, d = bytes of the compute dtype (2 for bf16, 4 for fp32).

The activation terms follow what HF Llama/Qwen2 (transformers 5) saves for backward, per tensor (see
the comments in `activation_profile`); `harness.memory.trace` measures the same quantities on the real
model under FakeTensorMode and the two are compared in the tests and the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from harness.config import DECODER_LINEAR_NAMES, find_model_config, shipped_config_names

GIB = 2**30
LINEAR_NAMES = DECODER_LINEAR_NAMES
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ATTN_BACKENDS = ("sdpa", "flash_attention_2", "eager")
# bitsandbytes NF4 with double quantisation: 4 bits + u8 absmax per 64 + fp32 absmax per 64*256 (+ small).
NF4_DQ_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES_PER_PARAM = 1.0 + 4 / 4096  # LLM.int8: int8 weight + fp32 row scale (rows of ~4k)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder (Llama, Mistral, Qwen2) read from a config.json."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool
    qkv_bias: bool

    @staticmethod
    def from_config(cfg: dict, name: str = "") -> "ModelShape":
        try:
            h = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            shape = ModelShape(
                name=name or str(cfg.get("_name_or_path") or cfg.get("model_type", "model")),
                hidden=h,
                intermediate=int(cfg["intermediate_size"]),
                layers=int(cfg["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or h // heads),
                vocab=int(cfg["vocab_size"]),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            )
        except KeyError as e:
            raise ValueError(f"model config lacks {e.args[0]!r}: need a Llama-style decoder config.json") from None
        if min(shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.vocab) <= 0:
            raise ValueError(f"model config has a non-positive size: {shape}")
        return shape

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each decoder-layer linear."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim), "o_proj": (self.q_dim, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_numel(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    def layer_small_numel(self) -> int:
        """Norm weights and q/k/v biases of one layer (never quantised; below ZeRO-3's persistence threshold)."""
        return 2 * self.hidden + ((self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0)

    def embed_numel(self) -> int:
        return self.vocab * self.hidden

    def head_numel(self) -> int:
        return 0 if self.tie_embeddings else self.vocab * self.hidden

    def total_numel(self) -> int:
        return self.layers * (self.layer_linear_numel() + self.layer_small_numel()) + self.embed_numel() + self.head_numel() + self.hidden


def load_model_shape(spec: str) -> ModelShape:
    """A config.json path, a model directory holding one, or a shipped name from harness/model_configs."""
    p = find_model_config(spec)
    if p is None:
        raise ValueError(f"model {spec!r}: not a config.json, a model directory or a shipped name ({', '.join(shipped_config_names())})")
    return ModelShape.from_config(json.loads(p.read_text()), name=p.parent.name if p.name == "config.json" else p.stem)


@dataclass(frozen=True)
class TrainSetup:
    """What the recipe and DeepSpeed config decide about memory. Sizes are elements unless named _bytes."""

    method: str = "qlora"  # full | lora | qlora | int8
    precision: str = "bf16"  # bf16 | fp16 | fp32 (model and compute dtype)
    lora_r: int = 16
    lora_targets: tuple | str = LINEAR_NAMES  # module names, or "all-linear"
    lora_dropout: float = 0.0
    micro_batch: int = 1
    seq_len: int = 2048
    checkpointing: str = "full"  # none | full | every_k
    checkpoint_every_k: int = 2
    attn: str = "sdpa"  # sdpa | flash_attention_2 | eager
    packed: bool = False  # packing / padding: sdpa and eager then get a (b, 1, s, s) mask
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket_numel: int = 500_000_000
    prefetch_bucket_numel: int = 50_000_000
    persistence_threshold_numel: int = 100_000
    max_live_numel: int = 1_000_000_000
    max_reuse_distance_numel: int = 1_000_000_000
    grad_accum_dtype_bytes: int = 0  # 0 = the model dtype (DeepSpeed's default)
    device: str = "cuda"  # cuda | cpu: cpu drops the CUDA context, communicator and allocator terms
    loader: str = "streamed"  # streamed (harness/loading.py, ZeRO-3 default) | hf (from_pretrained)
    generate_batch: int = 0  # eval.generate_batch_size when eval.generate_samples is on, else 0 (no generation phase)
    generate_tokens: int = 0  # the longest generated sequence: prompt (up to seq_len) + eval.max_new_tokens
    generate_gather: bool = True  # ZeRO-3: the whole model gathered on every rank for generation
    eval_batch: int = 0  # eval.batch_size when it exceeds micro_batch (an eval forward then outgrows training's), else 0
    eval_seq_len: int = 0  # the validation rows' length when seq_len is the training data's (shorter) longest row; 0 = seq_len
    fused_loss: bool = False  # kernels: linear_cross_entropy (the loss is taken in chunks: no full logits)
    num_labels: int = 0  # task=classification: the score head's classes (C x hidden, always trained); 0 = the LM head
    # method=prompt_tuning: P trainable (P, hidden) embeddings before every row and no adapters; `method` then
    # names the frozen base's storage (lora: 16-bit, qlora: NF4) and seq_len counts the P positions.
    virtual_tokens: int = 0
    # ZeRO-3's zero_optimization.memory_efficient_linear (DeepSpeed's default: on): F.linear is replaced by an
    # autograd function that saves every linear's input, frozen or not (see input_saving_linears).
    memory_efficient_linear: bool = True

    def __post_init__(self):
        checks = [
            (self.method in ("full", "lora", "qlora", "int8"), f"method {self.method!r} must be full, lora, qlora or int8"),
            (self.precision in DTYPE_BYTES, f"precision {self.precision!r} must be bf16, fp16 or fp32"),
            (self.checkpointing in ("none", "full", "every_k"), f"checkpointing {self.checkpointing!r} must be none, full or every_k"),
            (self.attn in ATTN_BACKENDS, f"attention backend {self.attn!r} must be one of {ATTN_BACKENDS}"),
            (self.zero_stage in (0, 1, 2, 3), f"ZeRO stage {self.zero_stage} must be 0-3"),
            (self.micro_batch >= 1 and self.seq_len >= 1, "micro_batch and seq_len must be >= 1"),
            (self.device in ("cuda", "cpu"), f"device {self.device!r} must be cuda or cpu"),
            (self.method == "full" or self.lora_r >= 1, "LoRA rank must be >= 1"),
            (self.checkpointing != "every_k" or self.checkpoint_every_k >= 1, "checkpoint_every_k must be >= 1"),
            (self.virtual_tokens >= 0, "virtual_tokens must be >= 0"),
            (not self.virtual_tokens or self.method in ("lora", "qlora"), "a soft prompt's base is lora (16-bit) or qlora (NF4)"),
            (not self.virtual_tokens or self.seq_len > self.virtual_tokens, "seq_len counts the virtual tokens and the row"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.precision]

    @property
    def peft(self) -> bool:
        return self.method != "full"

    def checkpointed_layers(self, layers: int) -> int:
        if self.checkpointing == "none":
            return 0
        if self.checkpointing == "full":
            return layers
        return len(range(0, layers, self.checkpoint_every_k))


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_bytes: int = 80 * 10**9
    host_ram_bytes: int = 1024 * GIB

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError("nodes and gpus_per_node must be >= 1")
        if self.gpu_memory_bytes <= 0 or self.host_ram_bytes <= 0:
            raise ValueError("gpu and host memory must be > 0 bytes")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class ActivationProfile:
    """Activation-side bytes as affine functions of the layer count: value(L) = base + per_layer * L.

    saved: kept for backward at the end of forward (after the loss); fwd_peak / bwd_peak: the highest
    activation-side total reached inside forward / backward (backward excludes weight gradients, which
    the ZeRO model accounts for)."""

    engine: str
    saved_base_bytes: float
    saved_per_layer_bytes: float
    fwd_peak_base_bytes: float
    fwd_peak_per_layer_bytes: float
    bwd_peak_base_bytes: float
    bwd_peak_per_layer_bytes: float
    layer_full_bytes: float = 0.0  # one layer's activations without checkpointing (for the report)

    def saved(self, layers: int) -> float:
        return self.saved_base_bytes + self.saved_per_layer_bytes * layers

    def fwd_peak(self, layers: int) -> float:
        return self.fwd_peak_base_bytes + self.fwd_peak_per_layer_bytes * layers

    def bwd_peak(self, layers: int) -> float:
        return self.bwd_peak_base_bytes + self.bwd_peak_per_layer_bytes * layers


def head_numel(m: ModelShape, t: TrainSetup) -> int:
    """The output head's elements: a classifier's score layer (C x hidden, never tied), else the LM head."""
    return t.num_labels * m.hidden if t.num_labels else m.head_numel()


def total_numel(m: ModelShape, t: TrainSetup) -> int:
    """Every parameter of the model trained: the decoder with `head_numel`'s head."""
    return m.total_numel() - m.head_numel() + head_numel(m, t)


def logit_width(m: ModelShape, t: TrainSetup) -> int:
    """Outputs per position of the head: C classes (transformers scores every position, then pools one), or V."""
    return t.num_labels or m.vocab


def fused_chunk_tokens(n_tokens: int, hidden: int, vocab: int) -> int:
    """Rows per chunk of the fused linear_cross_entropy kernel: its own rule (harness/loss_chunks.py, torch-free)."""
    from harness.loss_chunks import default_chunk_tokens

    return default_chunk_tokens(n_tokens, hidden, vocab)


def lora_targets(setup: TrainSetup) -> tuple:
    """The adapted linear names (all-linear = every decoder-layer linear; peft skips lm_head)."""
    return LINEAR_NAMES if setup.lora_targets in ("all-linear", ("all-linear",)) else tuple(setup.lora_targets)


def adapter_layer_numel(m: ModelShape, t: TrainSetup) -> int:
    """Trainable elements of one decoder layer under peft: LoRA's A (r x in) and B (out x r) per target;
    none for a soft prompt, whose (P, hidden) embeddings sit before the first layer."""
    if t.virtual_tokens:
        return 0
    shapes = m.linear_shapes()
    return sum(t.lora_r * (shapes[n][0] + shapes[n][1]) for n in lora_targets(t) if n in shapes)


def input_saving_linears(t: TrainSetup) -> set:
    """The decoder-layer linears (and, as "lm_head", the head) whose input is saved for backward.

    Plain torch saves a linear's input only for its weight gradient: every linear when all train, LoRA's
    targets (their A matmul), none for a soft prompt over a frozen base. Under ZeRO-3 DeepSpeed replaces
    F.linear by LinearFunctionForZeroStage3 (zero_optimization.memory_efficient_linear, on by default),
    which saves input and weight whatever needs a gradient: every frozen 16-bit linear that gradient flows
    through then saves its input too. bitsandbytes' 4-bit and 8-bit layers do not call F.linear."""
    every = set(LINEAR_NAMES) | {"lm_head"}
    if not t.peft or (t.zero_stage == 3 and t.memory_efficient_linear and t.method == "lora"):
        return every
    return set() if t.virtual_tokens else set(lora_targets(t))


def _norm_saved_bytes(m: ModelShape, t: TrainSetup, *, output_saved: bool) -> float:
    """One HF RMSNorm (eager; upcasts to fp32): the fp32 input (4 s b h; in fp32 runs the residual
    itself), rstd (4 s b), x*rstd in the model dtype when the norm weight trains (the multiply saves it
    for the weight gradient), and the output when the next linear saves its input."""
    s_b = t.seq_len * t.micro_batch
    d, h = t.dtype_bytes, m.hidden
    return s_b * (4 * h + 4 + (d * h if not t.peft else 0) + (d * h if output_saved else 0))


def _mask_per_layer_bytes(t: TrainSetup, *, cpu_sdpa: bool) -> float:
    """Packed rows give sdpa a block-diagonal mask, and CPU sdpa a causal one; each layer saves its own
    model-dtype copy: (b, 1, s, s) when packed, (1, 1, s, s) for the plain causal mask."""
    if t.attn == "sdpa" and t.packed:
        return t.dtype_bytes * t.micro_batch * t.seq_len * t.seq_len
    if cpu_sdpa:
        return t.dtype_bytes * t.seq_len * t.seq_len
    return 0.0


def layer_saved_bytes(m: ModelShape, t: TrainSetup, *, cpu_sdpa: bool) -> float:
    """Bytes one decoder layer saves for backward without checkpointing (HF Llama/Qwen2 code paths)."""
    s_b = t.seq_len * t.micro_batch
    d = t.dtype_bytes
    q, kv, i = m.q_dim, m.kv_dim, m.intermediate
    targets = input_saving_linears(t)
    norms = (_norm_saved_bytes(m, t, output_saved=bool(targets & {"q_proj", "k_proj", "v_proj"}))
             + _norm_saved_bytes(m, t, output_saved=bool(targets & {"gate_proj", "up_proj"})))
    # Attention: q after RoPE, K and V, output O (o_proj's input is a view of it), fp32 logsumexp.
    # CPU sdpa, masked sdpa and eager run repeat_kv first, so K and V are saved at q width.
    kv_saved = q if (cpu_sdpa or (t.attn == "sdpa" and t.packed) or t.attn == "eager") else kv
    attn = d * s_b * (2 * q + 2 * kv_saved) + 4 * m.heads * s_b + _mask_per_layer_bytes(t, cpu_sdpa=cpu_sdpa)
    if t.attn == "eager":  # fp32 softmax output + its cast copy: 6 a s^2 b
        attn += 6 * m.heads * t.seq_len * s_b
    # SwiGLU MLP: gate output (saved by silu and mul), silu output, up output, their product (down's input).
    mlp = d * s_b * i * (3 + (1 if "down_proj" in targets else 0))
    lora = 0
    if t.peft and not t.virtual_tokens:
        adapted = set(lora_targets(t)) & set(LINEAR_NAMES)
        # Each adapted linear saves its A output (s b r) for B's weight gradient.
        lora = d * s_b * t.lora_r * len(adapted)
        if t.lora_dropout > 0:  # peft keeps a dropped copy of the input per adapted module (+ a mask)
            lora += sum((d + 1) * s_b * m.linear_shapes()[n][0] for n in adapted)
    return norms + attn + mlp + lora


def activation_profile(m: ModelShape, t: TrainSetup) -> ActivationProfile:
    """Closed-form ActivationProfile for HF Llama-style models under this recipe."""
    s_b = t.seq_len * t.micro_batch
    d = t.dtype_bytes
    h, v = m.hidden, logit_width(m, t)
    cpu_sdpa = t.device == "cpu" and t.attn == "sdpa"
    layer = layer_saved_bytes(m, t, cpu_sdpa=cpu_sdpa)
    # Shared by every layer: RoPE cos/sin in the model dtype (b, 1, s, head_dim) x 2; with checkpointing
    # the boolean packed mask (b, 1, s, s) passed to each checkpointed layer.
    rope = 2 * d * t.seq_len * t.micro_batch * m.head_dim
    ckpt_mask = 0
    if t.checkpointing != "none" and t.attn == "sdpa" and (t.packed or cpu_sdpa):
        ckpt_mask = (t.micro_batch if t.packed else 1) * t.seq_len * t.seq_len
    # Final norm (its output is saved when the head saves its input: it trains, as a classifier's always
    # does, or ZeRO-3's linear saves it) and log_softmax's fp32 output (4 s b V). A classifier's head gives
    # (b, s, C) scores and its loss (b, C): both negligible at C << V, and counted at s b C to stay an
    # upper bound.
    fused = t.fused_loss and not t.num_labels
    final_norm = _norm_saved_bytes(m, t, output_saved=not fused and ("lm_head" in input_saving_linears(t) or t.num_labels > 0))
    logsm = 0 if fused else 4 * s_b * v
    saved_base = rope + ckpt_mask + final_norm + logsm
    if fused:
        # kernels: [linear_cross_entropy] (harness/kernels/linear_cross_entropy.py) computes the head's gradients in
        # the forward and keeps them to the backward: dX (s b, h) in the model dtype and, when the head trains
        # (method=full), dW (V, h) cast to the model dtype (accumulated in fp32 during the forward). No logits and no
        # saved input.
        head_grads = d * s_b * h + (d * v * h if not t.peft else 0)
        saved_base += head_grads
    # Loss transient in forward: the model-dtype logits and their fp32 copy beside the log_softmax output.
    # In fp32 the copy is none, except after a soft prompt: the loss drops the P virtual positions,
    # logits[:, P:], and flattening that strided view copies it (harness/train.py token_loss_sum) unless
    # b = 1 (then it is a view).
    sliced = t.virtual_tokens and not t.num_labels and t.micro_batch > 1
    fwd_head_extra = (d + (4 if d != 4 or sliced else 0)) * s_b * v
    # Backward of the head: grads of log_softmax's output and input (4 + 4 s b V) beside the saved output
    # (the model-dtype grad of the logits comes after the fp32 ones are freed).
    bwd_head_extra = 8 * s_b * v
    if fused:
        # One chunk of C tokens at a time, per element of its (C, V) logits: the fp32 logits (log-sum-exp allocates no
        # second (C, V) buffer, on CPU either: measured) over which softmax - onehot is written in place; in bf16 the
        # GEMM's output beside its fp32 copy and then the gradient's bf16 cast for the GEMMs (+2), and for a trained
        # head's dW that cast back in fp32 (+4). A trained head's fp32 dW accumulates beside its model-dtype cast kept
        # for backward: (4 - d) V h more. Backward: dX (and dW) scaled by the incoming gradient: new tensors.
        chunk = min(s_b, fused_chunk_tokens(s_b, h, v))
        bf16 = d == 2
        per_elem = 4 + (2 if bf16 else 0) + (4 if bf16 and not t.peft else 0)
        fwd_head_extra = per_elem * chunk * v + ((4 - d) * v * h if not t.peft else 0)
        if not t.peft and bf16:  # the end of the forward: dW in fp32 and its cast at once
            fwd_head_extra = max(fwd_head_extra, 4 * v * h)
        bwd_head_extra = d * s_b * h + (d * v * h if not t.peft else 0)
    i_bytes = d * s_b * m.intermediate
    if t.checkpointing == "none":
        saved_per_layer = layer
        fwd_layer_extra = 2 * d * s_b * h
        recompute = 0.0
    else:
        # Checkpointed layers keep only their input hidden state (d s b h); every_k keeps the others whole.
        frac = t.checkpointed_layers(m.layers) / m.layers
        saved_per_layer = frac * d * s_b * h + (1 - frac) * layer
        # A checkpointed layer's forward still holds MLP-wide tensors at once: silu(gate) and up; with
        # peft also each projection's base output beside base + LoRA (traced: ~3.6 of them, 3.5 + h).
        # Without LoRA sums (all trained, or a soft prompt over a frozen base): two MLP-wide tensors and the
        # norm's fp32 upcast beside its input (traced: 2 I + 2.5 h; it is the forward's peak when the head's
        # logits are small: a classifier).
        lora_sums = t.peft and not t.virtual_tokens
        fwd_layer_extra = (3.5 * i_bytes + d * s_b * h) if lora_sums else 2 * i_bytes + 2.5 * d * s_b * h
        recompute = layer
    # Backward of a layer: (its recomputed activations) + two MLP-wide gradients, after the head's
    # tensors (final norm, log_softmax output) are gone.
    # (Through a frozen base to a soft prompt, traced: one MLP-wide and one hidden-wide tensor more.)
    bwd_grads = (3 * i_bytes + d * s_b * h) if t.virtual_tokens else 2 * i_bytes
    bwd_layer_phase = saved_base - final_norm - logsm + recompute + bwd_grads
    bwd_head = saved_base + bwd_head_extra
    return ActivationProfile(
        engine="analytic",
        saved_base_bytes=saved_base,
        saved_per_layer_bytes=saved_per_layer,
        fwd_peak_base_bytes=saved_base + max(fwd_head_extra, fwd_layer_extra),
        fwd_peak_per_layer_bytes=saved_per_layer,
        bwd_peak_base_bytes=max(bwd_head, bwd_layer_phase),
        bwd_peak_per_layer_bytes=saved_per_layer,
        layer_full_bytes=layer,
    )
