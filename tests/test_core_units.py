"""Fast unit tests of the data stream, loss masking and model helpers (no process group)."""

from __future__ import annotations

import pytest
import torch

from harness import data
from harness import model as model_lib
from harness.config import SourceConfig


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sampler_covers_the_same_samples_for_any_world_size(world):
    n, G, mb = 103, 16, 2
    ref = data.StepSampler(n, G, mb, 1, 0, seed=7)
    for step in range(ref.steps_per_epoch + 2):  # crosses an epoch boundary
        union = sorted(i for r in range(world) for w in data.StepSampler(n, G, mb, world, r, seed=7).window(step) for i in w)
        assert union == sorted(i for w in ref.window(step) for i in w)
        assert len(union) == G == len(set(union))
    windows = data.StepSampler(n, G, mb, world, 0, seed=7).window(0)
    assert len(windows) == G // (mb * world) and all(len(w) == mb for w in windows)


def test_sampler_epochs_are_reshuffled_and_deterministic():
    a, b = data.StepSampler(64, 8, 8, 1, 0, seed=1), data.StepSampler(64, 8, 8, 1, 0, seed=1)
    assert [a.window(s) for s in range(16)] == [b.window(s) for s in range(16)]
    assert a.window(0) != a.window(8)  # epoch 2 starts with another order


@pytest.mark.parametrize("n,world", [(10, 2), (7, 2), (5, 4), (64, 3)])
def test_eval_batches_are_equal_per_rank_and_cover_each_sample_once(n, world):
    per_rank = [data.eval_batches(n, 2, world, r) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # same number of forwards on every rank (ZeRO-3)
    real = sorted(i for batches in per_rank for idx, w in batches for i, wt in zip(idx, w) if wt)
    assert real == list(range(n))


def test_alpaca_labels_cover_exactly_the_response(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    row = {"instruction": "Reverse the words.", "input": "red green blue", "output": "blue green red"}
    stats = data.DataStats()
    [(ids, targets)] = data.tokenize_rows([row], "alpaca", tok, 512, False, "raise", stats, "test")
    prompt = data.ALPACA_PROMPT_WITH_INPUT.format(**row)
    # Tokens predicted (targets shifted by one) decode to exactly the response plus EOS.
    predicted = targets[targets != data.IGNORE_INDEX]
    assert tok.decode(predicted) == row["output"] + tok.eos_token
    n_prompt = len(ids) - len(predicted)
    assert tok.decode(ids[:n_prompt], skip_special_tokens=True) == prompt
    assert stats.target_tokens == len(predicted)
    # train_on_inputs: every position but the last carries loss.
    [(_, all_targets)] = data.tokenize_rows([row], "alpaca", tok, 512, True, "raise", data.DataStats(), "test")
    assert int((all_targets != data.IGNORE_INDEX).sum()) == len(ids) - 1


def test_truncation_is_counted(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    stats = data.DataStats()
    samples = data.tokenize_rows([{"text": "word " * 200}], "text", tok, 16, False, "raise", stats, "test")
    assert len(samples[0][0]) == 16 and stats.truncated == 1


def test_collate_pads_right_with_no_loss_on_padding():
    a = (torch.tensor([5, 6, 7]), torch.tensor([6, 7, -100]))
    b = (torch.tensor([8]), torch.tensor([-100]))
    batch = data.collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["targets"].tolist() == [[6, 7, -100], [-100, -100, -100]]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(data.ConfigError, match=r"bad\.jsonl:2: malformed JSON"):
        data.load_rows(SourceConfig(path=str(p), format="text"), "raise", data.DataStats())
    stats = data.DataStats()
    assert len(data.load_rows(SourceConfig(path=str(p), format="text"), "skip", stats)) == 1 and stats.skipped_rows == 1


@pytest.mark.parametrize("policy,k,expected", [("none", 2, 0), ("full", 2, 4), ("every_k", 2, 2), ("every_k", 3, 2)])
def test_checkpointing_policies(tmp_path, policy, k, expected):


    from tools.make_tiny_model import make_tiny_model
    from transformers import AutoModelForCausalLM

    path = make_tiny_model("llama-3.1-8b", tmp_path / "m", layers=4)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model_lib.apply_gradient_checkpointing(model, policy, k) == expected


def test_4bit_weights_count_at_logical_size(tiny_llama):
    from transformers import AutoModelForCausalLM

    plain = model_lib.count_parameters(AutoModelForCausalLM.from_pretrained(tiny_llama))
    q = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=model_lib.quantization_config("qlora", torch.float32),
                                             device_map={"": "cpu"})
    assert model_lib.count_parameters(q).total == plain.total


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_warms_up_from_the_first_step_and_decays_to_the_floor(schedule):
    from harness.build import lr_factor

    f = [lr_factor(s, schedule=schedule, warmup_steps=4, max_steps=20, min_lr_ratio=0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]  # the first step already learns
    if schedule == "constant":
        assert all(x == 1.0 for x in f[4:])
    else:
        assert all(a >= b for a, b in zip(f[3:], f[4:])) and f[-1] == pytest.approx(0.1)


def test_flops_per_token_counts_frozen_base_and_recompute():
    from harness.metrics import train_flops_per_token

    kw = dict(matmul_params=1000, num_layers=2, hidden=8, seq_len=16, recompute_fraction=0.0)
    attn = 4 * 16 * 8 * 2
    fwd = 2 * 1000 + attn
    assert train_flops_per_token(trainable_matmul_params=1000, full_finetune=True, **kw) == fwd + fwd + 2000
    # LoRA: input gradients through the frozen base, weight gradients only for the adapters
    assert train_flops_per_token(trainable_matmul_params=10, full_finetune=False, **kw) == fwd + fwd + 20
    kw["recompute_fraction"] = 1.0
    assert train_flops_per_token(trainable_matmul_params=10, full_finetune=False, **kw) == 3 * fwd + 20


def isolate_launcher_env(monkeypatch) -> None:
    """launcher_env() writes os.environ directly; set-then-delete makes monkeypatch record each variable
    so the test's values are removed afterwards (else RANK=3 / WORLD_SIZE=4 leak into later tests'
    child processes)."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID",
                "SLURM_LOCALID"):
        monkeypatch.setenv(var, "unset")
        monkeypatch.delenv(var)


def test_srun_one_task_per_gpu_ranks_come_from_slurm(monkeypatch):
    import os

    from harness import config, distributed

    isolate_launcher_env(monkeypatch)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert config.env_world_size() == 4  # validation before init sees the step's size
    with pytest.raises(RuntimeError, match="MASTER_ADDR and MASTER_PORT is not set"):
        distributed.launcher_env()
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "23456")
    distributed.launcher_env()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("3", "1", "4")


def test_a_single_task_step_is_a_world_of_one(monkeypatch):
    import os

    from harness import distributed

    isolate_launcher_env(monkeypatch)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    distributed.launcher_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")


def test_exit_code_file_is_written_by_rank_0_only(monkeypatch, tmp_path):
    from harness import train

    target = tmp_path / "exit-123"
    monkeypatch.setenv("HARNESS_EXIT_CODE_FILE", str(target))
    monkeypatch.setenv("RANK", "1")
    train.write_exit_code(75)
    assert not target.exists()
    monkeypatch.setenv("RANK", "0")
    train.write_exit_code(75)
    assert target.read_text() == "75\n"



def test_a_run_the_budget_rejects_is_refused_with_the_table(tmp_path, capsys):
    import shutil
    from pathlib import Path

    from harness import config, memory, train

    repo = Path(__file__).resolve().parent.parent
    shutil.copy(repo / "harness" / "model_configs" / "llama-3.1-70b.json", tmp_path / "config.json")
    recipe = config.load_recipe(str(repo / "harness" / "recipes" / "llama3_70b_qlora.yaml"), [f"model.path={tmp_path}"])
    cfg = config.read_model_config(str(tmp_path))

    def check(world_size, gpu_gib):
        plan = memory.plan_for_target(recipe, world_size, device="cuda", device_memory_bytes=int(gpu_gib * 2**30), model_cfg=cfg)
        train.check_memory_budget(recipe, plan, cfg)
        return plan

    refused = r"(?s)does not fit in 24.0 GiB per GPU.*frozen 4-bit weights.*DOES NOT FIT.*train.memory_check=false"
    with pytest.raises(config.ConfigError, match=refused):
        check(1, 24)  # 70B in 4 bits is ~37 GiB before anything else, whatever checkpointing "auto" picks
    plan = check(64, 80)  # the recipe's own 8 x 8 x 80 GB: fits, no error
    assert "budget peak" in plan.why["gradient_checkpointing"]
    # A GPU the point estimate fits but the uncalibrated band's upper end does not: a warning, not a refusal.
    fixed = config.load_recipe(str(repo / "harness" / "recipes" / "llama3_70b_qlora.yaml"),
                               [f"model.path={tmp_path}", "train.gradient_checkpointing=full", "train.micro_batch_size=1"])
    peak = memory.budget_for_plan(fixed, memory.plan_for_target(fixed, 64, device="cuda", device_memory_bytes=80 * 2**30, model_cfg=cfg)).peak_bytes
    between = memory.plan_for_target(fixed, 64, device="cuda", device_memory_bytes=int(peak * 1.1), model_cfg=cfg)
    assert memory.budget_for_plan(fixed, between).verdict == "may not fit"
    train.check_memory_budget(fixed, between, cfg)  # no ConfigError
    assert "may not fit" in capsys.readouterr().err


def test_exit_process_flushes_the_streams_and_keeps_the_code():
    """train.py ends through distributed.exit_process (os._exit): buffered output must still arrive
    and the code (75 = requeue) must reach the launcher unchanged."""
    import subprocess
    import sys

    from tests.helpers import REPO

    script = ("import sys\nfrom harness import distributed\nprint('last words', end='')\n"
              "print('on stderr', file=sys.stderr, end='')\ndistributed.exit_process(75)\nprint('never')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75
    assert proc.stdout == "last words"
    assert proc.stderr.endswith("on stderr")


def test_phase_resets_keep_the_lifetime_peak():
    """The per-phase peaks reset the RSS high-water mark (and on CUDA the allocator's peak): the
    lifetime peak that metrics.jsonl and the footprint report must survive the resets."""
    import gc

    from harness import metrics
    from harness.memory import live

    if live.peak_rss_bytes() is None or not live.reset_peak_rss():
        pytest.skip("no VmHWM / clear_refs (Linux only)")
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del big
    gc.collect()
    lifetime_before = live.peak_rss_bytes()
    assert live.reset_peak_rss()
    assert live.peak_rss_bytes(since_reset=True) <= lifetime_before
    assert live.peak_rss_bytes() >= lifetime_before  # kept across the reset
    assert metrics.peak_memory_gib(torch.device("cpu"))["peak_rss_gib"] * 2**30 >= lifetime_before
