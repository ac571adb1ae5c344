"""`costgraph calibrate`: microbenchmarks of this CPU -> a preset for the time model (`costgraph.timemodel`).

Per storage dtype (fp32: the vision reference's; bf16: the language model's):
- peaks as `costgraph.hardware.calibrate` measures them (best of several samples): a 2048^3 matmul,
  fp32 elementwise in cache, a DRAM copy;
- efficiencies, each the median over shapes the model runs of the best achieved rate over timed
  calls, divided by its peak: large GEMMs (prompt x hidden x MLP widths, a vision batch's tokens x
  768 x 2304), attention products (heads x 1000 x 128 bmm), skinny GEMMs (1 row against the LM's
  weights, 128 MiB of distinct weights per sample so that they stream from DRAM: bytes/s, the weight
  stream), elementwise ops and copies on activation-sized tensors (a few MB, what a prefill's
  activations are: they live in L2/L3 here) and on 64 MiB (past the caches: the DRAM figures used for
  larger ops; `cache_bytes` read from sysfs), and the overhead per kernel of a forward (16 tiny
  residual blocks through nn.Module: no work, only dispatch).
The result is written as JSON (`--out`; default `~/.cache/costgraph/cpu.json`), and the preset `cpu`
reads it (else the bundled one, `costgraph/presets/cpu.json`, with the date and load it was measured at).
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

from .dtypes import torch_dtype
from .hardware import CPU, Efficiency, Hardware, calibrate as calibrate_peaks

DTYPES = ("fp32", "bf16")

GEMM_SHAPES = ((1024, 1280, 1280), (903, 1280, 6848), (1600, 768, 2304), (400, 1024, 4096))
ATTENTION_SHAPES = ((10, 903, 128, 903), (12, 196, 64, 196), (16, 101, 64, 101))   # heads, q, dim, keys
SKINNY_SHAPES = ((1, 1280, 6848), (1, 1280, 1792), (1, 1280, 1280), (1, 896, 1280), (1, 1280, 129280 // 4))
ACTIVATION_ELEMENTS = 903 * 1280   # one page-sized prompt's hidden states
DRAM_ELEMENTS = 1 << 24            # 32-64 MiB: past the caches
STREAM_BYTES = 128 << 20           # weights a skinny-GEMM sample streams through


def cache_bytes() -> int:
    """L2 per core x cores + the shared L3 (Linux sysfs); 0 when unknown (one regime)."""
    total = 0
    try:
        base = Path("/sys/devices/system/cpu/cpu0/cache")
        for d in base.glob("index*"):
            level, kind = int((d / "level").read_text()), (d / "type").read_text().strip()
            if level < 2 or kind == "Instruction":
                continue
            size = (d / "size").read_text().strip()
            n = int(size[:-1]) * {"K": 1024, "M": 1 << 20}[size[-1]] if size[-1] in "KM" else int(size)
            total += n * ((os.cpu_count() or 1) if level == 2 else 1)
    except (OSError, ValueError, KeyError):
        return 0
    return total


def _best_seconds(fn, min_time: float = 0.2, max_calls: int = 200) -> float:
    """The fastest of many timed calls: a call free of interference from other processes (the
    peaks take their best sample too, and `costgraph.verify.timing` the best of its repeats)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


class _Block:
    """A tiny residual block (Linear 8 -> 8, GELU, add): three kernels whose work is nothing, called
    through nn.Module as a model's layers are: the per-kernel overhead as a forward pays it."""

    def __init__(self):
        import torch
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(16)])
        self.act = torch.nn.GELU()

    def __call__(self, x):
        for lin in self.blocks:
            x = x + self.act(lin(x))
        return x

    kernels = 16 * 3


def measure(dtype: str) -> tuple[Hardware, Efficiency, dict]:
    import torch

    td = torch_dtype(dtype)
    hw = calibrate_peaks(dtype)
    # the elementwise rate again, as the best of many calls over a longer time: one unlucky
    # measurement of it (a shared machine) would make every elementwise op look slow
    small = torch.ones(2 ** 17 * torch.get_num_threads())
    s = _best_seconds(lambda: small.mul_(1.0), min_time=0.5, max_calls=5000)
    hw = replace(hw, vector_flops=max(hw.vector_flops, small.numel() / s))
    size = td.itemsize if hasattr(td, "itemsize") else torch.tensor([], dtype=td).element_size()
    detail: dict[str, list] = {}
    with torch.no_grad():
        rates = []
        for m, k, n in GEMM_SHAPES:
            a, b = torch.randn(m, k, dtype=td), torch.randn(k, n, dtype=td)
            s = _best_seconds(lambda: torch.mm(a, b))
            rates.append(2 * m * k * n / s / hw.tensor_flops)
        detail["gemm"] = rates
        att = []
        for h, q, d, kk in ATTENTION_SHAPES:
            a, b = torch.randn(h, q, d, dtype=td), torch.randn(h, d, kk, dtype=td)
            s = _best_seconds(lambda: torch.bmm(a, b))
            att.append(2 * h * q * d * kk / s / hw.tensor_flops)
        detail["attention"] = att
        stream = []
        for m, k, n in SKINNY_SHAPES:
            # distinct weights past the caches, as a decode step streams its layers' weights from DRAM
            # (one weight called again and again would be read from the cache)
            copies = -(-STREAM_BYTES // (k * n * size))
            a, ws = torch.randn(m, k, dtype=td), [torch.randn(n, k, dtype=td) for _ in range(copies)]
            s = _best_seconds(lambda: [torch.nn.functional.linear(a, w) for w in ws], max_calls=20)
            stream.append(copies * (m * k + k * n + m * n) * size / s / hw.bandwidth)
        detail["stream"] = stream
        x, y = torch.randn(ACTIVATION_ELEMENTS, dtype=td), torch.randn(ACTIVATION_ELEMENTS, dtype=td)
        s = _best_seconds(lambda: torch.add(x, y))
        detail["elementwise"] = [3 * ACTIVATION_ELEMENTS * size / s / hw.bandwidth]
        out = torch.empty_like(x)
        s = _best_seconds(lambda: out.copy_(x))
        detail["copy"] = [2 * ACTIVATION_ELEMENTS * size / s / hw.bandwidth]
        x, y = torch.randn(DRAM_ELEMENTS, dtype=td), torch.randn(DRAM_ELEMENTS, dtype=td)
        s = _best_seconds(lambda: torch.add(x, y), max_calls=20)
        detail["elementwise_dram"] = [3 * DRAM_ELEMENTS * size / s / hw.bandwidth]
        out = torch.empty_like(x)
        s = _best_seconds(lambda: out.copy_(x), max_calls=20)
        detail["copy_dram"] = [2 * DRAM_ELEMENTS * size / s / hw.bandwidth]
        block, tiny = _Block(), torch.ones(1, 8)
        s = _best_seconds(lambda: block(tiny), max_calls=2000)
        detail["launch"] = [s / _Block.kernels]
    mean = lambda xs: float(statistics.median(xs))
    eff = Efficiency(gemm=mean(detail["gemm"]), attention=mean(detail["attention"]), vector=1.0,
                     stream=mean(detail["stream"]), elementwise=mean(detail["elementwise"]),
                     copy=mean(detail["copy"]), launch=detail["launch"][0], cache_bytes=float(cache_bytes()),
                     elementwise_dram=mean(detail["elementwise_dram"]), copy_dram=mean(detail["copy_dram"]),
                     source=f"calibrated on this machine ({dtype}): medians of microbenchmarks / the preset's peaks")
    return replace(hw, name=CPU), eff, detail


def run(dtypes=DTYPES, threads: int | None = None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    load = os.getloadavg()
    out = {"measured": time.strftime("%Y-%m-%d %H:%M"), "threads": torch.get_num_threads(),
           "load_average": [round(x, 2) for x in load], "cpu_count": os.cpu_count(), "presets": {}}
    for d in dtypes:
        hw, eff, detail = measure(d)
        out["presets"][d] = {"hardware": {k: v for k, v in hw.as_dict().items() if k != "efficiency"},
                             "efficiency": eff.as_dict(), "detail": detail}
    return out


def write(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)   # never a half-written preset
