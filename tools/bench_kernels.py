"""Speed and peak memory of the fused kernels (harness/kernels) against PyTorch eager, torch.compile
and Liger-Kernel (when installed; its kernels need CUDA).

    python tools/bench_kernels.py                      # CPU: the linear + cross-entropy memory check
    python tools/bench_kernels.py --kernels all        # CUDA: every kernel, bf16, fwd+bwd (nf4: dequantise)
    TRITON_INTERPRET=1 python tools/bench_kernels.py --smoke   # CPU: every case at tiny shapes (runs, no figures)
    python tools/bench_kernels.py --json out.json      # also write the figures

Memory on CPU is measured, not estimated: each variant runs in a fresh process and reports its RSS
high-water mark (which sees every allocation torch makes) minus its RSS after the
inputs were allocated (the high-water mark is reset there through /proc/self/clear_refs and read
as VmHWM). On CUDA: torch.cuda.max_memory_allocated minus the allocation before the call.

CPU target (issue 7): V=128256, 4096 tokens, hidden 4096, fp32, frozen head (QLoRA), loss + backward:
the chunked path's peak extra memory must be at most 10% of the unfused path's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent

MIB = 2**20


# ---- CPU: linear + cross-entropy peak memory, one fresh process per variant ------------------------


def _peak_rss_bytes() -> int:
    """This process's RSS high-water mark: VmHWM (the address space's own peak; getrusage's ru_maxrss
    would also count the parent's RSS from before exec, which is inherited)."""
    from harness.memory.live import peak_rss_bytes

    peak = peak_rss_bytes(since_reset=True)
    if peak is None:
        raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")
    return peak


def _reset_peak_rss() -> None:
    from harness.memory.live import reset_peak_rss

    if not reset_peak_rss():  # Linux >= 4.0: VmHWM := current RSS
        raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs)")


def measure_lce_memory(variant: str, tokens: int, hidden: int, vocab: int, seed: int = 0) -> dict:
    """Runs in its own process (see main): loss + backward with a frozen head, hidden requiring grad."""
    from harness.kernels import linear_cross_entropy, linear_cross_entropy_reference

    # Warm up both paths on a tiny shape first: the first call pages in BLAS / autograd code and
    # allocator pools, which would otherwise count as the measured call's memory.
    for f in (linear_cross_entropy, linear_cross_entropy_reference):
        f(torch.randn(8, 16, requires_grad=True), torch.randn(32, 16), torch.randint(0, 32, (8,))).backward()
    torch.manual_seed(seed)
    # Allocated in place (no temporaries), so the RSS high-water mark before the call is the inputs.
    x = torch.empty(tokens, hidden).normal_().requires_grad_(True)
    w = torch.empty(vocab, hidden).normal_(std=hidden**-0.5)
    t = torch.randint(0, vocab, (tokens,))
    t[: tokens // 10] = -100  # a prompt's worth of ignored tokens
    gc.collect()
    _reset_peak_rss()
    rss_before = psutil.Process().memory_info().rss
    maxrss_before = _peak_rss_bytes()
    t0 = time.perf_counter()
    fn = linear_cross_entropy if variant == "chunked" else linear_cross_entropy_reference
    loss = fn(x, w, t, reduction="sum")
    loss.backward()
    seconds = time.perf_counter() - t0
    maxrss_after = _peak_rss_bytes()
    return {
        "variant": variant, "tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": "fp32",
        "loss": float(loss.detach()), "grad_norm": float(x.grad.norm()), "seconds": seconds,
        "rss_before_mib": rss_before / MIB, "maxrss_before_mib": maxrss_before / MIB, "maxrss_after_mib": maxrss_after / MIB,
        "peak_extra_mib": (maxrss_after - rss_before) / MIB,
    }


def lce_memory_report(tokens: int, hidden: int, vocab: int) -> dict:
    # A fixed glibc mmap threshold: every buffer over 1 MiB is its own mapping, returned to the OS when
    # torch frees it. With glibc's default dynamic threshold, freed chunk-sized buffers stay in the heap
    # and, fragmented, RSS kept up to ~150 MiB of dead chunks in some runs: allocator retention, not live
    # tensors. Both variants run under the same setting.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    rows = {}
    for variant in ("unfused", "chunked"):
        cmd = [sys.executable, __file__, "--measure-lce-memory", variant, "--tokens", str(tokens), "--hidden", str(hidden), "--vocab", str(vocab)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{variant} run failed:\n{proc.stderr[-3000:]}")
        rows[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    u, c = rows["unfused"], rows["chunked"]
    ratio = c["peak_extra_mib"] / u["peak_extra_mib"]
    print(f"linear+CE, N={tokens} H={hidden} V={vocab} fp32, frozen head, loss+backward (fresh process each, VmHWM - RSS before):")
    print(f"  {'variant':8s} {'peak extra MiB':>15s} {'seconds':>9s} {'loss':>16s}")
    for r in (u, c):
        print(f"  {r['variant']:8s} {r['peak_extra_mib']:15.1f} {r['seconds']:9.1f} {r['loss']:16.4f}")
    logits_mib = tokens * vocab * 4 / MIB
    print(f"  one fp32 logits tensor = {logits_mib:.0f} MiB; chunked / unfused = {ratio:.3f} (target <= 0.10: "
          f"{'PASS' if ratio <= 0.10 else 'FAIL'}); |loss diff| / loss = {abs(c['loss'] - u['loss']) / abs(u['loss']):.1e}")
    return {"linear_cross_entropy_cpu_memory": rows, "ratio": ratio, "malloc_mmap_threshold_bytes": 1 << 20}


# ---- speed: every kernel, eager vs torch.compile vs ours vs Liger / bitsandbytes ---------------------


def _time_and_memory(fn, inputs_fn, reps: int) -> tuple[float, float | None]:
    """Median ms of one call (fwd+bwd for the differentiable kernels) and, on CUDA, the peak extra MiB
    above the inputs (None on CPU, where --smoke only proves the code path runs)."""
    on_cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    for _ in range(1 if reps < 5 else 3):  # warm-up: Triton compiles / autotunes, torch.compile traces
        fn(*inputs_fn())
    sync()
    times_ms = []
    for _ in range(reps):
        args = inputs_fn()
        sync()
        t0 = time.perf_counter()
        fn(*args)
        sync()
        times_ms.append(1e3 * (time.perf_counter() - t0))
    if not on_cuda:
        return sorted(times_ms)[len(times_ms) // 2], None
    args = inputs_fn()
    gc.collect()
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    sync()
    return sorted(times_ms)[len(times_ms) // 2], (torch.cuda.max_memory_allocated() - base) / MIB


# Llama-3-8B sizes (hidden 4096, MLP 14336, 32/8 heads of 128, vocab 128256); --smoke: tiny ones.
FULL_SHAPES = {"tokens": 8192, "hidden": 4096, "mlp": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128,
               "rope_batch": 4, "rope_seq": 2048, "vocab": 128256}
SMOKE_SHAPES = {"tokens": 64, "hidden": 64, "mlp": 96, "heads": 4, "kv_heads": 2, "head_dim": 16,
                "rope_batch": 2, "rope_seq": 16, "vocab": 512}


def kernel_cases(names: list[str], dev: str, shapes: dict, with_compile: bool):
    """(kernel, shape text, inputs_fn, {variant: fn}). The differentiable kernels run fwd+bwd with the
    weights frozen, as under LoRA / QLoRA; nf4 is a forward-only dequantisation of one MLP weight."""
    from harness import _optional
    from harness.kernels import (linear_cross_entropy, linear_cross_entropy_reference, rmsnorm, rmsnorm_reference, rope, rope_reference,
                                 swiglu, swiglu_reference)

    dtype = torch.bfloat16 if dev == "cuda" else torch.float32  # no native bf16 on the CPU machines
    liger = dev == "cuda" and _optional.available("liger_kernel")  # Liger's kernels are CUDA-only
    n, h, v = shapes["tokens"], shapes["hidden"], shapes["vocab"]

    def backward(out):
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    def run(f):
        return lambda *a: backward(f(*a))

    def variants(reference, ours, liger_fn=None, train=True):
        wrap = run if train else (lambda f: f)
        fns = {"eager": wrap(reference)}
        if with_compile:
            fns["compile"] = wrap(torch.compile(reference))
        fns["harness"] = wrap(ours)
        if liger and liger_fn is not None:
            fns["liger"] = wrap(liger_fn())
        return fns

    cases = []
    if "rmsnorm" in names:
        # Each case's tensors have their own names: the lambdas read them when called, after every case is built.
        norm_w = torch.ones(h, device=dev, dtype=dtype)

        def liger_rmsnorm():
            from liger_kernel.transformers.functional import liger_rms_norm
            return lambda x: liger_rms_norm(x, norm_w, 1e-5)
        fns = variants(lambda x: rmsnorm_reference(x, norm_w, 1e-5), lambda x: rmsnorm(x, norm_w, 1e-5), liger_rmsnorm)
        cases.append(("rmsnorm", f"{n}x{h}", lambda: (torch.randn(n, h, device=dev, dtype=dtype, requires_grad=True),), fns))
    if "rope" in names:
        b, t, d, hq, hk = shapes["rope_batch"], shapes["rope_seq"], shapes["head_dim"], shapes["heads"], shapes["kv_heads"]
        pos = torch.arange(t, device=dev)
        inv = 1.0 / (500000 ** (torch.arange(0, d, 2, device=dev).float() / d))
        emb = torch.cat([pos[:, None] * inv] * 2, -1)
        cos, sin = emb.cos()[None].to(dtype), emb.sin()[None].to(dtype)

        def qk():  # (batch, heads, seq, head_dim) views of (batch, seq, heads, head_dim), as HF's attention makes them
            return (torch.randn(b, t, hq, d, device=dev, dtype=dtype).transpose(1, 2).requires_grad_(True),
                    torch.randn(b, t, hk, d, device=dev, dtype=dtype).transpose(1, 2).requires_grad_(True))

        def liger_rope_fn():
            from liger_kernel.transformers.functional import liger_rope
            return lambda q, k: liger_rope(q, k, cos, sin)
        fns = variants(lambda q, k: rope_reference(q, k, cos, sin), lambda q, k: rope(q, k, cos, sin), liger_rope_fn)
        cases.append(("rope", f"q {b}x{hq}x{t}x{d}, k {b}x{hk}x{t}x{d}", qk, fns))
    if "swiglu" in names:
        m = shapes["mlp"]

        def liger_swiglu_fn():
            from liger_kernel.transformers.functional import liger_swiglu
            return liger_swiglu
        fns = variants(swiglu_reference, swiglu, liger_swiglu_fn)
        cases.append(("swiglu", f"{n}x{m}", lambda: tuple(torch.randn(n, m, device=dev, dtype=dtype, requires_grad=True) for _ in range(2)), fns))
    if "linear_cross_entropy" in names:
        head_w = torch.randn(v, h, device=dev, dtype=dtype) * h**-0.5  # frozen head
        tgt = torch.randint(0, v, (n,), device=dev)

        def liger_flce():
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
            return lambda x: liger_fused_linear_cross_entropy(x, head_w, tgt, reduction="sum")
        fns = variants(lambda x: linear_cross_entropy_reference(x, head_w, tgt), lambda x: linear_cross_entropy(x, head_w, tgt), liger_flce)
        cases.append(("linear_cross_entropy", f"N={n} H={h} V={v}, frozen head",
                      lambda: (torch.randn(n, h, device=dev, dtype=dtype, requires_grad=True),), fns))
    if "nf4" in names:
        cases.append(nf4_case(dev, dtype, shapes, with_compile))
    return cases


def nf4_case(dev: str, dtype: torch.dtype, shapes: dict, with_compile: bool):
    """Dequantise one (mlp x hidden) NF4 weight with double quantisation, packed in `dtype` storage as
    under ZeRO-3: ours vs the PyTorch reference vs bitsandbytes' own dequantize_4bit."""
    import bitsandbytes.functional as bnbf

    from harness.kernels import nf4_dequantize, nf4_dequantize_reference

    w = torch.randn(shapes["mlp"], shapes["hidden"], device=dev, dtype=dtype)
    packed, qs = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, quant_storage=dtype)
    fns = {"eager": lambda: nf4_dequantize_reference(packed, qs, dtype)}
    if with_compile:
        compiled = torch.compile(nf4_dequantize_reference)
        fns["compile"] = lambda: compiled(packed, qs, dtype)
    fns["harness"] = lambda: nf4_dequantize(packed, qs, dtype)
    fns["bitsandbytes"] = lambda: bnbf.dequantize_4bit(packed, qs)
    return ("nf4", f"{shapes['mlp']}x{shapes['hidden']} dequantise, {str(dtype).removeprefix('torch.')} storage", lambda: (), fns)


def speed_report(names: list[str], smoke: bool) -> dict:
    from harness.kernels import _runtime

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    reps = 2 if smoke else 20
    with_compile = dev == "cuda"  # inductor on CPU needs a C++ toolchain and minutes; the figures that matter are GPU ones
    where = torch.cuda.get_device_name() if dev == "cuda" else (
        "CPU, Triton interpreter" if _runtime.interpreting() else "CPU, PyTorch fallbacks (set TRITON_INTERPRET=1 for the Triton path)")
    print(f"{where}: median of {reps} (ms) and peak extra memory (MiB, CUDA only){'; --smoke shapes' if smoke else ''}")
    results = {}
    for kernel, shape, inputs_fn, fns in kernel_cases(names, dev, SMOKE_SHAPES if smoke else FULL_SHAPES, with_compile):
        results[kernel] = {}
        for variant, fn in fns.items():
            launches_before = sum(_runtime.LAUNCHES.values())
            try:
                ms, mib = _time_and_memory(fn, inputs_fn, reps)
            except Exception as e:  # one failing baseline (e.g. an old Liger) must not hide the rest
                print(f"  {kernel:22s} {variant:12s} failed: {type(e).__name__}: {e}")
                results[kernel][variant] = {"error": f"{type(e).__name__}: {e}", "shape": shape}
                continue
            triton_launches = sum(_runtime.LAUNCHES.values()) - launches_before
            results[kernel][variant] = {"ms": ms, "peak_extra_mib": mib, "shape": shape, "triton_launches": triton_launches}
            mem = f"{mib:10.1f} MiB" if mib is not None else f"{'-':>10s} MiB"
            print(f"  {kernel:22s} {variant:12s} {ms:9.3f} ms {mem}   ({shape})")
        ours, eager = results[kernel].get("harness", {}), results[kernel].get("eager", {})
        if "ms" in ours and "ms" in eager:
            print(f"  {kernel:22s} speed-up of harness over eager: {eager['ms'] / ours['ms']:.2f}x")
    return results


def main(argv=None) -> int:
    from harness.config import KERNELS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="all", help="comma list of " + ",".join(KERNELS) + " (speed cases), or all")
    p.add_argument("--tokens", type=int, default=4096, help="CPU memory check: tokens")
    p.add_argument("--hidden", type=int, default=4096, help="CPU memory check: hidden size")
    p.add_argument("--vocab", type=int, default=128256, help="CPU memory check: vocabulary")
    p.add_argument("--smoke", action="store_true",
                   help="every speed case at tiny shapes, 2 repetitions, on CUDA or on CPU (Triton kernels under "
                        "TRITON_INTERPRET=1): proves the benchmark runs; its figures mean nothing")
    p.add_argument("--json", default="", help="write the figures to this file")
    p.add_argument("--measure-lce-memory", choices=("unfused", "chunked"), help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args(argv)
    if args.measure_lce_memory:
        print(json.dumps(measure_lce_memory(args.measure_lce_memory, args.tokens, args.hidden, args.vocab)))
        return 0
    names = list(KERNELS) if args.kernels == "all" else args.kernels.split(",")
    bad = [n for n in names if n not in KERNELS]
    if bad:
        p.error(f"unknown kernels {bad}; choose from {', '.join(KERNELS)}")
    results = {}
    failed = []
    if torch.cuda.is_available() or args.smoke:
        speed = results["cuda" if torch.cuda.is_available() else "cpu_smoke"] = speed_report(names, args.smoke)
        # Our kernel or its reference failing is a defect (exit 1); a baseline (Liger, compile) failing is reported only.
        failed = [f"{k}/{v}" for k, rows in speed.items() for v, r in rows.items() if "error" in r and v in ("harness", "eager")]
    else:
        print("no CUDA device: speed of the Triton kernels, torch.compile and Liger is not measured here (Liger needs CUDA)")
        results["cpu"] = lce_memory_report(args.tokens, args.hidden, args.vocab)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
