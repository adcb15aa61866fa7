"""The run plan (harness/plan.py): one resolution that the run, the memory budget and --dry-run share.

The reference for the budget-driven "auto" choice is a brute-force walk over every candidate in the
documented preference order, each judged by the budget on its own (harness/memory, checked against
measured runs in tests/distributed/test_memory_measured.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from harness import memory, train
from harness.config import SHIPPED_MODEL_CONFIGS, ConfigError, load_recipe
from harness.plan import Machine, checkpointing_choices, micro_batch_choices, resolve_plan
from harness.memory.budget import GPU_UNCALIBRATED_BAND
from tests.helpers import REPO
from tests.test_recipes import RECIPES, header_world_size

GIB = 2**30
MACHINES = {
    "cpu": Machine("cpu", False, 12 * GIB),
    "cuda-flash": Machine("cuda", True, 80 * GIB),
    "cuda-no-flash": Machine("cuda", False, 80 * GIB),  # the case the budget used to get wrong
}
ARCH = {"llama3_8b_qlora": "llama-3.1-8b", "llama3_70b_qlora": "llama-3.1-70b"}


def model_dir_for(recipe_path, tmp_path, tiny_llama, real_model=None):
    """The recipe's own architecture where it names a big model (a config.json is all a plan reads)."""
    arch = ARCH.get(recipe_path.stem)
    if arch is None:
        return tiny_llama
    d = tmp_path / arch
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text((SHIPPED_MODEL_CONFIGS / f"{arch}.json").read_text())
    return d


@pytest.mark.parametrize("machine", MACHINES, ids=list(MACHINES))
@pytest.mark.parametrize("recipe_path", RECIPES, ids=[p.stem for p in RECIPES])
def test_budget_models_the_plan_the_run_uses(recipe_path, machine, tmp_path, tiny_llama):
    """For every shipped recipe on every kind of machine, the budget's attention, layout, loader,
    checkpointing and micro-batch are the plan's (the run's model is loaded from the same plan: see
    test_run_and_budget_share_one_plan_through_prepare)."""
    m = MACHINES[machine]
    recipe = load_recipe(str(recipe_path), [f"model.path={model_dir_for(recipe_path, tmp_path, tiny_llama)}"])
    world = header_world_size(recipe_path)
    cfg = json.loads((Path(recipe.model.path) / "config.json").read_text())
    plan = resolve_plan(recipe, world, m, cfg)
    setup = memory.setup_from_plan(recipe, plan)
    assert (setup.attn, setup.loader, setup.checkpointing, setup.micro_batch, setup.zero_stage, setup.precision) == (
        plan.attn, plan.loader, plan.gradient_checkpointing, plan.micro_batch_size, plan.zero_stage, plan.precision)
    assert setup.checkpointed_layers(cfg["num_hidden_layers"]) == (
        0 if plan.gradient_checkpointing == "none" else cfg["num_hidden_layers"] if plan.gradient_checkpointing == "full"
        else len(range(0, cfg["num_hidden_layers"], plan.checkpoint_every_k)))
    # packed rows under sdpa carry a (b, 1, s, s) mask, which the budget must count; flash-attn's varlen has none
    assert setup.packed == (bool(recipe.data.packing or recipe.data.padding_free) and plan.attn != "flash_attention_2")
    assert plan.ds["train_micro_batch_size_per_gpu"] * plan.ds["gradient_accumulation_steps"] * world == recipe.train.global_batch_size
    if machine == "cuda-no-flash":
        assert plan.attn in ("sdpa", "eager") and "flash_attention_2" not in json.dumps(memory.setup_from_plan(recipe, plan).attn)
    if recipe.model.attn_implementation == "auto":
        assert plan.why["attention"].startswith("auto:")


def test_no_flash_attn_is_what_the_budget_models(tmp_path, tiny_llama):
    """The bug this plan fixes, in the budget's own figures: the 8B recipe, packed, on a CUDA node where
    flash-attn does not import, trains with sdpa; modelling flash-attn there under-predicted the peak."""
    recipe_path = REPO / "harness" / "recipes" / "llama3_8b_qlora.yaml"
    d = model_dir_for(recipe_path, tmp_path, tiny_llama)
    recipe = load_recipe(str(recipe_path), [f"model.path={d}", "data.packing=true", "train.gradient_checkpointing=every_k"])
    cfg = json.loads((d / "config.json").read_text())
    no_flash = resolve_plan(recipe, 8, MACHINES["cuda-no-flash"], cfg)
    flash = resolve_plan(recipe, 8, MACHINES["cuda-flash"], cfg)
    assert (no_flash.attn, flash.attn) == ("sdpa", "flash_attention_2")
    run_peak = memory.budget_for_plan(recipe, no_flash).peak_bytes
    wrong_peak = memory.budget_for_plan(recipe, flash).peak_bytes
    assert run_peak - wrong_peak > 0.03 * run_peak, (run_peak, wrong_peak)  # more than the 3% safety margin


def test_run_and_budget_share_one_plan_through_prepare(tmp_path, tiny_llama, monkeypatch):
    """train.prepare on a CUDA-like machine without flash-attn: the memory check receives the very plan
    prepare returns (no second resolution), and a packed recipe gets sdpa there."""
    seen = []
    real = memory.budget_for_plan
    monkeypatch.setattr(memory, "budget_for_plan", lambda recipe, plan, **kw: seen.append(plan) or real(recipe, plan, **kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--config", str(REPO / "harness" / "recipes" / "tiny_qlora.yaml"), f"model.path={tiny_llama}", "data.packing=true",
            "train.precision=bf16", "train.gradient_checkpointing=auto", "train.micro_batch_size=auto", f"output_dir={tmp_path / 'out'}"]
    _args, recipe, plan, _cfg = train.prepare(argv, machine=MACHINES["cuda-no-flash"])
    assert seen and seen[-1] is plan  # the budget judged the run's own plan
    assert (plan.attn, plan.flat_batches, plan.device) == ("sdpa", False, "cuda")
    assert plan == memory.plan_for_target(recipe, 2, device="cuda", flash_attn=False, device_memory_bytes=80 * GIB)


def best_by_brute_force(recipe, world, machine, cfg):
    """The first (checkpointing, micro-batch) in preference order that the budget says fits, each
    candidate planned on its own with both settings fixed."""
    for policy, k in checkpointing_choices(recipe, cfg["num_hidden_layers"]):
        for micro in micro_batch_choices(recipe, world) if recipe.train.micro_batch_size == "auto" else [recipe.train.micro_batch_size]:
            fixed = with_train(recipe, gradient_checkpointing=policy, checkpoint_every_k=k, micro_batch_size=micro)
            plan = resolve_plan(fixed, world, machine, cfg)
            if memory.budget_for_plan(fixed, plan).fits:
                return policy, k, micro
    return None


def with_train(recipe, **train_keys):
    r = copy.deepcopy(recipe)
    for key, value in train_keys.items():
        setattr(r.train, key, value)
    return r


def peak_gib(recipe, world, cfg, policy, micro, k=2):
    r = with_train(recipe, gradient_checkpointing=policy, micro_batch_size=micro, checkpoint_every_k=k)
    return memory.budget_for_plan(r, resolve_plan(r, world, MACHINES["cuda-flash"], cfg)).peak_bytes / GIB


# GPU sizes placed between the budget's own peaks for the 8B recipe on 8 GPUs, so each row lands on a
# different choice: (id, how the size is set from the peaks)
# (On CUDA "fits" asks the upper end of the uncalibrated band to fit: the sizes carry it.)
BAND = 1 + GPU_UNCALIBRATED_BAND
AUTO_ROWS = [
    ("roomy", lambda p: 400.0),  # everything fits: no recomputation, the largest micro-batch
    ("between-none-and-full", lambda p: (p["none"] + p["full"]) / 2 * 1.03 * BAND),  # some every_k, or a smaller micro-batch
    ("just-full", lambda p: p["full"] * (1.035 + GPU_UNCALIBRATED_BAND)),  # only full recomputation at micro-batch 1 fits
    ("nothing", lambda p: p["full"] * 0.5),  # nothing fits: the least memory, said so
]


@pytest.mark.parametrize("row", AUTO_ROWS, ids=[r[0] for r in AUTO_ROWS])
def test_auto_picks_the_least_recomputation_that_fits(row, tmp_path, tiny_llama):
    name, size = row
    recipe_path = REPO / "harness" / "recipes" / "llama3_8b_qlora.yaml"
    d = model_dir_for(recipe_path, tmp_path, tiny_llama)
    cfg = json.loads((d / "config.json").read_text())
    recipe = load_recipe(str(recipe_path), [f"model.path={d}", "train.gradient_checkpointing=auto", "train.micro_batch_size=auto",
                                            "train.global_batch_size=32"])
    peaks = {"none": peak_gib(recipe, 8, cfg, "none", 1), "full": peak_gib(recipe, 8, cfg, "full", 1)}
    machine = Machine("cuda", True, int(size(peaks) * GIB))
    plan = resolve_plan(recipe, 8, machine, cfg)
    want = best_by_brute_force(recipe, 8, machine, cfg)
    why = plan.why["gradient_checkpointing"]
    if want is None:
        assert name == "nothing"
        assert (plan.gradient_checkpointing, plan.micro_batch_size) == ("full", 1) and "nothing fits" in why
        return
    got = (plan.gradient_checkpointing, plan.checkpoint_every_k if plan.gradient_checkpointing == "every_k" else want[1], plan.micro_batch_size)
    assert got == want, (got, want, why)
    assert "budget peak" in why and memory.budget_for_plan(recipe, plan).fits
    expected_policy = {"roomy": "none", "just-full": "full"}.get(name)
    if expected_policy:
        assert plan.gradient_checkpointing == expected_policy, why
    if name == "roomy":
        assert plan.micro_batch_size == 32 // 8
    if name == "between-none-and-full":
        assert plan.gradient_checkpointing in ("every_k", "none")


def test_auto_on_an_unknown_device_size_takes_the_safe_value(tiny_llama):
    recipe = load_recipe(str(REPO / "harness" / "recipes" / "tiny_qlora.yaml"),
                         [f"model.path={tiny_llama}", "train.gradient_checkpointing=auto", "train.micro_batch_size=auto"])
    cfg = json.loads((tiny_llama / "config.json").read_text())
    plan = resolve_plan(recipe, 2, Machine("cpu", False, None), cfg)
    assert (plan.gradient_checkpointing, plan.micro_batch_size) == ("full", 1)
    assert "unknown" in plan.why["gradient_checkpointing"]
    roomy = resolve_plan(recipe, 2, Machine("cpu", False, 8 * GIB), cfg)  # a tiny model fits anywhere
    assert (roomy.gradient_checkpointing, roomy.micro_batch_size) == ("none", recipe.train.global_batch_size // 2)


def test_flash_attn_asked_for_where_it_cannot_run_is_one_line(tiny_llama):
    recipe = load_recipe(str(REPO / "harness" / "recipes" / "tiny_qlora.yaml"),
                         [f"model.path={tiny_llama}", "model.attn_implementation=flash_attention_2"])
    cfg = json.loads((tiny_llama / "config.json").read_text())
    with pytest.raises(ConfigError, match="attn_implementation=sdpa"):
        resolve_plan(recipe, 1, MACHINES["cuda-no-flash"], cfg)
    assert resolve_plan(recipe, 1, MACHINES["cuda-flash"], cfg).attn == "flash_attention_2"


@pytest.mark.parametrize("data, attn, flat", [
    ({"packing": True}, "sdpa", False),  # (rows, seq_len) with a block-diagonal mask
    ({"packing": True}, "flash_attention_2", True),  # flash-attn's varlen path needs a single row
    ({"padding_free": True}, "eager", True),
    ({}, "flash_attention_2", False),
])
def test_batch_layout_follows_the_recipe_and_the_attention_kernel(data, attn, flat, tiny_llama):
    over = [f"model.path={tiny_llama}", f"model.attn_implementation={attn}", "train.precision=bf16"] + [f"data.{k}={v}" for k, v in data.items()]
    recipe = load_recipe(str(REPO / "harness" / "recipes" / "tiny_qlora.yaml"), over)
    plan = resolve_plan(recipe, 1, MACHINES["cuda-flash"], json.loads((tiny_llama / "config.json").read_text()))
    assert plan.flat_batches is flat


def test_memory_cli_plans_auto_for_the_target_cluster(capsys, tmp_path):
    """harness-memory on a recipe whose checkpointing is "auto" (the 8B one) decides it for the cluster it
    is given, says so with the budget line, and budgets exactly that choice."""
    from harness.memory import cli as memory_cli

    recipe = str(REPO / "harness" / "recipes" / "llama3_8b_qlora.yaml")
    common = ["--recipe", recipe, "--model", "llama-3.1-8b", "--nodes", "1", "--gpus-per-node", "8", "--no-deepspeed", "--no-search",
              "--no-flash-attn", "--json"]
    chosen = {}
    for gib in (80, 300):
        out = tmp_path / f"budget_{gib}.json"
        assert memory_cli.main([*common, str(out), "--gpu-memory-gib", str(gib)]) == 0
        err = capsys.readouterr().err
        setup = json.loads(out.read_text())["setup"]
        assert f"plan: gradient_checkpointing: {setup['checkpointing']}  # auto: budget peak" in err, err
        assert "plan: attention: sdpa  # auto: flash-attn is not importable" in err  # --no-flash-attn: the target has none
        chosen[gib] = setup["checkpointing"]
    assert chosen == {80: "full", 300: "none"}, chosen  # more memory per GPU, less recomputation


def test_a_sequence_longer_than_the_model_is_logged_with_the_plan(tiny_llama):
    """Past max_position_embeddings RoPE extrapolates: allowed (context extension does it on purpose),
    but said in the plan the run logs and --dry-run prints."""
    cfg = json.loads((tiny_llama / "config.json").read_text())
    recipe = load_recipe(str(REPO / "harness" / "recipes" / "tiny_qlora.yaml"), [f"model.path={tiny_llama}", "data.seq_len=4096"])
    lines = resolve_plan(recipe, 1, MACHINES["cpu"], cfg).lines()
    assert f"warning: data.seq_len=4096 exceeds the model's max_position_embeddings={cfg['max_position_embeddings']}" in lines[-1]
    short = load_recipe(str(REPO / "harness" / "recipes" / "tiny_qlora.yaml"), [f"model.path={tiny_llama}"])
    assert not [line for line in resolve_plan(short, 1, MACHINES["cpu"], cfg).lines() if line.startswith("warning:")]
