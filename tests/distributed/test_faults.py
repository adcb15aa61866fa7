"""Faults on a real 2-rank job (tiny QLoRA model, ZeRO-3, gloo): a preemption signal in each phase, a
SIGTERM to the `deepspeed` runner, a second run on the same output_dir, and damaged or mismatched
checkpoints on resume.

Each preemption row measures the time from the signal to the job's exit (75) and what it left: a
checkpoint when something was trained since the last one, nothing when nothing was. The figures are
printed; the bound checked here (60 s on 2 busy CPU cores) is far inside Slurm's --signal=B:USR1@900
grace window of the templates.
"""

from __future__ import annotations

import re
import signal
import time

import psutil
import pytest
import torch

from tests.distributed.test_resume import JOB_TIMEOUT_S, RECIPE, start, tail, wait_or_kill
from tests.helpers import REPO, launch, read_metrics, train_losses

pytestmark = [pytest.mark.distributed, pytest.mark.serial]  # signals and deadlines: never beside another test
GRACE_S = 60  # signal -> exit on this machine (the templates give 900 s)


def job_args(model, out, *extra) -> list[str]:
    # eval of 400 samples one at a time (~10 s here): long enough to land a signal inside it
    return ["--config", RECIPE, f"model.path={model}", f"output_dir={out}", "train.max_steps=40", "train.warmup_steps=1",
            "train.micro_batch_size=2", "train.global_batch_size=4", "log.every_steps=1", "log.progress_bar=false",
            f"data.val_path={REPO / 'harness' / 'assets' / 'tiny_instruct.jsonl'}", "eval.every_steps=2", "eval.max_samples=400",
            "eval.batch_size=1", "checkpoint.every_steps=0", *extra]


def ranks_of(proc) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def wait_until(what, proc, log, timeout_s: float = JOB_TIMEOUT_S, poll_s: float = 0.02):
    deadline = time.time() + timeout_s
    while not what():
        if proc.poll() is not None or time.time() > deadline:
            wait_or_kill(proc, log, 1)
            raise AssertionError(f"the job never got there (exit {proc.returncode})\n{tail(log)}")
        time.sleep(poll_s)


def log_has(log, text: str):
    return lambda: log.exists() and text in log.read_text(errors="replace")


def steps_logged(out, n: int):
    return lambda: (out / "metrics.jsonl").exists() and len(train_losses(out)) >= n


def settled(delay_s: float, ready):
    return lambda out, log, proc: ready(out, log, proc) and (time.sleep(delay_s) or True)


def rank_1(proc) -> list[psutil.Process]:
    return [p for p in ranks_of(proc) if "--local_rank=1" in " ".join(p.cmdline())]


# phase -> (extra overrides, when to signal, whom (SIGTERM to every rank, as Slurm does, or USR1 to
# rank 1 only: the ranks must agree), the step of the checkpoint it must leave ("next": the step
# after the signal; None: none), a line that the phase, cut short, must not have logged, resume)
PHASES = {
    # both ranks as soon as they run Python: imports, the rendezvous, data, model loading
    "start-up": ([], settled(0.5, lambda out, log, proc: len(ranks_of(proc)) == 2), "all", None, "model: ", False),
    # the untrained model's eval (nothing trained: exit at once, nothing to save)
    "step-0 eval": ([], settled(1.5, lambda out, log, proc: log_has(log, "model: ")()), "all", None, "step 0: val_loss", False),
    # a training step: the ranks finish it, save it and exit; the resumed run does every step once
    "training, rank 1 only": (["eval.every_steps=0"], lambda out, log, proc: steps_logged(out, 3)(), "rank 1", "next", None, True),
    # the eval after step 2 (2 steps unsaved: the eval stops at its next batch, the ranks save step 2)
    "eval after step 2": ([], lambda out, log, proc: steps_logged(out, 2)(), "all", 2, "step 2: val_loss", False),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_signal_in_any_phase_ends_in_exit_75_with_nothing_lost(tiny_llama, tmp_path, phase):
    extra, when, whom, saved_step, cut_short, resume = PHASES[phase]
    out, log = tmp_path / "run", tmp_path / "job.log"
    proc = start(job_args(tiny_llama, out, *extra), log)
    wait_until(lambda: when(out, log, proc), proc, log)
    signalled, signalled_after = time.monotonic(), len(train_losses(out)) if (out / "metrics.jsonl").exists() else 0
    for rank in ranks_of(proc) if whom == "all" else rank_1(proc):
        rank.send_signal(signal.SIGTERM if whom == "all" else signal.SIGUSR1)
    code = wait_or_kill(proc, log, JOB_TIMEOUT_S)
    took_s = time.monotonic() - signalled
    text = tail(log, 20000)
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    print(f"\n{phase}: signal after step {signalled_after} -> exit {code} in {took_s:.1f} s; checkpoint {checkpoints}")
    assert code == 75, text
    assert took_s < GRACE_S
    assert cut_short is None or cut_short not in text, f"the signal came after the phase ({cut_short!r} was logged)"
    if saved_step is None:
        assert not checkpoints, "nothing was trained, yet a checkpoint was written"
        assert not (out / "metrics.jsonl").exists() or not train_losses(out)
        return
    (saved,) = checkpoints
    step = int(saved.split("_")[1])
    assert signalled_after <= step <= signalled_after + 1 if saved_step == "next" else step == saved_step, text
    assert not [r for r in read_metrics(out) if r.get("step") == step and "val_loss" in r], "a cut-short eval logged a loss"
    if resume:
        resumed = launch(job_args(tiny_llama, out, *extra, "train.max_steps=12"), nproc=2)
        assert f"at step {step}" in resumed.stdout
        assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, 13))  # every step once


def test_sigterm_to_the_deepspeed_runner_and_a_second_run_on_its_output_dir(tiny_llama, tmp_path):
    """The runner dies on SIGTERM without passing it on; the ranks notice (harness/preemption.py:
    StopFlag._watch), save together and exit: no rank is left running. While the first job runs, a
    second one on the same output_dir is refused before it loads anything."""
    out, log = tmp_path / "run", tmp_path / "job.log"
    proc = start(job_args(tiny_llama, out, "eval.every_steps=0", "train.max_steps=1000"), log)  # runs until signalled
    wait_until(steps_logged(out, 2), proc, log)
    ranks = sorted(ranks_of(proc), key=lambda p: "--local_rank=0" not in " ".join(p.cmdline()))  # rank 0 first
    assert len(ranks) == 2

    second = launch(job_args(tiny_llama, out, "eval.every_steps=0"), nproc=1, check=False, timeout_s=120)  # its rank 0 asks for the lock
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    errors = [line for line in (second.stdout + second.stderr).splitlines() if line.startswith("error:")]
    assert errors and "is in use by another run" in errors[0] and f"pid {ranks[0].pid}" in errors[0], errors
    assert "model: " not in second.stdout

    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # the runner only (what `kill PID` or a container stop does)
    assert proc.wait(timeout=60) != 0
    gone, alive = psutil.wait_procs(ranks, timeout=GRACE_S)
    took_s = time.monotonic() - signalled
    print(f"\nSIGTERM to the runner: both ranks gone after {took_s:.1f} s")
    for p in alive:
        p.kill()
    assert not alive, f"ranks left running after the runner died:\n{tail(log)}"
    text = tail(log, 20000)
    # rank 0 logs: its own watcher's reason, or the vote of rank 1, whose watcher saw it first
    assert re.search(r"\(stop: (the deepspeed launcher \(pid \d+\) exited|another rank's signal)\)", text), text
    (saved,) = sorted((out / "checkpoints").glob("step_*"))
    step = int(saved.name.split("_")[1])
    assert step >= 2

    # Resuming with another shape is refused before the model loads (the recipe fingerprint)
    changed = launch(job_args(tiny_llama, out, "eval.every_steps=0", "lora.r=8"), nproc=1, check=False, timeout_s=120)
    assert changed.returncode == 2 and "was trained with another recipe (lora.r: 32 -> 8)" in changed.stderr, changed.stderr[-2000:]
    assert "model: " not in changed.stdout

    # A corrupted value that the sampled check of verify=size cannot see (the manifest is rewritten to
    # match, as when the flip lands between the sampled blocks) is caught once loaded
    from harness import checkpoint

    shard = sorted(saved.glob("**/*optim_states.pt"))[0]
    state = torch.load(shard, weights_only=False)
    tensors = []

    def walk(x):
        if torch.is_tensor(x) and x.is_floating_point() and x.numel() > 1:
            tensors.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(state)
    tensors[0].view(-1)[3] = 1.2e29
    torch.save(state, shard)
    checkpoint.write_manifest(saved, step, world_size=2, zero_stage=3, recipe=checkpoint.read_manifest(saved).get("recipe"))
    bad = launch(job_args(tiny_llama, out, "eval.every_steps=0", "checkpoint.verify=size"), nproc=2, check=False, timeout_s=300)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode != 0 and errors and "is corrupted" in errors[0] and "1.2e+29" in errors[0], bad.stderr[-3000:]
    assert not [r for r in read_metrics(out) if r.get("step", 0) > step and "loss" in r], "trained on the corrupted state"
