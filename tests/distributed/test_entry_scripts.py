"""The entry scripts do not let harness/ shadow installed modules, inside launched ranks.

Run as a script, Python puts the script's directory first on sys.path; for harness/train.py that is
harness/ itself, whose kernels/, config.py, data/, model.py, memory/, metrics.py ... then stand in for
any installed top-level module of those names (bitsandbytes' `from kernels import get_kernel` got our
kernels package); so each entry file runs itself again as its module (harness/_entry.py). Each case
here starts an entry point the way users do (a file under a launcher, the module, the console script), with a directory of stand-in
"installed" packages of those names on PYTHONPATH and a sitecustomize that records, in the rank itself
once the script imports torch, what each name resolves to.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, TRAIN, child_env, free_port, run_bounded

pytestmark = pytest.mark.distributed
RECIPE = str(REPO / "harness" / "recipes" / "tiny_qlora.yaml")
NAMES = ["kernels", "config", "data", "model", "memory", "metrics", "checkpoint", "distributed", "loading", "export", "preflight"]

# Written into the PYTHONPATH directory of the launched processes. An audit hook sees every import;
# at the script's first `import torch` (after its own start-up code ran) it records where each name
# would be imported from, and sys.path, in $RECORD_DIR/<pid>.json.
SITECUSTOMIZE = '''
import importlib.util, json, os, sys

NAMES = {names!r}
_done = []

def _hook(event, args):
    if _done or event != "import" or args[0] != "torch" or not sys.argv[0].endswith(("train.py", "preflight.py", "harness-train")):
        return
    _done.append(1)
    origins = {{}}
    for name in NAMES:
        spec = importlib.util.find_spec(name)
        origins[name] = None if spec is None else (spec.origin or list(spec.submodule_search_locations or [None])[0])
    with open(os.path.join(os.environ["RECORD_DIR"], f"{{os.getpid()}}.json"), "w") as f:
        json.dump({{"script": sys.argv[0], "rank": os.environ.get("RANK"), "origins": origins, "sys_path": sys.path}}, f)

sys.addaudithook(_hook)
'''


def _deepspeed(n):
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port", str(free_port())]


def _torchrun(n):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(free_port())]


DRY_RUN = [TRAIN, "--config", RECIPE, "--dry-run"]
CASES = {  # name: (command before the script's arguments, script and arguments, processes that record)
    "deepspeed-train": (_deepspeed(2), DRY_RUN, 2),
    "torchrun-train": (_torchrun(2), DRY_RUN, 2),
    "python-train": ([sys.executable], DRY_RUN, 1),
    "module-train": ([sys.executable, "-m", "harness.train"], DRY_RUN[1:], 1),
    "console-script-train": ([str(Path(sys.executable).parent / "harness-train")], DRY_RUN[1:], 1),
    "torchrun-preflight": (_torchrun(2), [str(REPO / "harness" / "preflight.py"), "allreduce", "--timeout-s", "60"], 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_our_modules_do_not_shadow_installed_ones(tiny_llama, tmp_path, case):
    installed = tmp_path / "site"
    for name in NAMES:  # stand-ins for installed top-level packages of our modules' names
        (installed / name).mkdir(parents=True)
        (installed / name / "__init__.py").write_text("INSTALLED = True\n")
    (installed / "sitecustomize.py").write_text(SITECUSTOMIZE.format(names=NAMES))
    records = tmp_path / "records"
    records.mkdir()
    launcher, script, n = CASES[case]
    args = [*script, f"model.path={tiny_llama}"] if "--dry-run" in script else script
    env = child_env(PYTHONPATH=f"{REPO}:{installed}", RECORD_DIR=str(records))
    proc = run_bounded([*launcher, *args], env, timeout_s=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    found = [json.loads(p.read_text()) for p in records.glob("*.json")]
    assert len(found) == n, f"{len(found)} processes recorded, expected {n}"
    harness_dir = str(REPO / "harness")
    for rec in found:
        assert harness_dir not in rec["sys_path"], rec["sys_path"]
        for name, origin in rec["origins"].items():
            assert origin is not None and origin.startswith(str(installed)), f"rank {rec['rank']}: import {name} -> {origin}"
