"""tools/bench_train.py runs end to end on CPU (2 gloo ranks, tiny model): alternating repeated pairs, then a
second call that reuses the first's model and runs. A benchmark's figures are not checked here, only that its
runs are comparable."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import child_env, run_bounded

pytestmark = pytest.mark.distributed
TINY = ["--steps", "2", "--warmup-steps", "1", "--hidden", "64", "--layers", "2"]


def bench(work, *extra) -> tuple[dict, str]:
    out = work / f"figures-{len(list(work.glob('figures-*')))}.json"
    proc = run_bounded([sys.executable, "tools/bench_train.py", "--work-dir", str(work), *TINY, "--json", str(out), *extra],
                       child_env(), timeout_s=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_bench_train_refuses_a_comparison_without_its_base(tmp_path):
    proc = run_bounded([sys.executable, "tools/bench_train.py", "--work-dir", str(tmp_path), *TINY, "--runs", "harness+k"],
                       child_env(), timeout_s=120)
    assert proc.returncode == 2
    assert "harness, hf must run in this call" in proc.stderr


def test_bench_train_alternates_repeated_pairs_then_a_second_call_reuses_the_last(tmp_path):
    """--repeats: harness, hf, harness, hf (alternating), each pair's ratio and their median; --hf-set
    reaches the baseline only (here its checkpointing), and the harness side logs what "auto" chose. A
    second call, as the GPU preset (--gpu-8b) splits its runs over two device calls of at most 10 minutes,
    reuses the model and the last pair's runs and adds the kernels run."""
    sides = ["--harness-set", "train.gradient_checkpointing=auto", "--hf-set", "train.gradient_checkpointing=full"]
    figures, stdout = bench(tmp_path, "--repeats", "2", *sides)
    assert len(figures["ratios"]) == 2 and figures["median_ratio"] == pytest.approx(sum(figures["ratios"]) / 2)
    assert all(p["same_tokens_every_step"] for p in figures["pairs"])  # same layout: the same batches on both sides
    assert "harness gradient_checkpointing: none  # auto: budget peak" in stdout
    starts = [line.split("]")[1].split(":")[0].strip() for line in stdout.splitlines() if ": starting" in line]
    assert starts == ["harness.r0", "hf.r0", "harness.r1", "hf.r1"], starts
    hf_log = (tmp_path / "hf.r0.stdout.log").read_text()
    assert "gradient_checkpointing=full" in hf_log.split("hf baseline:", 1)[1].splitlines()[0]

    second, stdout = bench(tmp_path, "--kernels", "--runs", "harness+k", *sides)
    assert "reusing the model" in stdout
    assert second["config"]["runs_reused_from_earlier_call"] == ["harness", "hf"]
    assert set(second["summary"]) == {"harness", "hf", "harness+k"}
    assert second["summary"]["harness"]["tokens_per_s"] == pytest.approx(figures["pairs"][1]["harness"]["tokens_per_s"])  # as recorded
    assert second["same_tokens_every_step"], second["per_step"]
    # Same model, batches and loss before any update; later steps differ because HF's warm-up starts at
    # learning rate 0 (see tools/hf_trainer_baseline.py), which the check reports.
    step1 = [second["per_step"][name][0]["loss"] for name in ("harness", "hf")]
    assert abs(step1[0] - step1[1]) < 1e-4, step1
    assert second["learning_rate_check"].startswith("first differs at step 1")
    with_kernels = [r["loss"] for r in second["per_step"]["harness+k"]]
    plain = [r["loss"] for r in second["per_step"]["harness"]]
    assert max(abs(a - b) for a, b in zip(with_kernels, plain)) < 1e-4, (with_kernels, plain)
