"""The small numeric conventions every part of the harness shares, defined once."""

from __future__ import annotations

import torch

# The target of a token that no loss counts (prompt, padding, a packed row's boundaries): transformers'
# and torch's cross_entropy convention.
IGNORE_INDEX = -100

# recipe precision name -> torch dtype of the weights and the compute
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
