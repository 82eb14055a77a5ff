"""Where and how a model runs: device, threads, precision, compile, and the peak FLOP/s for MFU (`gptlab bench peak`).

Every "auto" here is decided by what the machine can actually do, not by what
it is called: bf16 autocast on a CPU only pays where the CPU has native bf16
matrix instructions (AVX-512-BF16 or AMX); elsewhere PyTorch emulates it and a
bf16 step is several times *slower* than fp32.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from gptlab.errors import GptlabError
from gptlab.files import atomic_write_json


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# train.compile=auto compiles a run expected to train for longer than this (seconds). Measured with
# benchmarks/train_throughput.py at the 4M shape on 2 AMD EPYC cores with AVX-512-BF16 (2026-12-03): a first
# compile costs 10-45 s (cached on disk afterwards); in bf16 it makes a step 1.25-1.37x faster (fused
# norms/RoPE/GELU and the written-out attention of model/gpt.py), in fp32 1.03-1.08x (AVX2 machines, where fp32
# is the precision picked, measured 1.03-1.25x): it pays back after ~1-5 min of eager training. On a GPU it is
# 1.5-2x for about a minute of compiling.
COMPILE_MIN_SECONDS = {"cpu": 300.0, "cuda": 120.0, "mps": float("inf")}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[name]:
        raise GptlabError(f"train.device={name} is not available on this machine", "use train.device=auto")
    return torch.device(name)


def set_threads(threads: int) -> int:
    """Use `threads` intra-op threads (0 = every core this process may run on); returns the count."""
    n = threads or cpu_count()
    torch.set_num_threads(n)
    return n


# glibc's malloc hands large freed blocks back to the kernel (munmap, or trimming the heap's top), so the next
# step's tensors land on fresh pages, each zeroed by a page fault: a 4M-shape bf16 step faulted in ~38,000 pages
# (150 MB) a step, and keeping freed memory made the same compiled step 1.14-1.19x faster, 0 faults a step
# (2 AVX-512-BF16 cores, 2026-12-04; benchmarks/SPEEDRUN.md). Blocks up to glibc's 32 MiB limit then come from
# the heap and stay there; larger ones are still mapped and unmapped each time.
KEEP_FREED_BELOW = 32 << 20  # M_MMAP_THRESHOLD: glibc's maximum
KEEP_FREED_UP_TO = 1 << 30  # M_TRIM_THRESHOLD: free heap memory above this goes back to the kernel
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_freed_memory(device: torch.device | str = "cpu") -> bool:
    """For a run on a CPU: make glibc's malloc keep freed memory for the next step instead of returning it;
    process-wide, for good.

    A training process reuses the same sizes every step, so its resident memory stays at the peak it reached
    anyway; what changes is that the pages are not faulted in again. False (nothing done) for another device,
    whose tensors are not the C library's, and where the C library is not glibc (macOS, musl).
    """
    return torch.device(device).type == "cpu" and _keep_freed_glibc_memory()


@functools.cache
def _keep_freed_glibc_memory() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BELOW) and libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_UP_TO))


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True where the CPU runs bf16 matmuls natively (oneDNN's own check for AVX-512-BF16/AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: measure instead
        return _matmul_flops(torch.device("cpu"), torch.bfloat16, 256) > _matmul_flops(torch.device("cpu"), torch.float32, 256)


def pick_precision(requested: str, device: torch.device) -> str:
    """Resolve train.precision=auto: bf16 where the hardware runs it natively, fp16 on older GPUs, else fp32."""
    if requested == "fp16" and device.type != "cuda":
        raise GptlabError(f"train.precision=fp16 needs a CUDA GPU (this run is on {device.type})", "use bf16 or fp32")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"  # MPS autocast is still partial; emulated bf16 on a CPU is slower than fp32


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def can_compile(device: torch.device) -> bool:
    """torch.compile needs Triton on a GPU and a C++ compiler on a CPU; MPS and Windows are not worth the risk."""
    if device.type == "mps" or sys.platform == "win32":
        return False
    if device.type == "cpu":
        return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    return True


def pick_compile(requested, device: torch.device, planned_seconds: float | None) -> bool:
    """Resolve train.compile=auto: compile only runs expected to train long enough to earn back the warm-up.

    planned_seconds: the run's expected training time (None: unknown, e.g. no limit at all: a long run).
    """
    if requested != "auto":
        if requested and not can_compile(device):
            raise GptlabError(f"train.compile=true cannot work here (no C++ compiler or unsupported {device.type})",
                              "install a C++ compiler (g++) or set train.compile=false")
        return bool(requested)
    return can_compile(device) and (planned_seconds is None or planned_seconds >= COMPILE_MIN_SECONDS[device.type])


# --------------------------------------------------------------------------- peak FLOP/s (MFU)

# Dense bf16/fp16 tensor-core peaks from the datasheets (SXM parts): on a GPU, MFU is conventionally quoted
# against these (nanoGPT, PaLM); everything else -- fp32 anywhere, every CPU -- is measured here.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                  "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}

# Square matmul sizes measured; the best of them is the peak. Small sizes show where a CPU runs out of
# work per thread; large ones reach the kernel's steady speed.
PEAK_SIZES = {"cpu": (256, 512, 1024, 2048), "cuda": (2048, 4096, 8192)}


def peak_memory(device: torch.device) -> int:
    """Bytes this process has held at most: on a GPU the tensors' peak (max_memory_allocated), elsewhere the
    resident set's high-water mark (the whole process's, since it started)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS counts bytes, Linux KiB


def free_memory(device: torch.device | str = "cpu") -> int:
    """Bytes a new training process can use now: a GPU's free memory, or the machine's available RAM
    (MemAvailable: free plus what the kernel can reclaim)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str | int | float, what: str = "memory") -> int:
    """'8GB', '2 GiB', '512MB', '1.5g', 4e9 -> bytes (GB = 10^9, GiB = 2^30; a bare number is bytes)."""
    import re

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise GptlabError(f"{what} {text!r} is not an amount of memory", "write it like 8GB, 2GiB or 512MB")
        value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise GptlabError(f"{what} {text!r} is not a positive amount of memory", "write it like 8GB, 2GiB or 512MB")
    return int(value * _UNITS[unit])


def cache_dir() -> Path:
    """Where gptlab keeps per-machine measurements: $GPTLAB_CACHE_DIR, else ~/.cache/gptlab."""
    return Path(os.environ.get("GPTLAB_CACHE_DIR") or Path.home() / ".cache" / "gptlab")


@functools.cache
def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_features() -> dict[str, bool]:
    """The instruction sets that decide CPU matmul speed, as PyTorch itself detects them."""
    checks = {"AVX2": "_is_avx2_supported", "AVX512": "_is_avx512_supported", "AVX512_VNNI": "_is_vnni_supported",
              "AVX512_BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported", "AMX_FP16": "_is_amx_fp16_supported"}
    return {name: bool(getattr(torch.cpu, fn, lambda: False)()) for name, fn in checks.items()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()})"
    return device.type


def _matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.2) -> float:
    """FLOP/s of an n x n x n matmul: repeated for `seconds` after one untimed warm-up."""
    # A generator of its own: measuring (e.g. a run's peak with a cold cache) must not move the global RNG,
    # which a resumed run has just restored for its dropout masks.
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: first-call allocation and kernel selection are not the steady speed
    sync()
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or reps < 1:
        a @ b
        reps += 1
        sync()
    return 2 * n**3 * reps / elapsed


def measure_matmul(device: torch.device, dtype: torch.dtype, seconds: float = 1.0,
                   sizes: tuple[int, ...] | None = None) -> dict[int, float]:
    """{size: FLOP/s} for square matmuls, `seconds` shared between the sizes.

    A size whose single matmul would take longer than its share (bf16 emulated on an AVX2 CPU runs at
    ~1 GFLOP/s: one 2048^3 product is 15 s) is skipped rather than allowed to stall the caller.
    """
    sizes = sizes or PEAK_SIZES.get(device.type, PEAK_SIZES["cpu"])
    share = seconds / len(sizes)
    results: dict[int, float] = {}
    for n in sorted(sizes):
        if results and 2 * n**3 / max(results.values()) > share:
            break
        results[n] = _matmul_flops(device, dtype, n, share)
    return results


def _cache_key(device: torch.device, dtype: torch.dtype) -> str:
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return f"{device_name(device)}|{str(dtype).removeprefix('torch.')}|threads={threads}"


def read_peak_cache() -> dict:
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads((cache_dir() / "peak.json").read_text())
        if isinstance(cached, dict):
            return cached
    return {}  # missing or unreadable: measure again (the file is only a cache)


def store_peak(device: torch.device, dtype: torch.dtype, flops: float, sizes: dict[int, float]) -> float:
    """Cache a measured peak; returns the peak now cached: the higher of this and any earlier measurement,
    since other work on the machine only ever slows a measurement down."""
    cache = read_peak_cache()
    key = _cache_key(device, dtype)
    if cache.get(key, {}).get("flops", 0) >= flops:
        return float(cache[key]["flops"])
    cache[key] = {"flops": flops, "sizes": {str(n): f for n, f in sizes.items()},
                  "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with contextlib.suppress(OSError):  # a read-only home must not stop training
        atomic_write_json(cache_dir() / "peak.json", cache)
    return flops


def datasheet_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type == "cuda" and dtype != torch.float32:
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    return None


def peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s that MFU is measured against.

    A known GPU's datasheet figure in bf16/fp16; otherwise the best dense matmul
    that `gptlab bench peak` measured on this device, dtype and thread count,
    cached in cache_dir()/peak.json -- measured now (~`seconds`) if it is not
    there yet. train.peak_flops overrides it.
    """
    if (flops := datasheet_flops(device, dtype)) is not None:
        return flops
    cached = read_peak_cache().get(_cache_key(device, dtype))
    if cached and cached.get("flops", 0) > 0:
        return float(cached["flops"])
    sizes = measure_matmul(device, dtype, seconds)
    return store_peak(device, dtype, max(sizes.values()), sizes)


# --------------------------------------------------------------------------- gptlab bench peak

def peak(device: torch.device, seconds: float = 6.0, threads: int = 0) -> dict:
    """Measure fp32, bf16 and fp16 matmuls on `device` (`seconds` in all) and cache each dtype's best.

    The cache keeps the best measurement ever made for the device, dtype and
    thread count; it is what the trainer's MFU uses (mfu_peak_flops here).
    """
    threads = set_threads(threads) if device.type == "cpu" else 0
    rows, best, cached = [], {}, {}
    for name, dtype in DTYPES.items():
        try:
            sizes = measure_matmul(device, dtype, seconds / len(DTYPES))
        except RuntimeError:  # a dtype this device has no matmul for
            continue
        for n, flops in sizes.items():
            rows.append({"dtype": name, "size": n, "flops": flops})
        best[name] = max(sizes.values())
        cached[name] = store_peak(device, dtype, best[name], sizes)
    mfu_peak = {name: datasheet_flops(device, DTYPES[name]) or cached[name] for name in best}
    return {
        "device": device.type, "device_name": device_name(device), "threads": threads, "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_features": cpu_features(),
        "matmul": rows, "peak_flops": best, "mfu_peak_flops": mfu_peak, "cache": str(cache_dir() / "peak.json"),
    }


def format_peak(result: dict) -> str:
    features = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in result["cpu_features"].items())
    lines = [f"device {result['device_name']}, {result['threads'] or '-'} threads, torch {result['torch']}",
             f"cpu capability {result['cpu_capability']} ({features})", "",
             f"{'dtype':6} {'size':>6} {'GFLOP/s':>10} {'TFLOP/s':>8}"]
    for row in result["matmul"]:
        best = row["flops"] == result["peak_flops"][row["dtype"]]
        lines.append(f"{row['dtype']:6} {row['size']:6} {row['flops'] / 1e9:10.1f} {row['flops'] / 1e12:8.3f}"
                     + ("  <- peak" if best else ""))
    lines.append("")
    for name, flops in result["mfu_peak_flops"].items():
        measured = result["peak_flops"][name]
        source = ("measured now" if flops == measured else "datasheet" if result["device"] == "cuda"
                  else f"the best measured so far; {measured / 1e9:,.2f} this time")
        lines.append(f"MFU peak {name}: {flops / 1e9:,.1f} GFLOP/s ({source})")
    lines.append(f"cached in {result['cache']} (train runs on this device use it for MFU)")
    return "\n".join(lines)
