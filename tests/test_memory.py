"""Unit tests of harness/memory (analytic and trace engines, budget composition, report, CLI).

The accuracy against real runs is tests/distributed/test_memory_measured.py.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from harness.memory import Budget, Cluster, ModelShape, TrainSetup, activation_profile, budget_for_recipe, compose, load_model_shape
from harness.config import SHIPPED_MODEL_CONFIGS as MODEL_CONFIGS_DIR
from harness.memory.analytic import GIB, NF4_DQ_BYTES_PER_PARAM
from harness.memory.budget import GPU_UNCALIBRATED_BAND, SAFETY_MARGIN
from tests.helpers import REPO

SHIPPED = ["llama-3.1-8b", "llama-3.1-70b", "qwen2.5-72b"]


def _cfg(name: str) -> dict:
    return json.loads((MODEL_CONFIGS_DIR / f"{name}.json").read_text())


# num_labels 0: the causal LM (its LM head, tied or not); 3: transformers' sequence classifier (a 3 x hidden score head, never tied)
@pytest.mark.parametrize("name, num_labels, tied", [("llama-3.1-8b", 0, False), ("qwen2.5-7b", 0, False), ("mistral-7b", 0, False),
                                                    ("qwen2.5-7b", 0, True), ("llama-3.1-8b", 3, False), ("qwen2.5-7b", 5, True)])
def test_parameter_count_matches_the_hf_model(name, num_labels, tied):
    """The closed-form parameter count is the one transformers builds (meta device, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from harness.memory.analytic import total_numel

    cfg = {**_cfg(name), "tie_word_embeddings": tied}
    shape = ModelShape.from_config(cfg)
    extra = {"num_labels": num_labels} if num_labels else {}
    hf = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "quantization_config"}, **extra)
    with torch.device("meta"):
        model = (AutoModelForSequenceClassification if num_labels else AutoModelForCausalLM).from_config(hf)
    assert total_numel(shape, TrainSetup(num_labels=num_labels)) == sum(p.numel() for p in model.parameters())


def test_nf4_bytes_per_param_matches_bitsandbytes():
    """0.516 B/param = packed 4-bit + u8 absmax per 64 + fp32 second-level absmax per 256 blocks."""
    import torch

    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(1024, 1024)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    total = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    total += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.state2.code.numel() * 4
    per_param = total / w.numel()
    # the 256-entry fp32 code book is per tensor: negligible for real weights, 1 kB here
    assert per_param == pytest.approx(NF4_DQ_BYTES_PER_PARAM, rel=0.01)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("seq_len", [2048, 8192])
def test_engines_agree_on_activations(name, seq_len):
    """Closed forms and the traced real model (full width, 1-2 layers, FakeTensorMode) within 3%."""
    from harness.memory.trace import trace_profile

    shape = ModelShape.from_config(_cfg(name))
    for method, ckpt in (("qlora", "full"), ("qlora", "none"), ("full", "none")):
        setup = TrainSetup(method=method, precision="bf16", seq_len=seq_len, micro_batch=1, checkpointing=ckpt, device="cpu", attn="sdpa")
        a, t = activation_profile(shape, setup), trace_profile(_cfg(name), setup)
        L = shape.layers
        for what in ("saved", "fwd_peak", "bwd_peak"):
            x, y = getattr(a, what)(L), getattr(t, what)(L)
            assert abs(x - y) <= 0.03 * y, (name, seq_len, method, ckpt, what, x / GIB, y / GIB)


def test_trace_engine_70b_under_60_s():
    from harness.memory.trace import trace_profile

    setup = TrainSetup(method="qlora", seq_len=8192, checkpointing="full", device="cpu")
    t0 = time.perf_counter()
    prof = trace_profile(_cfg("llama-3.1-70b"), setup)
    assert time.perf_counter() - t0 < 60
    # full checkpointing keeps one bf16 hidden state per layer: 2 s b h bytes
    assert prof.saved_per_layer_bytes == pytest.approx(2 * 8192 * 8192, rel=1e-6)


def test_analytic_70b_budget_under_2_s():
    shape = load_model_shape("llama-3.1-70b")
    cluster = Cluster(nodes=8, gpus_per_node=8, gpu_memory_bytes=80 * GIB)
    t0 = time.perf_counter()
    b = compose(shape, TrainSetup(method="qlora", seq_len=2048), cluster.world_size, cluster=cluster)
    assert time.perf_counter() - t0 < 2
    assert isinstance(b, Budget) and b.fits is not None and b.peak_phase in b.phase_bytes


def test_zero3_partitions_states_and_stage0_does_not():
    shape = load_model_shape("llama-3.1-8b")
    full3 = TrainSetup(method="full", zero_stage=3, checkpointing="full")

    def states(setup, n):
        b = compose(shape, setup, n)
        return sum(ln.bytes for ln in b.lines if ln.category in ("params", "grads", "optimizer") and "step" in ln.phases
                   and "temporar" not in ln.name)

    assert states(full3, 2) == pytest.approx(2 * states(full3, 4), rel=1e-9)
    full0 = dataclasses.replace(full3, zero_stage=0)
    assert states(full0, 2) == pytest.approx(states(full0, 4), rel=1e-9)
    # mixed-precision Adam with DeepSpeed's extra fp32 step gradient: 2 + 2 + 12 (+4 in the step) B/param
    assert states(full3, 1) == pytest.approx(20 * shape.total_numel(), rel=1e-9)


def test_device_terms():
    shape = load_model_shape("llama-3.1-8b")
    cpu = compose(shape, TrainSetup(device="cpu"), 2)
    cuda = compose(shape, TrainSetup(device="cuda"), 2)
    assert not [ln for ln in cpu.lines if "CUDA" in ln.name or "NCCL" in ln.name]
    assert [ln for ln in cuda.lines if "CUDA" in ln.name] and [ln for ln in cuda.lines if "NCCL" in ln.name]
    assert cuda.peak_bytes > cpu.peak_bytes


def test_checkpointing_and_micro_batch_move_the_peak_the_right_way():
    shape = load_model_shape("llama-3.1-8b")
    base = TrainSetup(method="qlora", seq_len=4096, checkpointing="none", zero_stage=3)
    none = compose(shape, base, 8).phase_bytes["backward"]
    k2 = compose(shape, dataclasses.replace(base, checkpointing="every_k", checkpoint_every_k=2), 8).phase_bytes["backward"]
    full = compose(shape, dataclasses.replace(base, checkpointing="full"), 8).phase_bytes["backward"]
    assert none > k2 > full
    assert compose(shape, dataclasses.replace(base, micro_batch=2), 8).phase_bytes["forward"] > compose(shape, base, 8).phase_bytes["forward"]


# (setup, nodes of 8 x 80 GiB, sentence fragments): the 70B QLoRA run that fits on 1 of 8 given nodes with headroom;
# one whose recomputation must rise; one that needs two settings changed
@pytest.mark.parametrize("setup, nodes, said", [
    (dict(seq_len=2048, checkpointing="full"), 8, ["Fewest nodes on which it fits as configured: 1 (8 GPUs", "the 8 given are more",
                                                  "No offload is needed."]),
    # 8B full fine-tuning on GPUs of 24 GiB: the fewest nodes is not a power of two
    (dict(model="llama-3.1-8b", method="full", seq_len=2048, checkpointing="full", gib=24), 2, ["Fewest nodes on which it fits as configured: 3 ",
                                                                                               "3 nodes (24 GPUs) instead of 2"]),
    (dict(seq_len=8192, checkpointing="none"), 1, ["It does not fit on 1 node",
                                                   "The smallest change that makes it fit: train.gradient_checkpointing="]),
    (dict(seq_len=16384, micro_batch=4, checkpointing="none"), 1, ["The smallest change that makes it fit: train.micro_batch_size=1 "
                                                                   "train.gradient_checkpointing=full"]),
])
def test_fit_search_says_what_an_operator_needs_and_each_claim_holds(setup, nodes, said):
    """The sentences name the fewest nodes, the largest micro-batch and least recomputation that fit, whether offload
    is needed, or the smallest change; and the budget agrees with every figure (the next micro-batch up does not
    fit, one node fewer does not fit, the named change fits)."""
    from harness.memory.report import search_fit

    setup = dict(setup)
    shape, gib = load_model_shape(setup.pop("model", "llama-3.1-70b")), setup.pop("gib", 80)
    t = TrainSetup(**{"method": "qlora", "zero_stage": 3, **setup})
    cluster = Cluster(nodes=nodes, gpus_per_node=8, gpu_memory_bytes=gib * GIB)
    fits = lambda tt, cl=cluster: compose(shape, tt, cl.world_size, cluster=cl).fits  # noqa: E731
    found = search_fit(shape, t, cluster)
    text = " ".join(found["sentences"])
    for fragment in said:
        assert fragment in text, text
    assert found["fits"] == fits(t)
    if found["nodes_needed"] is not None:
        n = found["nodes_needed"]
        assert fits(t, dataclasses.replace(cluster, nodes=n)) and (n == 1 or not fits(t, dataclasses.replace(cluster, nodes=n // 2)))
    if found["largest_micro_batch"]:
        mb = found["largest_micro_batch"]
        assert fits(dataclasses.replace(t, micro_batch=mb)) and not fits(dataclasses.replace(t, micro_batch=mb + 1))
    change = text.split("The smallest change that makes it fit: ")[1].split(" (")[0].rstrip(".") if "smallest change" in text else ""
    if change.endswith(" nodes"):  # "N nodes (M GPUs) instead of K"
        assert fits(t, dataclasses.replace(cluster, nodes=int(change.split()[0]))), change
    elif change:
        kw = {"train.gradient_checkpointing": "checkpointing", "train.checkpoint_every_k": "checkpoint_every_k",
              "train.micro_batch_size": "micro_batch"}
        settings, _, offload = change.partition(" and ")  # "k=v k=v and offload optimizer [+ params]"
        fixed = {kw[k]: (int(v) if v.isdigit() else v) for k, v in (item.split("=") for item in settings.split())}
        if offload:
            fixed.update(offload_optimizer=True, offload_param="params" in offload)
        assert fits(dataclasses.replace(t, **fixed)), change


def test_deepspeed_estimate_is_its_model_states_formula():
    pytest.importorskip("deepspeed")
    from harness.memory.report import deepspeed_estimate

    shape = load_model_shape("llama-3.1-70b")
    cluster = Cluster(nodes=8, gpus_per_node=8)
    ds = deepspeed_estimate(shape, TrainSetup(offload_optimizer=False, offload_param=False), cluster)
    # stage3.py: gpu_mem = 4 * largest_layer + 18 * total / gpus (no offload)
    assert ds["gpu_bytes_per_rank"] == int(4 * ds["largest_layer_params"] + int(18 * shape.total_numel() / 64))


@pytest.mark.parametrize("bad", [dict(method="dora"), dict(checkpointing="some"), dict(zero_stage=4), dict(micro_batch=0), dict(attn="xformers"),
                                 dict(device="tpu"), dict(precision="int4")])
def test_bad_setup_is_a_value_error(bad):
    with pytest.raises(ValueError):
        TrainSetup(**bad)


def test_bad_model_and_cluster_are_value_errors():
    with pytest.raises(ValueError, match="shipped name"):
        load_model_shape("no-such-model")
    with pytest.raises(ValueError, match="hidden_size"):
        ModelShape.from_config({"vocab_size": 10})
    with pytest.raises(ValueError):
        Cluster(nodes=0)
    with pytest.raises(ValueError):
        compose(load_model_shape("llama-3.1-8b"), TrainSetup(), 0)


def test_budget_for_recipe(tmp_path):
    from harness.config import load_recipe

    (tmp_path / "config.json").write_text(json.dumps(_cfg("llama-3.1-8b")))
    recipe = load_recipe(str(REPO / "harness/recipes/llama3_8b_qlora.yaml"), [f"model.path={tmp_path}"])
    b = budget_for_recipe(recipe, world_size=8, device_memory_bytes=80 * GIB)
    assert b.fits is True and b.world_size == 8 and b.safety_margin == SAFETY_MARGIN
    tiny = budget_for_recipe(recipe, world_size=8, device_memory_bytes=1 * GIB)
    assert tiny.fits is False and tiny.headroom_bytes < 0


@pytest.mark.parametrize("packing, row_tokens, counted", [(False, 300, 300), (False, 4096, 2048), (True, 300, 2048)])
def test_row_tokens_is_the_padded_length_one_sample_per_row(tmp_path, packing, row_tokens, counted):
    """Without packing, the longest padded row the data gives (capped at data.seq_len) is the budget's sequence
    length: the same budget as data.seq_len set to it. Packed rows fill seq_len whatever the samples."""
    from harness.config import load_recipe

    (tmp_path / "config.json").write_text(json.dumps(_cfg("llama-3.1-8b")))
    over = [f"model.path={tmp_path}", f"data.packing={str(packing).lower()}", "data.seq_len=2048"]
    recipe = load_recipe(str(REPO / "harness/recipes/llama3_8b_qlora.yaml"), over)
    same = load_recipe(str(REPO / "harness/recipes/llama3_8b_qlora.yaml"), [*over[:-1], f"data.seq_len={counted}"])
    b = budget_for_recipe(recipe, world_size=8, device_memory_bytes=None, row_tokens=row_tokens)
    ref = budget_for_recipe(same, world_size=8, device_memory_bytes=None)
    assert {k: v for k, v in b.phase_bytes.items() if k != "generate"} == {k: v for k, v in ref.phase_bytes.items() if k != "generate"}
    assert b.peak_bytes < budget_for_recipe(recipe, world_size=8, device_memory_bytes=None).peak_bytes or counted == 2048


# (device, GPU size as a multiple of the point peak, verdict): on CUDA, uncalibrated, "fits" needs the band's upper end
@pytest.mark.parametrize("device, times_peak, verdict", [
    ("cuda", 1.0 + GPU_UNCALIBRATED_BAND + SAFETY_MARGIN + 0.001, "fits"), ("cuda", 1.0 + SAFETY_MARGIN + 0.001, "may not fit"),
    ("cuda", 1.0, "does not fit"), ("cpu", 1.0 + SAFETY_MARGIN + 0.001, "fits"), ("cpu", 1.0, "does not fit"),
])
def test_gpu_verdict_carries_the_uncalibrated_band(device, times_peak, verdict):
    from harness.memory.report import verdict_line

    shape = load_model_shape("llama-3.1-70b")
    setup = TrainSetup(method="qlora", seq_len=2048, checkpointing="full", device=device)
    peak = compose(shape, setup, 8).peak_bytes
    b = compose(shape, setup, 8, cluster=Cluster(nodes=1, gpus_per_node=8, gpu_memory_bytes=int(peak * times_peak)))
    assert b.verdict == verdict and b.fits == (verdict == "fits")
    line = verdict_line(b)
    assert line.startswith(verdict.upper()) and (("uncalibrated on GPU; up to +33%" in line) == (device == "cuda")), line


def test_cli_outputs_and_exit_codes(tmp_path, capsys):

    from harness.memory import cli as memory_budget

    out_json = tmp_path / "b.json"
    rc = memory_budget.main(["--model", "llama-3.1-70b", "--method", "qlora", "--seq-len", "2048", "--micro-batch", "1", "--checkpointing", "full",
                             "--zero-stage", "3", "--nodes", "8", "--gpus-per-node", "8", "--gpu-memory-gib", "80", "--markdown",
                             "--json", str(out_json), "--no-deepspeed"])
    text = capsys.readouterr().out
    assert rc == 0 and "| phase | GiB |" in text and "FITS" in text
    data = json.loads(out_json.read_text())
    assert data["peak_bytes"] == max(data["phase_bytes"].values()) and data["setup"]["zero_stage"] == 3
    # 8B full fine-tuning without ZeRO on one 24 GiB GPU does not fit: exit 1
    assert memory_budget.main(["--model", "llama-3.1-8b", "--method", "full", "--zero-stage", "0", "--nodes", "1", "--gpus-per-node", "1",
                               "--gpu-memory-gib", "24", "--no-deepspeed", "--no-search"]) == 1
    assert memory_budget.main(["--model", "llama-3.1-8b", "--nodes", "0"]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_plot(tmp_path):
    pytest.importorskip("matplotlib")

    from harness.memory import cli as memory_budget

    png = tmp_path / "b.png"
    assert memory_budget.main(["--model", "llama-3.1-8b", "--plot", str(png), "--no-deepspeed", "--no-search"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# a classifier (task=classification): no (s, V) logits, and the trained score head keeps the final norm's output;
# a soft prompt (virtual_tokens: method names the frozen base) and LoRA on two targets of a 16-bit base under
# ZeRO-3 (DeepSpeed's F.linear saves every linear's input) or ZeRO-0 (it does not); (variant, tolerance of saved,
# tolerance of the peaks)
@pytest.mark.parametrize("variant, tol_saved, tol_peaks", [
    (dict(checkpointing="every_k", checkpoint_every_k=2), 0.001, 0.001),
    (dict(checkpointing="none", lora_dropout=0.05), None, None),
    (dict(checkpointing="none", num_labels=3), 0.001, 0.02),
    (dict(checkpointing="full", num_labels=3), 0.001, 0.02),
    (dict(method="lora", virtual_tokens=20, checkpointing="none"), 0.002, 0.003),
    (dict(method="qlora", virtual_tokens=20, checkpointing="full", num_labels=3), 0.01, 0.02),
    (dict(method="lora", virtual_tokens=20, checkpointing="none", precision="fp32", micro_batch=2, seq_len=1024), 0.005, 0.005),
    (dict(method="lora", lora_targets=("q_proj", "v_proj"), checkpointing="none"), 0.001, 0.001),
    (dict(method="lora", lora_targets=("q_proj", "v_proj"), checkpointing="none", zero_stage=0), 0.001, 0.001),
    # kernels: [linear_cross_entropy] (the fused, chunked loss head, 128,256-token vocabulary): gradients made in the
    # forward and kept to the backward, one chunk of fp32 logits at a time; a trained head's dW too (method=full)
    (dict(checkpointing="none", fused_loss=True), 0.001, 0.01),
    (dict(checkpointing="full", fused_loss=True, precision="fp32"), 0.001, 0.02),
    (dict(method="full", checkpointing="full", fused_loss=True, device="cuda"), 0.003, 0.01),
    (dict(method="full", checkpointing="none", fused_loss=True, precision="fp32"), 0.001, 0.001),
])
def test_engines_agree_on_every_k_lora_dropout_a_classifier_and_a_soft_prompt(variant, tol_saved, tol_peaks):
    """every_k checkpointing is exact and so is what a classifier saves; its peaks, reached in the final norm's fp32
    upcast or a layer's backward rather than in vocabulary-wide logits, are modelled within 2% (8B: forward 0.4% and
    backward 0.6% under; with full checkpointing, backward 1.5% under, inside the verdict's 3% margin); LoRA
    dropout's copies within 3% (analytic above). A soft prompt (the base frozen, gradient through every layer, the
    loss over logits[:, P:]) within 0.5%."""
    from harness.memory.trace import trace_profile

    shape = ModelShape.from_config(_cfg("llama-3.1-8b"))
    setup = TrainSetup(**{"method": "qlora", "seq_len": 2048, "device": "cpu", **variant})
    a, t = activation_profile(shape, setup), trace_profile(_cfg("llama-3.1-8b"), setup)
    for what in ("saved", "fwd_peak", "bwd_peak"):
        x, y = getattr(a, what)(shape.layers), getattr(t, what)(shape.layers)
        if setup.lora_dropout:
            assert 0 <= x - y <= 0.03 * y, (variant, what, x, y)
        else:
            assert abs(x - y) <= (tol_saved if what == "saved" else tol_peaks) * y, (variant, what, x / y - 1)


REAL_REL = 0.01


# model: the tiny random Llama, or SmolLM2-135M-Instruct (the real-model fixture); tolerance of the gathered bytes
@pytest.mark.parametrize("model, gather, rel", [("tiny", True, 0.04), ("tiny", False, None), ("real", True, REAL_REL)])
def test_generation_phase_only_with_generation_and_its_kv_cache_is_what_transformers_allocates(request, model, gather, rel):
    """eval.generate_samples adds a `generate` phase: the resident state, the weights gathered for it and
    the KV cache. The KV line equals the cache transformers' generate really builds (fp32; the cache
    holds every position but the last generated one), on the tiny model and on SmolLM2."""
    import torch
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue("tiny_llama" if model == "tiny" else "real_model")
    shape = ModelShape.from_config(json.loads((path / "config.json").read_text()), name=model)
    base = TrainSetup(method="qlora", precision="fp32", micro_batch=2, seq_len=64, zero_stage=3, device="cpu")
    assert "generate" not in compose(shape, base, 2).phase_bytes
    batch, prompt, new = 3, 20, 5
    with_gen = compose(shape, dataclasses.replace(base, generate_batch=batch, generate_tokens=prompt + new, generate_gather=gather), 2)
    lines = {ln.name: ln for ln in with_gen.lines}
    assert ("whole model gathered for generation" in lines) == gather
    assert with_gen.phase_bytes["generate"] >= sum(ln.bytes for ln in with_gen.lines if ln.phases[:4] == ("load", "forward", "backward", "step"))

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(3, shape.vocab, (batch, prompt), generator=torch.Generator().manual_seed(0))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=0)
    cache = out.past_key_values
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    predicted = lines["KV cache (generation)"].bytes * (prompt + new - 1) / (prompt + new)
    assert cache_bytes == pytest.approx(predicted, rel=1e-9)
    if gather:  # the gathered model: every tensor the quantised model with adapters holds, once per storage
        import peft
        from transformers import BitsAndBytesConfig

        q = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=torch.float32))
        q = peft.get_peft_model(q, peft.LoraConfig(r=base.lora_r, target_modules="all-linear"))
        tensors = list(q.parameters())
        for m in q.modules():  # the quantisation state: block scales, their own scales, the code books
            st = getattr(getattr(m, "weight", None), "quant_state", None)
            if st is not None:
                tensors += [st.absmax, st.code, st.offset, st.state2.absmax, st.state2.code]
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if isinstance(t, torch.Tensor)}
        # The budget counts the scales per parameter but not each layer's code books (16 + 256 fp32, some
        # shared): ~0.5 KB per 4-bit layer, 3.4% of this tiny model (measured 447,856 B held, 432,530 B
        # predicted), a few hundred KB at 70B.
        gathered = lines["whole model gathered for generation"].bytes
        print(f"{model}: gathered for generation {gathered:,.0f} B predicted, {sum(held.values()):,} B held; KV {cache_bytes:,} B")
        assert lines["whole model gathered for generation"].bytes == pytest.approx(sum(held.values()), rel=rel)



ZERO3_LINEAR_PROBE = """
import json, torch, deepspeed
import torch.nn.functional as F
from deepspeed.runtime.zero.linear import zero3_linear_wrap

# Without this, zero.Init's process group on a CPU-only machine first JIT-compiles DeepSpeed's shared-memory
# allreduce (deepspeed_shm_comm: about a minute of g++ on a fresh machine); the linear needs no allreduce.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

def saved_input_bytes(linear):
    x = torch.randn(8, 32, requires_grad=True)  # gradient flows to the input, as to a soft prompt
    weight = torch.randn(16, 32)  # frozen
    seen = {}
    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.nbytes
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear(x, weight).sum().backward()
    return seen.get(x.untyped_storage().data_ptr(), 0)

plain = saved_input_bytes(F.linear)
with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 1, "zero_optimization": {"stage": 3}}, dtype=torch.float32):
    torch.nn.Linear(4, 4)
print(json.dumps({"plain": plain, "replaced": torch.nn.functional.linear is zero3_linear_wrap,
                  "zero3": saved_input_bytes(torch.nn.functional.linear)}))
"""


def test_zero3_linear_saves_the_input_of_a_frozen_linear():
    """The premise of input_saving_linears, checked with plain torch and DeepSpeed only (in a process of its own:
    zero.Init sets up a process group and replaces F.linear for good): after a deepspeed.zero.Init, F.linear is
    DeepSpeed's memory-efficient replacement, which saves a frozen linear's input for backward; plain torch's saves
    none. No CPU-specific kernel is involved."""
    import json
    import sys

    from tests.helpers import child_env, free_port, run_bounded

    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    proc = run_bounded([sys.executable, "-c", ZERO3_LINEAR_PROBE], env, timeout_s=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"plain": 0, "replaced": True, "zero3": 8 * 32 * 4}, got  # the whole fp32 input
