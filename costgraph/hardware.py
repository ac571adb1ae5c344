"""Hardware presets for roofline latency: datasheet peaks, and a calibrated preset for this machine.

Figures are the vendors' published dense (no sparsity) peaks. `tensor_flops` is the bf16
tensor-core throughput that matmul-class work runs on; `vector_flops` is the fp32 (non-tensor)
throughput that elementwise work runs on; `bandwidth` is the memory bandwidth in bytes/s.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

TERA = 1e12
GIGA = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    tensor_flops: float     # dense bf16 matmul FLOP/s
    vector_flops: float     # fp32 elementwise FLOP/s
    bandwidth: float        # memory bytes/s
    memory: float           # bytes
    source: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Hardware] = {h.name: h for h in (
    Hardware("a100-40gb", 312 * TERA, 19.5 * TERA, 1555 * GIGA, 40 * 2**30, "NVIDIA A100 datasheet (SXM4 40GB)"),
    Hardware("a100-80gb", 312 * TERA, 19.5 * TERA, 2039 * GIGA, 80 * 2**30, "NVIDIA A100 datasheet (SXM4 80GB)"),
    Hardware("h100-sxm", 989.4 * TERA, 66.9 * TERA, 3350 * GIGA, 80 * 2**30, "NVIDIA H100 datasheet (SXM5)"),
    Hardware("h200", 989.4 * TERA, 66.9 * TERA, 4800 * GIGA, 141 * 2**30, "NVIDIA H200 datasheet (SXM)"),
    Hardware("l4", 121 * TERA, 30.3 * TERA, 300 * GIGA, 24 * 2**30, "NVIDIA L4 datasheet"),
    Hardware("rtx-4090", 165.2 * TERA, 82.6 * TERA, 1008 * GIGA, 24 * 2**30,
             "NVIDIA Ada whitepaper (GeForce RTX 4090, FP16/BF16 tensor with FP32 accumulate)"),
)}


def get_hardware(name: str) -> Hardware:
    if name == "this-machine":
        return calibrate()
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r} (choose from {', '.join([*PRESETS, 'this-machine'])})") from None


def calibrate(budget_s: float = 0.5) -> Hardware:
    """Measure this machine: bf16 matmul, fp32 elementwise and copy bandwidth, best of a few runs."""
    import os

    import torch

    def best(fn, work: float) -> float:
        fn()  # warm-up
        rates = []
        deadline = time.perf_counter() + budget_s
        while time.perf_counter() < deadline or len(rates) < 3:
            t = time.perf_counter()
            fn()
            rates.append(work / (time.perf_counter() - t))
        return max(rates)

    n = 1024
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    tensor = best(lambda: torch.mm(a, b), 2 * n ** 3)
    small = torch.randn(2**16)  # 256 KiB: cache-resident, so arithmetic (not memory) bounds it
    out = torch.empty_like(small)
    reps = 64

    def vec():
        for _ in range(reps):
            torch.mul(small, small, out=out)

    vector = best(vec, reps * small.numel())
    x = torch.randn(16 * 2**20)  # 64 MiB: beyond the caches
    y = torch.empty_like(x)
    bandwidth = best(lambda: y.copy_(x), 2 * x.numel() * x.element_size())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware("this-machine", tensor, vector, bandwidth, float(memory),
                    f"calibrated: {torch.get_num_threads()} threads; bf16 mm {n}^3, fp32 mul in cache, copy of 64 MiB")
