"""Hardware presets for roofline latency: datasheet peaks, and a calibrated preset for this machine.

Figures are the vendors' published dense (no sparsity) peaks. `tensor_flops` is the bf16
tensor-core throughput that matmul-class work runs on; `vector_flops` is the fp32 (non-tensor)
throughput that elementwise work runs on; `bandwidth` is the memory bandwidth in bytes/s.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .dtypes import torch_dtype as _torch_dtype

@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of a preset's peaks, per op class, and the per-kernel overhead."""
    gemm: float          # large GEMM (and convolution): fraction of tensor_flops
    attention: float     # attention products: fraction of tensor_flops
    vector: float        # elementwise arithmetic: fraction of vector_flops
    stream: float        # matmul operand traffic (a skinny GEMM's weight stream): fraction of bandwidth
    elementwise: float   # elementwise ops' traffic: fraction of bandwidth
    copy: float          # copies, casts, gathers: fraction of bandwidth
    launch: float        # seconds per kernel launch / dispatch (eager)
    skinny: float = 32.0  # FLOP/byte below which a matmul is skinny (GEMV-like)
    source: str = ""
    # a CPU's caches: an op whose traffic exceeds `cache_bytes` runs at the DRAM fractions (0: one regime)
    cache_bytes: float = 0.0
    elementwise_dram: float | None = None
    copy_dram: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# Documented defaults for GPUs (not measurements): cuBLAS bf16 GEMMs of transformer sizes reach about
# 70 % of the dense tensor peak; flash-attention 2 about 50 % (A100 forward, head dim 128); memory-bound
# kernels about 80 % of the datasheet bandwidth (GEMV weight streaming, elementwise), copies 85 %;
# PyTorch eager about 8 us of host dispatch + launch per kernel (hidden when the GPU is busier than that,
# which max() per node does not see: an eager decode step is launch-bound).
GPU_DEFAULT = Efficiency(gemm=0.7, attention=0.5, vector=0.6, stream=0.8, elementwise=0.8, copy=0.85,
                         launch=8e-6, source="documented defaults for GPUs (rules of thumb, not measured)")


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
    measurements: tuple = ()  # calibrated presets: the Measurement behind each figure
    efficiency: Efficiency | None = None  # None: the documented GPU defaults (GPU_DEFAULT)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["measurements"] = [m.as_dict() if hasattr(m, "as_dict") else m for m in self.measurements]
        return d


PRESETS: dict[str, Hardware] = {h.name: h for h in (
    Hardware("a100-40gb", 312 * TERA, 19.5 * TERA, 1555 * GIGA, 40 * 2**30, "NVIDIA A100 datasheet (SXM4 40GB)"),
    Hardware("a100-80gb", 312 * TERA, 19.5 * TERA, 2039 * GIGA, 80 * 2**30, "NVIDIA A100 datasheet (SXM4 80GB)"),
    Hardware("h100-sxm", 989.4 * TERA, 66.9 * TERA, 3350 * GIGA, 80 * 2**30, "NVIDIA H100 datasheet (SXM5)"),
    Hardware("h200", 989.4 * TERA, 66.9 * TERA, 4800 * GIGA, 141 * 2**30, "NVIDIA H200 datasheet (SXM)"),
    Hardware("l4", 121 * TERA, 30.3 * TERA, 300 * GIGA, 24 * 2**30, "NVIDIA L4 datasheet"),
    Hardware("rtx-4090", 165.2 * TERA, 82.6 * TERA, 1008 * GIGA, 24 * 2**30,
             "NVIDIA Ada whitepaper (GeForce RTX 4090, FP16/BF16 tensor with FP32 accumulate)"),
    # Serving GPUs (dense peaks; tensor = FP16/BF16 with FP32 accumulate where the vendor lists both).
    Hardware("t4", 65 * TERA, 8.1 * TERA, 320 * GIGA, 16 * 2**30,
             "NVIDIA T4 datasheet (FP16 tensor: Turing has no bf16, a bf16 model runs in fp16 there)"),
    Hardware("a10", 125 * TERA, 31.2 * TERA, 600 * GIGA, 24 * 2**30, "NVIDIA A10 datasheet (BF16 tensor, dense)"),
    Hardware("l40s", 362.05 * TERA, 91.6 * TERA, 864 * GIGA, 48 * 2**30, "NVIDIA L40S datasheet (BF16 tensor, dense)"),
    Hardware("rtx-3090", 71 * TERA, 35.6 * TERA, 936.2 * GIGA, 24 * 2**30,
             "NVIDIA Ampere GA102 whitepaper (GeForce RTX 3090, FP16/BF16 tensor with FP32 accumulate)"),
    Hardware("rtx-5090", 209.5 * TERA, 104.8 * TERA, 1792 * GIGA, 32 * 2**30,
             "NVIDIA Blackwell whitepaper (GeForce RTX 5090, FP16/BF16 tensor with FP32 accumulate, dense)"),
    Hardware("h20", 148 * TERA, 44 * TERA, 4000 * GIGA, 96 * 2**30, "NVIDIA H20 datasheet (BF16 tensor, dense)"),
)}


def names() -> list[str]:
    return [*PRESETS, CPU, THIS_MACHINE]


THIS_MACHINE = "this-machine"
CPU = "cpu"   # this CPU as `costgraph calibrate` last measured it (costgraph.calibrate)


def get_hardware(name: str, dtype: str = "bf16") -> Hardware:
    """A preset by name; `this-machine` calibrates now, its matmul figure measured in `dtype`."""
    if name == THIS_MACHINE:
        return calibrate(dtype=dtype)
    if name == CPU:
        return load_cpu(dtype)
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r} (choose from {', '.join(names())})") from None


@dataclass(frozen=True)
class Measurement:
    """One calibrated figure: the best and the median rate over timed samples."""
    what: str
    best: float
    median: float
    samples: int

    def as_dict(self) -> dict:
        return asdict(self)


def _rates(fn, work: float, reps: int, samples: int) -> Measurement:
    """Time `samples` runs of `reps` calls each (one warm-up run first); rates in work/s."""
    fn()
    rates = []
    for _ in range(samples):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        rates.append(work * reps / (time.perf_counter() - t))
    return Measurement("", max(rates), statistics.median(rates), samples)


VECTOR_REPS, VECTOR_SAMPLES = 8, 64


def calibrate(dtype: str = "bf16", samples: int = 7, matmul_n: int = 2048, copy_mib: int = 256) -> Hardware:
    """Measure this machine (CPU, torch's threads): matmul throughput, elementwise throughput, bandwidth.

    The preset takes the BEST sample of each (a peak, like a datasheet figure); the median is
    kept beside it in `measurements`, as the spread is part of the result.
    - matmul: `torch.mm` of two n x n matrices (n = `matmul_n`, 2048) in the model's storage dtype
      (`dtype`), 2*n^3 FLOPs per call.
    - vector: fp32 in-place multiply by a scalar (1 FLOP per element under the conventions) on a
      tensor of 512 KiB per thread, so it stays in each core's L2 and arithmetic, not DRAM,
      bounds it (a tensor of a few KiB measures torch's dispatch overhead instead: why a small
      out-of-place op gave unreliable figures). One call takes tens of microseconds, and a
      multi-threaded call waits for its slowest thread: on a shared machine one descheduled
      thread makes that call 100x slower. So many short samples (64 samples of 8 calls), and the
      best one: a sample free of interference. Its median is kept to show how noisy it was.
    - bandwidth: copy of a `copy_mib` (256) MiB fp32 tensor (8x the largest L3 here): read + write bytes.
    Smaller `matmul_n` / `copy_mib` make a quick check (the tests), not a preset.
    """
    import torch

    torch_dtype = _torch_dtype(dtype)
    threads = torch.get_num_threads()
    with torch.no_grad():
        n = matmul_n
        a = torch.randn(n, n, dtype=torch_dtype)
        b = torch.randn(n, n, dtype=torch_dtype)
        mm = _rates(lambda: torch.mm(a, b), 2 * n ** 3, reps=1, samples=samples)
        small = torch.randn(2 ** 17 * threads)  # 512 KiB of fp32 per thread: L2-resident
        vec = _rates(lambda: small.mul_(1.0000001), small.numel(), reps=VECTOR_REPS, samples=VECTOR_SAMPLES)
        x = torch.ones(copy_mib * 2 ** 18)  # fp32: 4 bytes each (values do not matter to a copy)
        y = torch.empty_like(x)
        bw = _rates(lambda: y.copy_(x), 2 * x.numel() * x.element_size(), reps=1, samples=samples)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ms = (Measurement(f"{dtype} mm {n}x{n}x{n}", mm.best, mm.median, samples),
          Measurement(f"fp32 in-place mul, 512 KiB/thread (L2), {VECTOR_REPS} calls/sample", vec.best, vec.median,
                      VECTOR_SAMPLES),
          Measurement(f"fp32 copy of {copy_mib} MiB (read + write)", bw.best, bw.median, samples))
    return Hardware(THIS_MACHINE, mm.best, vec.best, bw.best, float(memory),
                    f"calibrated on this machine ({threads} threads, best of {samples} samples; "
                    f"median beside it): {dtype} matmul, fp32 elementwise in cache, DRAM copy", ms)


# ---- the calibrated cpu preset (`costgraph calibrate` writes it: costgraph.calibrate) ----------------

BUNDLED = Path(__file__).with_name("presets") / "cpu.json"


def user_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "costgraph" / "cpu.json"


def load_cpu(dtype: str = "bf16", path: Path | None = None) -> Hardware:
    """The `cpu` preset for `dtype`: `path`, else the user's calibration, else the bundled one."""
    for p in ([path] if path else [user_path(), BUNDLED]):
        if p is not None and p.exists():
            data = json.loads(p.read_text())
            break
    else:
        raise ValueError(f"no cpu preset: run `costgraph calibrate` (looked in {user_path()} and {BUNDLED})")
    if dtype not in data["presets"]:
        raise ValueError(f"the cpu preset has no {dtype} calibration (has {', '.join(data['presets'])})")
    rec = data["presets"][dtype]
    h = dict(rec["hardware"])
    ms = tuple(Measurement(**m) for m in h.pop("measurements", ()))
    eff_fields = {f.name for f in fields(Efficiency)}
    eff = Efficiency(**{k: v for k, v in rec["efficiency"].items() if k in eff_fields})
    h["source"] += f"; measured {data['measured']}, load average {data['load_average'][0]}"
    return Hardware(**h, measurements=ms, efficiency=eff)
