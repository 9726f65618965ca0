"""Where to compute: the device a command runs on, whether bf16 pays there, and bf16 autocast (never fp16)."""
import functools
import math
import time
from pathlib import Path

import torch

from cli import UserError


def pick_device(name="auto"):
    """`auto` picks cuda, then mps, then cpu; an unavailable explicit choice is a UserError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps requested but MPS is not available")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {name!r} (choose auto, cpu, cuda or mps)")
    return torch.device(name)


def native_bf16(device):
    """Whether bf16 pays on `device`: CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX on which a bf16 matmul
    measures at least 1.3x faster than fp32 (`cpu_bf16_speedup`). The flags alone are not enough (seen: a 2-core Xeon
    with AVX512-BF16 ran bf16 matmuls and convolutions at half its fp32 speed); without them bf16 is emulated and far
    slower (seen: a 3x3 convolution 130x slower on an AVX2-only CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) and cpu_bf16_speedup() >= 1.3


def cpu_flags():
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(size=512, repeats=15):
    """fp32 time / bf16 time of a size x size matmul on one thread of this CPU, best of `repeats` each, the two
    interleaved (~0.15 s once per process). One thread and short interleaved runs keep the ratio steady on a busy
    machine: with two threads beside a training run, the best of 3 runs of a 1024 matmul read 0.76 to 3.2 on a CPU
    whose bf16 is half as fast (0.50 to 0.58 this way). The 1.3x margin in native_bf16 adds to that stability."""
    generator = torch.Generator().manual_seed(0)  # its own: the global RNG a training run seeded stays untouched
    matrices = {dtype: [torch.randn(size, size, generator=generator).to(dtype) for _ in range(2)]
                for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(matrices, math.inf)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for round_ in range(repeats + 1):
            for dtype, (a, b) in matrices.items():
                start = time.perf_counter()
                a @ b
                if round_:  # round 0 warms up (kernel selection, caches)
                    best[dtype] = min(best[dtype], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32] / best[torch.bfloat16]


def autocast(device, enabled=True):
    """bf16 autocast where it pays (CPU with bf16, CUDA); a no-op context elsewhere.
    fp16 compute is never used: it is very slow on CPUs."""
    if not enabled or device.type not in ("cpu", "cuda"):
        return torch.autocast(device_type="cpu", enabled=False)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
