"""Data statistics: every row read is counted as kept, skipped, cut or dropped, per file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MAX_EXAMPLES = 5  # problems quoted in the log when rows are skipped


@dataclass
class SourceStats:
    name: str  # the file
    format: str
    split: str = "train"
    rows: int = 0  # rows read, bad ones included
    skipped: int = 0  # malformed or missing fields (data.on_error=skip)
    truncated: int = 0  # longer than seq_len and cut (data.overlong=truncate)
    dropped_overlong: int = 0  # longer than seq_len and dropped (data.overlong=drop)
    dropped_no_target: int = 0  # nothing to learn: no assistant turn, or the prompt alone fills seq_len
    samples: int = 0  # samples kept
    tokens: int = 0
    target_tokens: int = 0


@dataclass
class DataStats:
    rows: int = 0  # samples kept, over every file read
    skipped_rows: int = 0
    truncated: int = 0
    dropped: int = 0  # over-long (overlong=drop) plus without any target token
    target_tokens: int = 0
    errors: list = field(default_factory=list)  # the first problems, as messages
    sources: list = field(default_factory=list)  # SourceStats per file read
    mix: list = field(default_factory=list)  # per training source: its samples and share of the mix
    mixing: str = "weight"
    train_samples: int = 0
    train_rows: int = 0  # packed rows (= train_samples without packing)
    val_samples: int = 0
    packing_efficiency: float = 0.0  # real tokens / (rows x seq_len)
    cache: str = "off"  # hit | miss | off
    tokenize_s: float = 0.0

    def absorb(self, st: SourceStats) -> None:
        self.sources.append(st)
        self.rows += st.samples
        self.skipped_rows += st.skipped
        self.truncated += st.truncated
        self.dropped += st.dropped_overlong + st.dropped_no_target
        self.target_tokens += st.target_tokens

    def lines(self, seq_len: int) -> list[str]:
        """The log lines: sizes and every count of what was skipped, cut or dropped; the mix shares."""
        n_trunc = sum(s.truncated for s in self.sources)
        n_long = sum(s.dropped_overlong for s in self.sources)
        n_empty = sum(s.dropped_no_target for s in self.sources)
        rows = f" in {self.train_rows:,} packed rows ({100 * self.packing_efficiency:.1f}% full)" if self.train_rows != self.train_samples else ""
        out = [
            f"data: {self.train_samples:,} train samples{rows}, {self.val_samples:,} val, {self.target_tokens:,} target tokens; "
            f"{self.skipped_rows} rows skipped, {n_trunc} truncated to {seq_len} and {n_long} dropped as longer, "
            f"{n_empty} dropped without target tokens; cache {self.cache}"
        ]
        if self.mix:
            parts = [f"{m['name']} {100 * m['share']:.1f}% ({m['samples']:,} samples, {m['epochs']:.2f} epochs)" for m in self.mix]
            out.append(f"data mix ({self.mixing}): " + ", ".join(parts))
        out += [f"data: skipped {e}" for e in self.errors[:MAX_EXAMPLES]]
        return out

    def record(self) -> dict:
        """For metrics.jsonl: everything above as plain numbers."""
        d = dataclasses.asdict(self)
        d["errors"] = self.errors[:MAX_EXAMPLES]
        return d
