"""Loading local files through `datasets`, with file:line errors for bad rows."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from harness.config import ConfigError, SourceConfig
from harness.data.render import REQUIRED
from harness.data.stats import DataStats, SourceStats


class RowOrigin:
    """Names a row in messages: 'file.jsonl:12' for JSON lines, 'file.parquet: row 12' otherwise."""

    def __init__(self, name: str, jsonl: bool = False, lines: list[int] | None = None):
        self.name, self.jsonl, self.lines = name, jsonl, lines

    def at(self, i: int) -> str:
        if self.jsonl:
            if self.lines is None:  # rows are the non-blank lines, in order
                with open(self.name, encoding="utf-8", errors="replace") as f:
                    self.lines = [n for n, line in enumerate(f, 1) if line.strip()]
            return f"{self.name}:{self.lines[i]}"
        return f"{self.name}: row {i + 1}"


def row_problem(msg: str, on_error: str, st: SourceStats, errors: list, fix: str) -> None:
    """A bad row: an error (on_error=raise) or skipped and counted (on_error=skip)."""
    if on_error == "raise":
        raise ConfigError(f"{msg}; {fix}")
    st.skipped += 1
    errors.append(msg)


def _innermost(e: BaseException) -> str:
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {e}"


def _is_blank(path: Path) -> bool:
    if path.stat().st_size == 0:
        return True
    if path.stat().st_size > 1 << 20:
        return False
    return not path.read_bytes().strip()


def _check_utf8(path: Path, chunk_bytes: int = 64 << 20) -> None:
    """A text data file must be UTF-8: name the first line that is not (a latin-1 or UTF-16 export)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    lines_before = offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                # e.start is within this chunk plus what the decoder held back (at most 3 bytes)
                held = len(e.object) - len(chunk)
                pos = max(0, e.start - held)
                line = lines_before + chunk.count(b"\n", 0, pos) + 1
                raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at file offset {offset + pos}); "
                                  f"re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            if not chunk:
                return
            lines_before += chunk.count(b"\n")
            offset += len(chunk)


def _json_by_line(path: Path, on_error: str, st: SourceStats, errors: list, why: Exception):
    """`datasets` could not read a JSON file: find the bad lines (file:line), skip them or fail."""
    import datasets

    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json" and text.lstrip().startswith("["):  # one JSON document
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}); fix the file "
                              "(a JSON array cannot be read row by row)") from None
        pairs = [(i + 1, x) for i, x in enumerate(items)]
        where = "element"
    else:
        pairs = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        where = "line"
    rows, lines = [], []
    for n, item in pairs:
        try:
            row = json.loads(item) if where == "line" else item
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as e:
            st.rows += 1
            loc = f"{path}:{n}" if where == "line" else f"{path}: element {n}"
            row_problem(f"{loc}: malformed JSON {where} ({e})", on_error, st, errors, f"fix the {where} or set data.on_error=skip")
            continue
        rows.append(row)
        lines.append(n)
    if not rows:
        raise ConfigError(f"{path}: no readable rows ({st.skipped} malformed); fix the file")
    try:
        ds = datasets.Dataset.from_list(rows)
    except Exception as e:  # every line parses but the rows do not form a table (mixed types)
        raise ConfigError(f"{path}: cannot be read as a dataset ({_innermost(why)}); make each field one type across rows") from e
    return ds, RowOrigin(str(path), jsonl=where == "line", lines=lines if where == "line" else None)


def load_source(path: str, fmt: str, columns: dict, on_error: str, st: SourceStats, errors: list, key: str = "data.sources.N",
                tmp_dir: str | None = None, need_label: bool = False):
    """One file (or saved dataset directory) as a `datasets.Dataset` with the column mapping applied and
    the columns the format needs present (and `label`, for task=classification). Returns (dataset, origin)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    p = Path(path)
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise ConfigError(f"{p}: cannot be read as a saved dataset ({_innermost(e)}); write it with Dataset.save_to_disk") from e
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ConfigError(f"{p}: a saved DatasetDict without a 'train' split (has {', '.join(ds)}); save the split to use")
            ds = ds["train"]
        origin = RowOrigin(str(p))
    else:
        kind = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(p.suffix.lower())
        if kind is None:
            raise ConfigError(f"{p}: unknown file type '{p.suffix}'; use .jsonl, .json, .parquet, .csv or a saved dataset directory")
        if _is_blank(p):
            raise ConfigError(f"{p}: the file is empty (no rows); fill it or remove the source")
        if kind != "parquet":
            _check_utf8(p)
        origin = RowOrigin(str(p), jsonl=kind == "json" and not p.read_bytes()[:4096].lstrip().startswith(b"["))
        with tempfile.TemporaryDirectory(dir=tmp_dir) as hf_cache:  # datasets' Arrow copy: read into memory, then gone
            try:
                ds = datasets.load_dataset(kind, data_files=str(p), split="train", cache_dir=hf_cache, keep_in_memory=True)
            except Exception as e:
                if kind != "json":
                    raise ConfigError(f"{p}: cannot be read as {kind} ({_innermost(e)}); fix the file") from e
                ds, origin = _json_by_line(p, on_error, st, errors, e)
    if len(ds) == 0:
        raise ConfigError(f"{p}: the file is empty (no rows); fill it or remove the source")
    if columns:
        missing = [have for have in columns.values() if have not in ds.column_names]
        if missing:
            raise ConfigError(f"{p}: {key}.columns names {', '.join(repr(m) for m in missing)}, not a column of the file "
                              f"(it has {', '.join(ds.column_names)})")
        if len(set(columns.values())) != len(columns):
            raise ConfigError(f"{key}.columns maps two names to one column; map each expected name to its own column")
        clash = [want for want in columns if want in ds.column_names and want not in columns.values()]
        ds = ds.remove_columns(clash).rename_columns({have: want for want, have in columns.items() if have != want})
    need = [c for c in REQUIRED[fmt] + (("label",) if need_label else ()) if c not in ds.column_names]
    if need:
        hint = ", ".join(f"{c}: <column>" for c in need)
        what = f"format '{fmt}'" + (" with task=classification" if need_label else "")
        raise ConfigError(
            f"{p}: no column {', '.join(repr(c) for c in need)} needed by {what} (the file has {', '.join(ds.column_names)}); "
            f"map one with {key}.columns: {{{hint}}} or pick the right {key}.format"
        )
    st.rows += len(ds)
    return ds, origin


def load_rows(src: SourceConfig, on_error: str, stats: DataStats) -> list[dict]:
    """Rows of one source as dicts, with the column mapping applied (a small helper for tools and tests)."""
    st = SourceStats(src.path, src.format)
    errors: list = []
    ds, _ = load_source(src.path, src.format, src.columns, on_error, st, errors)
    stats.absorb(st)
    stats.errors += errors
    return ds.to_list()
