"""Element sizes: the one table of dtypes and their bytes.

A model's storage dtype is the symbol `dtype_bytes` (costgraph.symbols); the dtypes a model can
be stored in are `STORAGE` (bf16, as most checkpoints ship, and fp32). Some parts run in a fixed
dtype whatever the storage (fp32 routers and softmax upcasts, int64 indices, bool masks): those
use the literal sizes below.
"""
from __future__ import annotations

from . import symbols as S

INT64, FLOAT32, BOOL = 8, 4, 1

STORAGE: dict[str, int] = {"bf16": 2, "fp32": 4}
DEFAULT_STORAGE = "bf16"

# every spelling a graph or a reference uses, to bytes
BYTES: dict[str, int] = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "int64": 8,
                         "bool": 1}


def torch_dtype(name: str):
    """The torch dtype of a storage dtype name (torch is imported only when a reference runs)."""
    import torch

    storage_values(name)
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def storage_values(dtype: str = DEFAULT_STORAGE) -> dict:
    """The substitution of the storage dtype: {dtype_bytes: 2} for bf16."""
    if dtype not in STORAGE:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(STORAGE)})")
    return {S.dtype_bytes: STORAGE[dtype]}
