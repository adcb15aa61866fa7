"""Speed and peak memory of the fused kernels (harness/kernels) against PyTorch eager, torch.compile
and Liger-Kernel (when installed; its kernels need CUDA).

    python tools/bench_kernels.py                      # CPU: the linear + cross-entropy memory check
    python tools/bench_kernels.py --kernels all        # CUDA: every kernel, bf16, fwd+bwd
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import torch  # noqa: E402

MIB = 2**20


# ---- CPU: linear + cross-entropy peak memory, one fresh process per variant ------------------------


def _peak_rss_bytes() -> int:
    """This process's RSS high-water mark: VmHWM of /proc/self/status (the address space's own peak;
    getrusage's ru_maxrss would also count the parent's RSS from before exec, which is inherited)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := current RSS


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


# ---- CUDA: every kernel, eager vs torch.compile vs ours vs Liger -----------------------------------


def _cuda_time_and_memory(fn, inputs_fn, reps: int = 20) -> tuple[float, float]:
    """Median ms of fwd+bwd and peak extra MiB above the inputs."""
    for _ in range(3):
        fn(*inputs_fn())
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        args = inputs_fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    args = inputs_fn()
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / MIB
    return sorted(times)[len(times) // 2], peak


def cuda_cases(names: list[str]):
    """(kernel, shape text, inputs_fn, {variant: fwd+bwd fn}) at Llama-3-8B sizes, bf16."""
    from harness import _optional
    from harness.kernels import linear_cross_entropy, linear_cross_entropy_reference, rmsnorm, rmsnorm_reference, rope, rope_reference, swiglu, swiglu_reference

    dev, bf16 = "cuda", torch.bfloat16
    liger = _optional.available("liger_kernel")

    def backward(out):
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    def run(f):
        return lambda *a: backward(f(*a))

    cases = []
    if "rmsnorm" in names:
        w = torch.ones(4096, device=dev, dtype=bf16)  # frozen, as in LoRA
        fns = {"eager": run(lambda x: rmsnorm_reference(x, w, 1e-5)), "compile": run(torch.compile(lambda x: rmsnorm_reference(x, w, 1e-5))),
               "harness": run(lambda x: rmsnorm(x, w, 1e-5))}
        if liger:
            from liger_kernel.transformers.functional import liger_rms_norm
            fns["liger"] = run(lambda x: liger_rms_norm(x, w, 1e-5))
        cases.append(("rmsnorm", "8192x4096", lambda: (torch.randn(8192, 4096, device=dev, dtype=bf16, requires_grad=True),), fns))
    if "rope" in names:
        b, t, d = 4, 2048, 128
        pos = torch.arange(t, device=dev)
        inv = 1.0 / (500000 ** (torch.arange(0, d, 2, device=dev).float() / d))
        emb = torch.cat([pos[:, None] * inv] * 2, -1)
        cos, sin = emb.cos()[None].to(bf16), emb.sin()[None].to(bf16)
        qk = lambda: (torch.randn(b, t, 32, d, device=dev, dtype=bf16).transpose(1, 2).requires_grad_(True),  # noqa: E731
                      torch.randn(b, t, 8, d, device=dev, dtype=bf16).transpose(1, 2).requires_grad_(True))
        fns = {"eager": run(lambda q, k: rope_reference(q, k, cos, sin)), "compile": run(torch.compile(lambda q, k: rope_reference(q, k, cos, sin))),
               "harness": run(lambda q, k: rope(q, k, cos, sin))}
        if liger:
            from liger_kernel.transformers.functional import liger_rope
            fns["liger"] = run(lambda q, k: liger_rope(q, k, cos, sin))
        cases.append(("rope", f"q {b}x32x{t}x{d}, k {b}x8x{t}x{d}", qk, fns))
    if "swiglu" in names:
        gu = lambda: tuple(torch.randn(8192, 14336, device=dev, dtype=bf16, requires_grad=True) for _ in range(2))  # noqa: E731
        fns = {"eager": run(swiglu_reference), "compile": run(torch.compile(swiglu_reference)), "harness": run(swiglu)}
        if liger:
            from liger_kernel.transformers.functional import liger_swiglu
            fns["liger"] = run(liger_swiglu)
        cases.append(("swiglu", "8192x14336", gu, fns))
    if "linear_cross_entropy" in names:
        n, h, v = 8192, 4096, 128256
        w = torch.randn(v, h, device=dev, dtype=bf16) * h**-0.5  # frozen head
        tgt = torch.randint(0, v, (n,), device=dev)
        fns = {"eager": run(lambda x: linear_cross_entropy_reference(x, w, tgt)),
               "compile": run(torch.compile(lambda x: linear_cross_entropy_reference(x, w, tgt))),
               "harness": run(lambda x: linear_cross_entropy(x, w, tgt))}
        if liger:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
            fns["liger"] = run(lambda x: liger_fused_linear_cross_entropy(x, w, tgt, reduction="sum"))
        cases.append(("linear_cross_entropy", f"N={n} H={h} V={v}, frozen head", lambda: (torch.randn(n, h, device=dev, dtype=bf16, requires_grad=True),), fns))
    return cases


def cuda_report(names: list[str]) -> dict:
    results = {}
    print(f"{torch.cuda.get_device_name()} bf16, fwd+bwd, median of 20 (ms) and peak extra memory (MiB)")
    for kernel, shape, inputs_fn, fns in cuda_cases(names):
        results[kernel] = {}
        for variant, fn in fns.items():
            try:
                ms, mib = _cuda_time_and_memory(fn, inputs_fn)
            except Exception as e:  # one failing baseline (e.g. an old Liger) must not hide the rest
                print(f"  {kernel:22s} {variant:8s} failed: {type(e).__name__}: {e}")
                continue
            results[kernel][variant] = {"ms": ms, "peak_extra_mib": mib, "shape": shape}
            print(f"  {kernel:22s} {variant:8s} {ms:9.3f} ms {mib:10.1f} MiB   ({shape})")
    return results


def main(argv=None) -> int:
    from harness.config import KERNELS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="all", help="comma list of " + ",".join(KERNELS) + " (CUDA timing), or all")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
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
    if torch.cuda.is_available():
        results["cuda"] = cuda_report(names)
    else:
        print("no CUDA device: speed of the Triton kernels, torch.compile and Liger is not measured here (Liger needs CUDA)")
        results["cpu"] = lce_memory_report(args.tokens, args.hidden, args.vocab)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
