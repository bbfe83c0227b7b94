"""CPU decode attention over the packed KV cache (placeholder until the generated C kernel lands):
returns None, and :func:`lowbit_compiler.kv.packed_attention` uses the blocked torch reference."""
from __future__ import annotations

from typing import Any

import torch


def decode_attention(query: torch.Tensor, layer: Any, mask: torch.Tensor | None, scaling: float,
                     softcap: float | None = None) -> torch.Tensor | None:
    return None
