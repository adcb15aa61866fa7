"""The bad-input and fault battery, in process: each row is one bad input or fault, and what the harness
must say about it (one message naming the file or key and the fix) before any model loads.

A row is (what it does, the exception it must raise, strings the message must contain). The 2-rank
cases (signals, a second run on one output_dir, a corrupted checkpoint) are in
tests/distributed/test_faults.py; the subprocess one-line-error cases are in tests/test_bad_input.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import checkpoint, config, export, metrics, run_lock
from harness.config import ConfigError
from harness.data import cache
from harness.data.sources import load_source
from harness.data.stats import SourceStats
from tests.helpers import REPO

ASSET = REPO / "harness" / "assets" / "tiny_instruct.jsonl"


def recipe_file(tmp: Path, model: Path, body: str = "", ds: dict | None = None) -> Path:
    ds_path = tmp / "ds.json"
    ds_path.write_text(json.dumps(ds if ds is not None else {"zero_optimization": {"stage": 2}}))
    p = tmp / "recipe.yaml"
    p.write_text(f"model:\n  path: {model}\nmethod: lora\ndata:\n  sources:\n    - path: {ASSET}\n      format: alpaca\n"
                 f"  seq_len: 64\ndeepspeed:\n  config: {ds_path}\noutput_dir: {tmp / 'out'}\n{body}")
    return p


def check(tmp: Path, model: Path, overrides: list[str] = (), body: str = "", ds: dict | None = None, world_size: int = 1):
    """load_recipe + validate, as train.prepare does on every rank before anything loads."""
    config.validate(config.load_recipe(str(recipe_file(tmp, model, body, ds)), list(overrides)), world_size)


def plan_on_cpu(tmp: Path, model: Path, overrides: list[str]):
    """validate + the run plan on a CPU machine, as train.prepare does."""
    from harness.plan import Machine, resolve_plan

    recipe = config.load_recipe(str(recipe_file(tmp, model)), list(overrides))
    config.validate(recipe, 1)
    return resolve_plan(recipe, 1, Machine("cpu", False, 8 << 30), config.read_model_config(str(model)))


def model_copy(tmp: Path, model: Path, edit) -> Path:
    """A copy of the tiny model whose config.json is replaced by edit(config dict) (a str: the raw text)."""
    d = tmp / "model"
    shutil.copytree(model, d)
    new = edit(json.loads((d / "config.json").read_text()))
    (d / "config.json").write_text(new if isinstance(new, str) else json.dumps(new))
    return d


def model_files(tmp: Path, model: Path, damage) -> Path:
    """A copy of the tiny model with damage(directory) done to its files."""
    d = tmp / "damaged"
    shutil.copytree(model, d)
    damage(d)
    return d


def truncate_weights(d: Path) -> None:
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])  # a copy cut short


def garbage_weights(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"<html>404 Not Found</html>" * 10)  # a failed download


def bad_header(d: Path) -> None:
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[9:20] = b"\xff" * 11  # inside the JSON header
    w.write_bytes(bytes(data))


def gpt2(cfg: dict) -> dict:
    return {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": cfg["vocab_size"]}


def nested_aliases(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def latin1_data(tmp: Path) -> Path:
    p = tmp / "latin1.jsonl"
    p.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    return p


def load(path: Path):
    return load_source(str(path), "alpaca", {}, "raise", SourceStats(str(path), "alpaca", "train"), [])


def world_size_env(value: str):
    os.environ["WORLD_SIZE"] = value
    try:
        return config.env_world_size()
    finally:
        del os.environ["WORLD_SIZE"]


def run_dir(tmp: Path, model: Path, *overrides: str) -> Path:
    """A run directory as train.py leaves it: recipe.yaml and a real (untrained) LoRA adapter, so that an
    export without the checks would go ahead and write where it was told."""
    import peft
    from transformers import AutoModelForCausalLM

    run = tmp / "run"
    run.mkdir()
    recipe = config.load_recipe(str(recipe_file(tmp, model)), [f"output_dir={run}", *overrides])
    (run / "recipe.yaml").write_text(config.dump_yaml(recipe))
    lo = recipe.lora
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    lcfg = peft.LoraConfig(r=lo.r, lora_alpha=lo.alpha, target_modules=lo.target_modules, init_lora_weights=False)  # B != 0: "trained"
    peft.get_peft_model(base, lcfg).save_pretrained(str(run / "adapter"))
    return run


def nonempty(tmp: Path) -> Path:
    d = tmp / "existing"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def site(name: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_JOB_ID": "1", "RECIPE": "x.yaml", "HARNESS_DIR": str(REPO), "LOG_DIR": str(tmp), "HARNESS_SITE": name}
    proc = subprocess.run(["bash", str(REPO / "slurm" / "launch.sh")], env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ConfigError(proc.stderr.strip())
    return proc


_MOUNTED: list[Path] = []


def read_only_dir(tmp: Path) -> Path:
    """A directory nobody may write, root included: a read-only tmpfs mounted there (the tests run as root,
    which ignores file modes), or mode 0555 for another user."""
    d = tmp / "read_only"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        return d
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({done.stderr.strip()})")
    _MOUNTED.append(d)
    return d


@pytest.fixture(autouse=True)
def _unmount_read_only_dirs():
    yield
    while _MOUNTED:
        subprocess.run(["umount", str(_MOUNTED.pop())], check=True)


def symlinked(tmp: Path, name: str) -> Path:
    out = tmp / "out"
    out.mkdir()
    (tmp / "victim.txt").write_text("precious")
    (out / name).symlink_to(tmp / "victim.txt")
    return out


def second_lock(tmp: Path):
    first = run_lock.acquire(str(tmp / "out"))  # noqa: F841 (held while the second asks)
    return run_lock.acquire(str(tmp / "out"))


# id -> (callable(tmp_path, tiny_model_path), exception type, strings its message must contain)
CASES = {
    # recipe files (item 7: silently wrong configs)
    "yaml-duplicate-block": (lambda t, m: check(t, m, body="train:\n  lr: 1.0e-3\ntrain:\n  max_steps: 5\n"), ConfigError,
                             ["recipe.yaml:", "'train' is set twice (first at line", "merge the two"]),
    "yaml-duplicate-key": (lambda t, m: check(t, m, body="train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n"), ConfigError, ["'train.lr' is set twice"]),
    "yaml-alias-bomb": (lambda t, m: check(t, m, body=nested_aliases()), ConfigError,
                        ["recipe.yaml:", "anchors and aliases", "write the values out"]),
    "empty-output-dir": (lambda t, m: check(t, m, ["output_dir="]), ConfigError, ["output_dir is empty", "output_dir=runs/NAME"]),
    "early-stopping-without-val": (lambda t, m: check(t, m, ["eval.early_stopping_patience=3"]), ConfigError,
                                   ["eval.early_stopping_patience", "no validation data", "data.val_path"]),
    # values checked before the model loads (item 6)
    "lr-negative": (lambda t, m: check(t, m, ["train.lr=-1"]), ConfigError, ["train.lr must be a positive finite number", "-1"]),
    "lr-nan": (lambda t, m: check(t, m, ["train.lr=.nan"]), ConfigError, ["train.lr must be a positive finite number", "nan"]),
    "lr-inf": (lambda t, m: check(t, m, ["train.lr=.inf"]), ConfigError, ["train.lr"]),
    "lr-zero": (lambda t, m: check(t, m, ["train.lr=0"]), ConfigError, ["train.lr"]),
    "lora-dropout": (lambda t, m: check(t, m, ["lora.dropout=2.5"]), ConfigError, ["lora.dropout", "[0, 1)", "2.5"]),
    "lora-alpha": (lambda t, m: check(t, m, ["lora.alpha=0"]), ConfigError, ["lora.alpha must be positive"]),
    "adam-betas-one": (lambda t, m: check(t, m, ["train.adam_betas=[0.9]"]), ConfigError, ["train.adam_betas", "two numbers", "[0.9, 0.999]"]),
    "adam-betas-above-1": (lambda t, m: check(t, m, ["train.adam_betas=[0.9, 1.5]"]), ConfigError, ["train.adam_betas"]),
    "weight-decay-negative": (lambda t, m: check(t, m, ["train.weight_decay=-0.1"]), ConfigError, ["train.weight_decay"]),
    "grad-norm-nan": (lambda t, m: check(t, m, ["train.max_grad_norm=.nan"]), ConfigError, ["train.max_grad_norm"]),
    "min-lr-ratio": (lambda t, m: check(t, m, ["train.min_lr_ratio=2"]), ConfigError, ["train.min_lr_ratio", "[0, 1]"]),
    "log-every-0": (lambda t, m: check(t, m, ["log.every_steps=0"]), ConfigError, ["log.every_steps must be >= 1"]),
    "memory-every-negative": (lambda t, m: check(t, m, ["log.memory_every_steps=-1"]), ConfigError, ["log.memory_every_steps"]),
    "eval-every-negative": (lambda t, m: check(t, m, ["eval.every_steps=-5"]), ConfigError, ["eval.every_steps must be >= 0"]),
    "eval-patience-negative": (lambda t, m: check(t, m, ["eval.early_stopping_patience=-1"]), ConfigError, ["eval.early_stopping_patience"]),
    # DeepSpeed files (items 6, 7, 9)
    "ds-stage-7": (lambda t, m: check(t, m, ds={"zero_optimization": {"stage": 7}}), ConfigError,
                   ["ds.json", "zero_optimization.stage must be 0, 1, 2 or 3", "7"]),
    "ds-stage-word": (lambda t, m: check(t, m, ds={"zero_optimization": {"stage": "three"}}), ConfigError, ["zero_optimization.stage", "'three'"]),
    "ds-stage-bool": (lambda t, m: check(t, m, ds={"zero_optimization": {"stage": True}}), ConfigError, ["zero_optimization.stage"]),
    "ds-zero-not-object": (lambda t, m: check(t, m, ds={"zero_optimization": 3}), ConfigError, ["zero_optimization must be an object"]),
    "ds-misspelt-section": (lambda t, m: check(t, m, ds={"zero_optimizaton": {"stage": 3}}), ConfigError,
                            ["ds.json", "unknown key 'zero_optimizaton'", "did you mean 'zero_optimization'"]),
    "ds-misspelt-top-key": (lambda t, m: check(t, m, ds={"gradient_cliping": 1.0}), ConfigError, ["did you mean 'gradient_clipping'"]),
    "ds-misspelt-zero-key": (lambda t, m: check(t, m, ds={"zero_optimization": {"stage": 3, "overlap_com": True}}), ConfigError,
                             ["unknown key 'zero_optimization.overlap_com'", "did you mean 'overlap_comm'"]),
    "ds-not-json": (lambda t, m: config.load_ds_json(str((t / "bad.json", (t / "bad.json").write_text('{"a": 1,\n}'))[0])), ConfigError,
                    ["bad.json:2:", "not valid JSON"]),
    # the model directory (item 9)
    "model-gpt2": (lambda t, m: check(t, model_copy(t, m, gpt2)), ConfigError,
                   ["config.json", "model_type 'gpt2' lacks hidden_size", "Llama-style"]),
    "model-config-not-json": (lambda t, m: check(t, model_copy(t, m, lambda c: '{"model_type": "llama",\n "hidden_size": }')), ConfigError,
                              ["config.json:2:", "not valid JSON", "restore the model's config.json"]),
    "model-config-a-list": (lambda t, m: check(t, model_copy(t, m, lambda c: "[1, 2]")), ConfigError, ["must be a JSON object"]),
    "model-hidden-size-zero": (lambda t, m: check(t, model_copy(t, m, lambda c: {**c, "hidden_size": 0})), ConfigError, ["lacks hidden_size"]),
    "model-weights-truncated": (lambda t, m: check(t, model_files(t, m, truncate_weights)), ConfigError,
                                ["model.safetensors: truncated", "its header lists", "copy or download that file again"]),
    "model-weights-garbage": (lambda t, m: check(t, model_files(t, m, garbage_weights)), ConfigError,
                              ["model.safetensors: not a safetensors file"]),
    "model-weights-bad-header": (lambda t, m: check(t, model_files(t, m, bad_header)), ConfigError,
                                 ["model.safetensors: corrupt safetensors header"]),
    "model-no-tokenizer": (lambda t, m: check(t, model_files(t, m, lambda d: (d / "tokenizer.json").unlink())), ConfigError,
                           ["has no tokenizer", "tokenizer.json or tokenizer.model", "copy the tokenizer files"]),
    # the environment (item 9)
    "world-size-word": (lambda t, m: world_size_env("abc"), ConfigError, ["WORLD_SIZE='abc'", "positive whole number"]),
    "world-size-zero": (lambda t, m: world_size_env("0"), ConfigError, ["WORLD_SIZE='0'"]),
    "site-path-traversal": (lambda t, m: site("../../../tmp/evil", t), ConfigError, ["HARNESS_SITE=../../../tmp/evil is not a site name"]),
    "site-unknown": (lambda t, m: site("nosuchsite", t), ConfigError, ["no site file slurm/env/nosuchsite.sh"]),
    # data (item 9)
    "data-not-utf8": (lambda t, m: load(latin1_data(t)), ConfigError, ["latin1.jsonl:2:", "not UTF-8", "0xe9", "re-encode"]),
    # output_dir (items 2, 9, 11)
    "output-dir-a-file": (lambda t, m: run_lock.acquire(str((t / "f", (t / "f").write_text("x"))[0])), ConfigError,
                          ["is a file, not a directory"]),
    "output-dir-locked": (lambda t, m: second_lock(t), ConfigError, ["is in use by another run", f"pid {os.getpid()}", "choose another output_dir"]),
    "output-dir-symlinked-metrics": (lambda t, m: run_lock.acquire(str(symlinked(t, "metrics.jsonl"))), ConfigError,
                                     ["metrics.jsonl is a symbolic link", "remove the link"]),
    "output-dir-read-only": (lambda t, m: run_lock.acquire(str(read_only_dir(t))), ConfigError,
                             ["is not writable (Read-only file system)", "choose a writable output_dir"]),
    "output-dir-under-read-only": (lambda t, m: run_lock.acquire(str(read_only_dir(t) / "run")), ConfigError,
                                   ["cannot be created (Read-only file system)", "choose a writable output_dir"]),
    "output-dir-symlinked-recipe": (lambda t, m: run_lock.acquire(str(symlinked(t, "recipe.yaml"))), ConfigError, ["recipe.yaml is a symbolic link"]),
    # beyond the list: batch, checkpointing and run-plan keys, LoRA targets, time limits
    "micro-batch-auto-indivisible": (lambda t, m: check(t, m, ["train.micro_batch_size=auto", "train.global_batch_size=7"], world_size=2),
                                     ConfigError, ["global_batch_size=7 is not divisible by the world size 2", "pick a multiple of 2"]),
    "micro-batch-word": (lambda t, m: check(t, m, ["train.micro_batch_size=four"]), ConfigError,
                         ["train.micro_batch_size", "must be int (a whole number) or auto", "'four'"]),
    "checkpoint-every-k-zero": (lambda t, m: check(t, m, ["train.gradient_checkpointing=every_k", "train.checkpoint_every_k=0"]),
                                ConfigError, ["train.checkpoint_every_k must be >= 1"]),
    "checkpointing-typo": (lambda t, m: check(t, m, ["train.gradient_checkpointing=ful"]), ConfigError, ["did you mean 'full'"]),
    "lora-target-not-a-layer": (lambda t, m: check(t, m, ["lora.target_modules=[q_proj, nope_proj]"]), ConfigError,
                                ["lora.target_modules: 'nope_proj' is not a layer", "q_proj", "all-linear"]),
    "lora-target-typo": (lambda t, m: check(t, m, ["lora.target_modules=[q_prj]"]), ConfigError, ["did you mean 'q_proj'"]),
    "runtime-negative": (lambda t, m: check(t, m, ["checkpoint.max_runtime_minutes=-5"]), ConfigError,
                         ["checkpoint.max_runtime_minutes", "must be >= 0"]),
    "exit-margin-over-runtime": (lambda t, m: check(t, m, ["checkpoint.max_runtime_minutes=5", "checkpoint.exit_margin_minutes=10"]),
                                 ConfigError, ["exit_margin_minutes=10 leaves no time to train", "use a margin below"]),
    "flash-attn-where-it-cannot-run": (lambda t, m: plan_on_cpu(t, m, ["model.attn_implementation=flash_attention_2"]), ConfigError,
                                       ["flash_attention_2 but flash-attn is not usable here", "model.attn_implementation=sdpa"]),
    "source-format-typo": (lambda t, m: check(t, m, [f"data.sources=[{{path: {ASSET}, format: alpacca}}]"]), ConfigError,
                           ["data.sources.0.format", "did you mean 'alpaca'"]),
    # export (items 4, 11)
    "export-over-the-base": (lambda t, m: export.export(run_dir(t, m), "adapter", m), ValueError, ["would write into the base model"]),
    "export-into-the-base": (lambda t, m: export.export(run_dir(t, m), "adapter", m / "sub"), ValueError, ["would write into the base model"]),
    "export-over-the-run": (lambda t, m: export.export(run_dir(t, m), "adapter", t / "run"), ValueError, ["would write over the run directory"]),
    "export-into-checkpoints": (lambda t, m: export.export(run_dir(t, m), "adapter", t / "run" / "checkpoints" / "x"), ValueError,
                                ["inside the run's own checkpoints/"]),
    "export-existing-out": (lambda t, m: export.export(run_dir(t, m), "adapter", nonempty(t)), ValueError,
                            ["already exists and is not empty", "--overwrite"]),
    "export-remote-code": (lambda t, m: export.export(run_dir(t, m, "model.trust_remote_code=true"), "adapter", t / "new"), ValueError,
                           ["model.trust_remote_code=true", "--trust-remote-code"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fault_is_named_with_its_fix(case, tmp_path, tiny_llama):
    action, kind, must_contain = CASES[case]
    with pytest.raises(kind) as e:
        action(tmp_path, Path(tiny_llama))
    message = str(e.value)
    assert "\n" not in message.strip(), message
    for s in must_contain:
        assert s in message, f"{s!r} not in {message!r}"


def test_the_base_cases_pass(tmp_path, tiny_llama):
    """Every row above fails for its own reason: the recipe, DeepSpeed file and data they start from are valid."""
    check(tmp_path, Path(tiny_llama), ds={"zero_optimization": {"stage": 3, "overlap_comm": True, "stage3_max_reuse_distance": 1}})
    check(tmp_path, Path(tiny_llama), ["eval.early_stopping_patience=3", "data.val_fraction=0.1"])
    check(tmp_path, Path(tiny_llama), ["eval.early_stopping_patience=3", "eval.every_steps=0"])  # eval off: early stopping off
    assert world_size_env("2") == 2
    for ds in sorted((REPO / "ds_configs").glob("*.json")):
        check(tmp_path, Path(tiny_llama), ds=json.loads(ds.read_text()))
    try:  # the default site passes the site checks (launch.sh then stops later: this is no Slurm job)
        site("default", tmp_path)
    except ConfigError as e:
        assert "site" not in str(e), str(e)
    lock = run_lock.acquire(str(tmp_path / "out"))
    lock.close()  # released: the next run takes it
    run_lock.acquire(str(tmp_path / "out")).close()


def test_a_dead_runs_lock_file_does_not_block(tmp_path):
    """kill -9 leaves the lock file but not the lock (the kernel drops it with the process)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / run_lock.LOCK_NAME).write_text("pid 999999 on a-dead-host, since 2026-01-01 00:00:00\n")
    with run_lock.acquire(str(out)) as f:
        f.seek(0)
        assert f"pid {os.getpid()}" in f.read()


# --------------------------------------------------------------------------------------------------
# Damaged files: the harness recovers (or refuses) and loses nothing
# --------------------------------------------------------------------------------------------------


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    """A crash mid-write leaves half a JSON line at the end of metrics.jsonl; a resume keeps the rest."""
    path = tmp_path / "metrics.jsonl"
    good = [{"data": {"rows": 4}}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"step": 4, "lo')
    log = metrics.MetricsLogger(str(tmp_path), is_main=True, total_steps=10, progress_bar=False, wandb_cfg=None, recipe_dict={}, resume_step=2)
    log.log({"step": 3, "loss": 1.25})
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [good[1], good[2], {"step": 3, "loss": 1.25}]
    assert "dropped 1 unreadable line" in capsys.readouterr().err


def _parts(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    cfg = config.load_recipe(str(recipe_file(tmp_path, Path(tiny_llama))), ["data.val_fraction=0"]).data
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(6)))
    cfg.sources[0].path = str(data)
    return cfg, AutoTokenizer.from_pretrained(str(tiny_llama)), data


@pytest.mark.parametrize("damage", ["edited-in-place", "truncated-tokens", "broken-meta"])
def test_a_stale_or_damaged_data_cache_is_rebuilt(tmp_path, tiny_llama, damage):
    cfg, tok, data = _parts(tmp_path, tiny_llama)
    said = []
    first, _, status, _ = cache.tokenize_once(cfg, tok, cache_dir=str(tmp_path / "cache"), say=said.append)
    assert status == "miss"
    (entry,) = (tmp_path / "cache").glob("tokens-*")
    if damage == "edited-in-place":  # same size and mtime, other bytes: the key cannot see it, the content hash does
        st = data.stat()
        data.write_text(data.read_text().replace("a1", "b1"))
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif damage == "truncated-tokens":
        (entry / "tokens.safetensors").write_bytes((entry / "tokens.safetensors").read_bytes()[:40])
    else:
        (entry / "meta.json").write_text('{"key": ')
    again, _, status, _ = cache.tokenize_once(cfg, tok, cache_dir=str(tmp_path / "cache"), say=said.append)
    assert status == "miss" and any("not usable" in s and "tokenising again" in s for s in said), said
    fresh, _, _, _ = cache.tokenize_once(cfg, tok, cache_dir=None)
    assert [p.ids.tolist() for p in again] == [p.ids.tolist() for p in fresh]
    if damage == "edited-in-place":
        assert [p.ids.tolist() for p in again] != [p.ids.tolist() for p in first]
    third, _, status, _ = cache.tokenize_once(cfg, tok, cache_dir=str(tmp_path / "cache"), say=said.append)
    assert status == "hit"  # the rebuilt entry is good


def test_a_failed_cache_write_leaves_nothing_and_the_cache_is_shareable(tmp_path, tiny_llama, monkeypatch):
    cfg, tok, _ = _parts(tmp_path, tiny_llama)
    import safetensors.numpy

    def full_disk(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    said = []
    parts, _, _, _ = cache.tokenize_once(cfg, tok, cache_dir=str(tmp_path / "cache"), say=said.append)
    assert parts and any("could not write the cache" in s and "No space left" in s for s in said), said
    assert not list((tmp_path / "cache").iterdir()), "a temporary entry was left behind"
    monkeypatch.undo()
    old = os.umask(0o022)
    try:
        cache.tokenize_once(cfg, tok, cache_dir=str(tmp_path / "cache"), say=said.append)
    finally:
        os.umask(old)
    (entry,) = (tmp_path / "cache").glob("tokens-*")
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755  # not mkdtemp's 0700: other users of a shared cache can read it
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in entry.iterdir())


# --------------------------------------------------------------------------------------------------
# Checkpoints: what verify=size catches, and what a resume may change
# --------------------------------------------------------------------------------------------------


def test_verify_size_reads_a_sample_and_catches_a_flip_in_it(tmp_path):
    d = tmp_path / "step_00000001"
    d.mkdir()
    blob = bytearray(os.urandom(4 << 20))  # 4 MiB: sampled, not read whole
    (d / "shard.pt").write_bytes(bytes(blob))
    checkpoint.write_manifest(d, 1)
    assert checkpoint.verify(d, check_hashes=False) is None
    blob[0:8] = bytes(8 * [0xFF])  # the first sampled block
    (d / "shard.pt").write_bytes(bytes(blob))
    assert "sampled checksum mismatch" in checkpoint.verify(d, check_hashes=False)
    assert "checksum mismatch" in checkpoint.verify(d, check_hashes=True)


class _Engine:
    """What loaded_state_problem reads of a DeepSpeed engine: optimizer(.optimizer).param_groups and .state."""

    def __init__(self, params, state):
        self.optimizer = torch.optim.AdamW(params)
        self.optimizer.state.update(state)


@pytest.mark.parametrize(("value", "where", "problem"), [
    (1.2e29, "parameter", "parameter values up to 1.2e+29"),
    (float("nan"), "parameter", "non-finite parameter values"),
    (float("inf"), "exp_avg_sq", "non-finite exp_avg_sq values"),
    (3e15, "exp_avg", "exp_avg values up to 3e+15"),
    (None, None, None),  # an intact state passes
])
def test_a_loaded_state_outside_its_bounds_is_refused(value, where, problem):
    p = torch.nn.Parameter(torch.randn(64) * 0.02)
    state = {p: {"step": torch.tensor(3.0), "exp_avg": torch.randn(64) * 1e-3, "exp_avg_sq": torch.rand(64) * 1e-6}}
    if where == "parameter":
        p.data[17] = value
    elif where:
        state[p][where][5] = value
    got = checkpoint.loaded_state_problem(_Engine([p], state))
    assert got == problem if problem is None else problem in got


@pytest.mark.parametrize(("override", "refused"), [
    ("method=qlora", "method: 'lora' -> 'qlora'"),
    ("lora.r=16", "lora.r: 8 -> 16"),
    ("lora.alpha=64", "lora.alpha"),
    ("lora.target_modules=[q_proj]", "lora.target_modules"),
    ("train.lr=1e-3", None),  # allowed, and reported
    ("train.max_steps=99", None),
    ("eval.every_steps=7", None),
    ("method=prompt_tuning", "method: 'lora' -> 'prompt_tuning'"),
    ("task=classification", "task: 'causal_lm' -> 'classification'"),
])
def test_a_resume_may_not_change_what_the_checkpoint_holds(tmp_path, tiny_llama, override, refused):
    base = config.load_recipe(str(recipe_file(tmp_path, Path(tiny_llama))), ["lora.r=8"])
    changed = config.load_recipe(str(recipe_file(tmp_path, Path(tiny_llama))), ["lora.r=8", override])
    no, yes = checkpoint.resume_changes(checkpoint.recipe_fingerprint(base), checkpoint.recipe_fingerprint(changed))
    if refused:
        assert len(no) == 1 and refused in no[0], no
    else:
        assert not no and len(yes) == 1, (no, yes)
    moved = tmp_path / "moved"  # a model directory moved (same config.json) still resumes
    shutil.copytree(tiny_llama, moved)
    elsewhere = config.load_recipe(str(recipe_file(tmp_path, moved)), ["lora.r=8"])
    no, yes = checkpoint.resume_changes(checkpoint.recipe_fingerprint(base), checkpoint.recipe_fingerprint(elsewhere))
    assert not no and yes == [f"model.path: '{tiny_llama}' -> '{moved}'"]
    # a checkpoint written before a key existed (its fingerprint lacks it) had that key's default
    older = {k: v for k, v in checkpoint.recipe_fingerprint(base).items() if not k.startswith(("task", "data.labels", "prompt_tuning."))}
    assert checkpoint.resume_changes(older, checkpoint.recipe_fingerprint(base)) == ([], [])


def test_the_grading_tool_runs_every_row(tmp_path):
    """tools/fault_battery.py grades each row (well / partly / badly) in a child process; on this
    checkout every row is handled well (the per-row checks are the test above)."""
    out = tmp_path / "grades.json"
    proc = subprocess.run([sys.executable, "tools/fault_battery.py", "--quiet", "--json", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    counts = figures["counts"]
    assert counts["partly"] == counts["badly"] == 0 and counts["well"] + counts["skipped"] == len(CASES), counts
    assert [r["case"] for r in figures["rows"]] == list(CASES)
    assert f"{len(CASES)} cases: " in proc.stdout
