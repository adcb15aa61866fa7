"""Fused kernels (harness/kernels): references, CPU fallbacks, the model patcher and the recipe key.

The Triton kernels themselves run under the Triton interpreter in tests/test_kernels_interp.py, in a
fresh process per kernel started here (TRITON_INTERPRET must be set before triton is imported, and
setting it in this process would leak into every later test and child launch).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from harness import config
from harness.kernels import (
    _runtime,
    apply_kernels,
    fused_loss_enabled,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    remove_kernels,
    resolve_kernel_names,
    rmsnorm,
    rmsnorm_reference,
    rope,
    rope_reference,
    swiglu,
)
from tests.helpers import REPO, child_env

INTERPRETING_HERE = _runtime.interpreting()
ARCH_LIKE = {"llama": "llama-3.1-8b", "mistral": "mistral-7b", "qwen2": "qwen2.5-7b"}


def tiny_causal_lm(arch: str, seed: int = 0):
    """A 2-layer, hidden-64 random model with the real architecture's config quirks (no files)."""
    from tools.make_tiny_model import _build_model, load_like_config, tiny_config_dict

    cfg = tiny_config_dict(load_like_config(ARCH_LIKE[arch]), layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96,
                           vocab_size=300, tie_embeddings=False, bos_id=1, eos_id=2, pad_id=0, dtype="float32", notes=[])
    return _build_model(cfg, seed, "float32").train()


def packed_batch(vocab: int, seed: int = 0) -> dict:
    """Two rows of 11 tokens; row 0 packs two samples (positions restart at 0), with ignored targets."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 11), generator=gen)
    pos = torch.stack([torch.cat([torch.arange(6), torch.arange(5)]), torch.arange(11)])
    targets = torch.randint(3, vocab, (2, 11), generator=gen)
    targets[0, :2] = -100
    targets[1, 5:7] = -100
    return {"input_ids": ids, "position_ids": pos, "targets": targets}


def loss_and_grads(model, batch: dict, fused: bool):
    """Token-loss sum (as harness/train.py computes it) and the gradient of every trainable parameter."""
    model.zero_grad(set_to_none=True)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if fused:
        loss = model(**inputs, token_targets=batch["targets"]).loss
    else:
        logits = model(**inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=-100, reduction="sum")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- the Triton kernels, under the interpreter, one subprocess per kernel ---------------------------


@pytest.mark.parametrize("kernel", ["rmsnorm", "rope", "swiglu", "linear_cross_entropy", "nf4", "patched"])
def test_triton_kernel_under_interpreter(kernel):
    cmd = [sys.executable, "-m", "pytest", "tests/test_kernels_interp.py", "-q", "-p", "no:cacheprovider", "-k", kernel]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(TRITON_INTERPRET="1", OMP_NUM_THREADS="2"), capture_output=True,
                          text=True, timeout=240)
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 2 and "skipped" not in proc.stdout, tail
    print(f"{kernel}: {passed.group(0)} under TRITON_INTERPRET=1")


# ---- references and CPU fallbacks (this process: no interpreter) -----------------------------------


@pytest.mark.skipif(INTERPRETING_HERE, reason="this process runs the Triton interpreter")
def test_cpu_without_interpreter_falls_back_to_references():
    x = torch.randn(4, 6, 16, requires_grad=True)
    before = dict(_runtime.LAUNCHES)
    assert not _runtime.use_triton(x)
    rmsnorm(x, torch.ones(16), 1e-6).sum().backward()
    swiglu(x, x).sum().backward()
    rope(x.view(4, 6, 2, 8), x.view(4, 6, 2, 8), torch.ones(1, 2, 8), torch.zeros(1, 2, 8))
    linear_cross_entropy(x, torch.randn(10, 16), torch.randint(0, 10, (4, 6))).backward()
    assert _runtime.LAUNCHES == before, "a Triton kernel ran on CPU without TRITON_INTERPRET"


def test_rmsnorm_reference_is_the_hugging_face_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(37, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 37)
    torch.testing.assert_close(rmsnorm_reference(x, norm.weight, 1e-5), norm(x), rtol=1e-6, atol=1e-6)


def test_rope_reference_is_the_hugging_face_rotation():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 4, 7, 10), torch.randn(2, 2, 7, 10)
    cos, sin = torch.randn(2, 7, 10), torch.randn(2, 7, 10)
    cos, sin = torch.cat([cos[..., :5]] * 2, -1), torch.cat([sin[..., :5]] * 2, -1)  # HF duplicates the halves
    for ours, theirs in zip(rope_reference(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("head_trainable", [False, True])
def test_chunked_linear_cross_entropy_matches_unfused(reduction, head_trainable):
    """The CPU path (chunked, plain PyTorch) against full logits + F.cross_entropy: loss and gradients."""
    torch.manual_seed(0)
    n, h, v = 53, 20, 301
    x0, w0 = torch.randn(n, h), 0.3 * torch.randn(v, h)
    t = torch.randint(0, v, (n,))
    t[::3] = -100
    results = []
    for fn in (lambda a, b: linear_cross_entropy(a, b, t, reduction=reduction, chunk_tokens=16),
               lambda a, b: linear_cross_entropy_reference(a, b, t, reduction=reduction)):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(head_trainable)
        loss = fn(x, w)
        (loss * 1.7).backward()  # a non-unit upstream gradient must scale the precomputed ones
        results.append((loss.detach(), x.grad, w.grad))
    (lf, xf, wf), (lr, xr, wr) = results
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xf, xr, rtol=1e-5, atol=1e-5)
    if head_trainable:
        torch.testing.assert_close(wf, wr, rtol=1e-5, atol=1e-5)
    else:
        assert wf is None and wr is None


def test_chunked_linear_cross_entropy_gradcheck_fp64():
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 10, -100, 3, 3, -100, 7])
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, t, reduction="mean", chunk_tokens=3), (x, w))


def test_linear_cross_entropy_no_grad_and_all_ignored():
    x, w = torch.randn(6, 4), torch.randn(9, 4)
    t = torch.full((6,), -100)
    with torch.no_grad():
        assert linear_cross_entropy(x, w, t).item() == 0.0
        assert linear_cross_entropy(x, w, t, reduction="mean").item() == 0.0  # no target tokens: 0, not nan


def test_linear_cross_entropy_rejects_bad_input():
    x, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="outside"):
        linear_cross_entropy(x, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="ZeRO-3"):
        linear_cross_entropy(x, torch.empty(0), torch.zeros(4, dtype=torch.long))  # a partitioned, ungathered weight


def test_chunked_linear_cross_entropy_uses_a_fraction_of_the_memory():
    """Peak extra RSS of loss + backward, each variant in a fresh process (tools/bench_kernels.py):
    N=2048 tokens, H=256, V=32000 fp32, frozen head: the chunked path must stay under 10% of unfused."""
    from tools.bench_kernels import lce_memory_report

    report = lce_memory_report(tokens=2048, hidden=256, vocab=32000)
    out = report["linear_cross_entropy_cpu_memory"]
    logits_mib = 2048 * 32000 * 4 / 2**20
    figures = f"{out} (one fp32 logits tensor = {logits_mib:.0f} MiB)"
    assert out["unfused"]["peak_extra_mib"] >= logits_mib, figures  # the measurement sees at least the logits
    assert out["chunked"]["peak_extra_mib"] <= 0.10 * out["unfused"]["peak_extra_mib"], figures
    assert abs(out["chunked"]["loss"] - out["unfused"]["loss"]) <= 1e-4 * abs(out["unfused"]["loss"])



def test_the_speed_benchmark_runs_every_kernel_through_triton(tmp_path):
    """tools/bench_kernels.py's speed cases (on a GPU: bf16 at Llama-3-8B sizes) at --smoke shapes on CPU,
    the Triton kernels under the interpreter: every case runs, and ours goes through Triton (launches
    counted) while eager does not. Guards the GPU benchmark against rot between GPU sessions."""
    out = tmp_path / "bench.json"
    env = {**child_env(), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "tools/bench_kernels.py", "--smoke", "--json", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["cpu_smoke"]
    assert set(rows) == set(config.KERNELS)
    for kernel, variants in rows.items():
        assert variants["harness"]["triton_launches"] > 0, (kernel, variants)
        assert variants["eager"]["triton_launches"] == 0, (kernel, variants)
        assert all(r["ms"] > 0 for r in variants.values()), (kernel, variants)
    assert "ms" in rows["nf4"]["bitsandbytes"]  # the bitsandbytes baseline for the dequantisation

# ---- the patcher ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_patched_model_matches_unpatched(arch):
    """All kernels on (CPU reference paths here; Triton under the interpreter in test_kernels_interp.py):
    same loss sum and same gradients on a packed batch, and remove_kernels restores the model."""
    model = tiny_causal_lm(arch)
    batch = packed_batch(model.config.vocab_size)
    loss_ref, grads_ref = loss_and_grads(model, batch, fused=False)
    counts = apply_kernels(model, "all")
    assert counts == {"rmsnorm": 5, "rope": 2, "swiglu": 2, "linear_cross_entropy": 1}  # 2 layers x 2 norms + final norm
    assert fused_loss_enabled(model)
    loss_k, grads_k = loss_and_grads(model, batch, fused=True)
    torch.testing.assert_close(loss_k, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads_k.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads_k[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)
    # Without token_targets the patched model still returns logits (generation, export, eval code).
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    assert remove_kernels(model) == 11 and not fused_loss_enabled(model)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(input_ids=batch["input_ids"]).logits, rtol=1e-5, atol=1e-5)


def test_patcher_under_peft_qlora_style_freezing():
    """LoRA adapters, frozen base and head: the head gets no gradient; adapters' grads match."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_causal_lm("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                           lora_dropout=0.0, init_lora_weights=False))
    batch = packed_batch(model.config.vocab_size, seed=1)
    loss_ref, grads_ref = loss_and_grads(model, batch, fused=False)
    apply_kernels(model, ["rmsnorm", "linear_cross_entropy"])
    loss_k, grads_k = loss_and_grads(model, batch, fused=True)
    torch.testing.assert_close(loss_k, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads_k.keys() == grads_ref.keys() and all("lora_" in n for n in grads_k)
    for name in grads_ref:
        torch.testing.assert_close(grads_k[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_patcher_refuses_what_it_cannot_patch():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(ValueError, match="set kernels: \\[\\]"):
        apply_kernels(gpt2, ["rmsnorm"])
    assert apply_kernels(gpt2, []) == {}  # off by default: nothing is touched, whatever the model
    with pytest.raises(ValueError, match="did you mean 'swiglu'"):
        resolve_kernel_names(["swiglo"])
    assert resolve_kernel_names("all") == list(config.KERNELS)


def test_recipe_key_is_validated(tiny_llama, tmp_path):
    recipe_path = str(REPO / "harness" / "recipes" / "tiny_qlora.yaml")
    base = [f"model.path={tiny_llama}"]
    assert config.load_recipe(recipe_path, base).kernels == []
    for good in ("kernels=all", "kernels=[rmsnorm, linear_cross_entropy]", "kernels=rope"):
        config.validate(config.load_recipe(recipe_path, base + [good]), world_size=2)
    for bad, msg in (("kernels=[rmsnrom]", "did you mean 'rmsnorm'"), ("kernels=[rope, rope]", "twice"), ("kernels=3", "must be a list")):
        with pytest.raises(config.ConfigError, match=re.escape(msg)):
            config.validate(config.load_recipe(recipe_path, base + [bad]), world_size=2)


# ---- NF4 (bitsandbytes 4-bit weights) -------------------------------------------------------------


def quantised(weight: torch.Tensor, storage: torch.dtype, nested: bool):
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=nested, quant_type="nf4",
                             quant_storage=storage).to("cpu")


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nested", [True, False])
def test_nf4_reference_is_bitsandbytes_dequantize(storage, nested):
    import bitsandbytes.functional as bnbf

    from harness.kernels import nf4_dequantize, nf4_dequantize_reference

    p = quantised(torch.randn(96, 72), storage, nested)  # 6912 weights = 108 blocks of 64
    expected = bnbf.dequantize_4bit(p.data, p.quant_state)
    assert torch.equal(nf4_dequantize_reference(p, p.quant_state), expected)
    assert torch.equal(nf4_dequantize(p, p.quant_state), expected)  # CPU fallback: the same reference


def qlora_model(path):
    from harness.config import load_recipe
    from harness.model import load_model

    recipe = load_recipe(None, [f"model.path={path}", "method=qlora", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0"])
    return load_model(recipe, precision="fp32", attn_implementation="sdpa", device=torch.device("cpu"))


def test_patched_qlora_model_matches_unpatched(tiny_llama):
    """QLoRA as the harness builds it (NF4 base, double quantisation, LoRA on all linear layers):
    every kernel including nf4 on, same loss and LoRA gradients."""
    model = qlora_model(tiny_llama)
    batch = packed_batch(model.config.vocab_size, seed=2)
    loss_ref, grads_ref = loss_and_grads(model, batch, fused=False)
    counts = apply_kernels(model, "all")
    assert counts["nf4"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    loss_k, grads_k = loss_and_grads(model, batch, fused=True)
    torch.testing.assert_close(loss_k, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads_k.keys() == grads_ref.keys() and len(grads_k) == 28
    for name in grads_ref:
        torch.testing.assert_close(grads_k[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
