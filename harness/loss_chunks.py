"""How many tokens the fused linear + cross-entropy kernel takes per chunk (harness/kernels/linear_cross_entropy.py),
in one torch-free place: the kernel runs by it and the memory budget (harness/memory/analytic.py, which must not
import torch) counts by it.

Liger's rule, at least 64 rows: C ~ N / ceil(V / H), so a chunk of logits is about as big as the hidden states
(Llama-3: V=128256, H=4096 -> 32 chunks; 4096 tokens -> 128-row chunks of 64 MiB fp32).
"""

from __future__ import annotations

import math

MIN_CHUNK_TOKENS = 64  # below this the (C x H) @ (H x V) GEMMs run far from peak (measured 4x slower at C=16 on CPU)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def default_chunk_tokens(n_tokens: int, hidden_size: int, vocab_size: int) -> int:
    n_chunks = max(1, math.ceil(vocab_size / hidden_size))
    return max(MIN_CHUNK_TOKENS, next_pow2(math.ceil(n_tokens / n_chunks)))
