"""Every shipped recipe loads, validates, and resolves under `train.py --dry-run` (one subprocess each)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from harness.config import load_recipe, read_model_config, to_dict, validate
from tests import helpers
from tests.helpers import REPO, launch

RECIPES = sorted((REPO / "harness" / "recipes").glob("*.yaml"))
STAND_IN_DATA = REPO / "harness" / "assets" / "tiny_instruct.jsonl"


def header_world_size(path: Path) -> int:
    """Ranks the recipe's leading comment block launches it with (`--num_gpus N`, `N gloo ranks`...); 1 if none."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    m = re.search(r"--num_gpus[ =](\d+)|--nproc[_-]per[_-]node[ =](\d+)|\b(\d+) (?:gloo |GPU |CPU )?ranks\b", "\n".join(header))
    return int(next(g for g in m.groups() if g)) if m else 1


def is_model_dir(p: str) -> bool:
    if not p:
        return False
    d = Path(p) if Path(p).is_absolute() else REPO / p
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def stand_in_overrides(recipe_path: Path, tiny_llama) -> list[str]:
    """Overrides for what a CPU test box cannot have: the recipe's real model (and data) directories."""
    r = load_recipe(str(recipe_path), [])
    out = []
    if not is_model_dir(r.model.path):
        out.append(f"model.path={tiny_llama}")
        n_layers = int(read_model_config(tiny_llama)["num_hidden_layers"])
        if r.freeze_layers >= n_layers:
            out.append(f"freeze_layers={n_layers - 1}")

    for i, src in enumerate(r.data.sources):  # validate() only checks that data paths exist
        if src.path and not (REPO / src.path).exists():
            out.append(f"data.sources.{i}.path={STAND_IN_DATA}")
    if r.data.val_path and not (REPO / r.data.val_path).exists():
        out.append(f"data.val_path={STAND_IN_DATA}")
    return out


def test_recipes_exist():
    assert RECIPES, "no harness/recipes/*.yaml"


@pytest.mark.parametrize("recipe_path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates_and_dry_runs(recipe_path, tiny_llama, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes use repo-relative paths (ds_configs/..., harness/assets/...)
    world = header_world_size(recipe_path)
    overrides = stand_in_overrides(recipe_path, tiny_llama)
    recipe = load_recipe(str(recipe_path), overrides)
    t = recipe.train
    per_step = (1 if t.micro_batch_size == "auto" else t.micro_batch_size) * world
    assert t.global_batch_size % per_step == 0, (
        f"{recipe_path.name}: global batch {t.global_batch_size} is not a multiple of micro {t.micro_batch_size} x {world} ranks (header)"
    )
    validate(recipe, world)

    proc = launch(
        ["--config", str(recipe_path.relative_to(REPO)), *overrides, "--dry-run"],
        env=helpers.child_env(WORLD_SIZE=str(world), RANK="0", LOCAL_RANK="0"),
        timeout_s=120,
    )
    out = proc.stdout
    # The run plan comes first: every decision, and a reason for each one the recipe left "auto".
    plan_text = out.split("# run plan", 1)[1].split("# resolved recipe", 1)[0]
    plan = dict(line.split(": ", 1) for line in plan_text.strip().splitlines()[1:] if ": " in line)
    for key, value in (("precision", t.precision), ("attention", recipe.model.attn_implementation), ("loader", recipe.model.loader),
                       ("gradient_checkpointing", t.gradient_checkpointing), ("micro_batch_size", t.micro_batch_size)):
        assert key in plan, plan_text
        assert ("# auto:" in plan[key]) == (value == "auto"), (key, plan[key])
    micro = int(plan["micro_batch_size"].split()[0])
    assert out.count("# resolved recipe") == 1 and out.count("# resolved DeepSpeed config") == 1, out
    assert out.index("# resolved recipe") < out.index("# resolved DeepSpeed config")
    recipe_text = out.split("# resolved recipe", 1)[1].split("# resolved DeepSpeed config", 1)[0]
    assert yaml.safe_load(recipe_text) == to_dict(recipe)  # the printed recipe is the one validated here
    ds = json.loads(out.split("# resolved DeepSpeed config", 1)[1])  # nothing but JSON after the header
    assert "auto" not in json.dumps(ds)
    assert ds["train_micro_batch_size_per_gpu"] == micro == (micro if t.micro_batch_size == "auto" else t.micro_batch_size)
    assert ds["train_batch_size"] == t.global_batch_size
    assert ds["gradient_accumulation_steps"] == t.global_batch_size // (micro * world) == int(plan["grad_accum"])
    assert "error:" not in proc.stderr, proc.stderr
