#!/usr/bin/env python
"""Grade the bad-input and fault battery (prints figures; the tests check each row on their own).

Each in-process row of tests/test_fault_battery.py (one bad input or fault, the error it must raise and
what its one-line message must say) is run and graded:

  well    the expected kind of error, on one line, naming everything the row asks for (the file, line or
          key, and the fix)
  partly  the expected kind of error, but its message lacks part of that or runs over several lines
  badly   no error at all (silently accepted), or another kind of error: a traceback from deep inside
  skipped the machine cannot stage the fault (a read-only mount without the right to mount)

    python tools/fault_battery.py                        # this checkout's harness/
    python tools/fault_battery.py --harness-tree /tmp/old --json /tmp/before.json
        # the same rows against another checkout's harness/ (git worktree add /tmp/old REV): a module or
        # name that did not exist there yet stands in as one that raises, so the row grades "badly"

Exit code 0 (the grades are the output, not a verdict).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATTERY = "tests.test_fault_battery"


class Absent(Exception):
    """What a module or name that the other checkout lacked raises when a row uses it."""


def _absent_module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)

    def missing(attr):
        def call(*_a, **_k):
            raise Absent(f"{name}.{attr} does not exist in this checkout")
        return call

    mod.__getattr__ = missing
    return mod


def import_battery(max_stubs: int = 40):
    """Import the battery's rows; every module / name it imports that this harness lacks becomes a stub."""
    for _ in range(max_stubs):
        try:
            return importlib.import_module(BATTERY)
        except ImportError as e:
            sys.modules.pop(BATTERY, None)
            missing_module = re.search(r"No module named '([\w.]+)'", str(e))
            missing_name = re.search(r"cannot import name '(\w+)' from '([\w.]+)'", str(e))
            if missing_module and missing_module.group(1).startswith("harness"):
                stub = _absent_module(missing_module.group(1))
                sys.modules[missing_module.group(1)] = stub
                parent, _, leaf = missing_module.group(1).rpartition(".")
                if parent in sys.modules:
                    setattr(sys.modules[parent], leaf, stub)
            elif missing_name and missing_name.group(2).startswith("harness"):
                setattr(importlib.import_module(missing_name.group(2)), missing_name.group(1), _absent_module(missing_name.group(1)))
            else:
                raise
    raise RuntimeError("too many missing names")


def grade(action, kind, must_contain, tmp: Path, model: Path) -> tuple[str, str]:
    """(grade, what happened in one line)."""
    try:
        action(tmp, model)
    except BaseException as e:  # noqa: BLE001 - every outcome is graded, a pytest.skip included
        if type(e).__name__ == "Skipped":
            return "skipped", str(e)
        message = str(e).strip()
        if isinstance(e, kind):
            missing = [s for s in must_contain if s not in message]
            if not missing and "\n" not in message:
                return "well", message
            why = f"lacks {missing}" if missing else "several lines"
            return "partly", f"{why}: {message.splitlines()[0] if message else ''}"
        where = traceback.extract_tb(e.__traceback__)[-1]
        return "badly", f"{type(e).__name__} at {Path(where.filename).name}:{where.lineno}: {message.splitlines()[0] if message else ''}"
    return "badly", "accepted silently: no error"


def run_rows(model: Path) -> list[dict]:
    battery = import_battery()
    import harness

    rows = []
    for name, (action, kind, must_contain) in battery.CASES.items():
        with tempfile.TemporaryDirectory(prefix="battery-") as tmp:
            g, what = grade(action, kind, must_contain, Path(tmp), model)
            while getattr(battery, "_MOUNTED", None):  # read-only mounts a row made
                subprocess.run(["umount", str(battery._MOUNTED.pop())], check=False)
        rows.append({"case": name, "grade": g, "what": what})
    return [{"harness": str(Path(harness.__file__).parent)}] + rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--harness-tree", type=Path, help="a checkout whose harness/ the rows run against (default: this one)")
    p.add_argument("--json", type=Path, help="also write every row's grade here")
    p.add_argument("--quiet", action="store_true", help="only the counts and the rows not graded well")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: run the rows, write them here
    args = p.parse_args(argv)

    if args.child:
        if os.environ.get("FAULT_BATTERY_OTHER_TREE"):
            # this checkout's editable install would still answer for submodules the other tree lacks
            sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", type(f).__name__)]
        from tools.make_tiny_model import make_tiny_model

        with tempfile.TemporaryDirectory(prefix="battery-model-") as d:
            model = make_tiny_model("llama-3.1-8b", Path(d) / "llama")
            args.child.write_text(json.dumps(run_rows(model)))
        return 0

    # The rows run in a child process whose `harness` is the chosen tree's (first on PYTHONPATH, ahead of
    # this checkout's editable install) while tests/ and tools/ stay this checkout's.
    with tempfile.TemporaryDirectory(prefix="battery-") as d:
        path = [str(REPO)]
        if args.harness_tree:
            link = Path(d) / "tree"
            link.mkdir()
            (link / "harness").symlink_to(args.harness_tree.resolve() / "harness")
            path.insert(0, str(link))
        out = Path(d) / "rows.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1",
               "FAULT_BATTERY_OTHER_TREE": "1" if args.harness_tree else ""}
        proc = subprocess.run([sys.executable, "-P", str(Path(__file__).resolve()), "--child", str(out)], cwd=REPO, env=env)
        if proc.returncode != 0:
            print(f"the battery run failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        header, *rows = json.loads(out.read_text())
    counts = {g: sum(r["grade"] == g for r in rows) for g in ("well", "partly", "badly", "skipped")}
    print(f"harness under test: {header['harness']}")
    for r in rows:
        if not args.quiet or r["grade"] != "well":
            print(f"{r['grade']:<8} {r['case']:<32} {r['what'][:150]}")
    print(f"{len(rows)} cases: {counts['well']} well, {counts['partly']} partly, {counts['badly']} badly"
          + (f", {counts['skipped']} skipped" if counts["skipped"] else ""))
    if args.json:
        args.json.write_text(json.dumps({"harness": header["harness"], "counts": counts, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
