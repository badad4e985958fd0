"""Timing and memory harness shared by the benchmarks (not tests: nothing here asserts on time).

`measure(fn, device)` runs fn with warm-up and returns the median and p20/p80 in milliseconds, timed with CUDA events
on a GPU (synchronised) and time.perf_counter on the CPU; `peak_bytes(fn, device)` is the peak memory one call adds
(CUDA allocator statistics on a GPU; on the CPU, the peak of a tracking allocator hook via torch.profiler).
`copy_bandwidth(device)` measures the device's copy bandwidth (dst.copy_(src) of a large buffer, bytes read + written
per second), the yardstick of the memory-bound ops. `print_table` prints rows as an aligned table; `write_json` stores
them with the device and versions.
"""
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class OpCase:
    """One op x shape x provider of benchmarks/ops.py.

    provider: "eager" (the paper code's dense formulation), "reference", "compile" (torch.compile of the reference),
    "cpp" or "triton". forward(): one forward building the autograd graph as training does; backward(): one backward
    through a graph made once beforehand (retain_graph); full(): forward + backward, also the call measured for peak
    memory. nbytes: the bytes the op cannot avoid moving, per mode ({"forward": ..., "backward": ..., "full": ...});
    meta: fields copied into every row (dtype, batch, channels, layout). release(): frees what the case holds (its
    inputs, the graph kept for "backward") once its rows are measured.
    """

    op: str
    shape: str
    provider: str
    forward: Callable[[], object]
    backward: Callable[[], object]
    full: Callable[[], object]
    nbytes: dict | None = None
    meta: dict | None = None
    release: Callable[[], None] | None = None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _quantile(values, q):
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def measure(fn, device: torch.device, warmup: int = 3, reps: int = 20, min_time_s: float = 0.0) -> dict:
    """Median, p20 and p80 of fn()'s wall time in ms (at least `reps` runs, and at least `min_time_s` seconds); on the
    CPU also "cpu_ms", the median CPU time of this process per call (all its threads: for a one-thread call, its cost
    without the waits that other processes' load adds to the wall time)."""
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time_s:
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(begin.elapsed_time(end))
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
    result = {"median_ms": statistics.median(times), "p20_ms": _quantile(times, 0.2), "p80_ms": _quantile(times, 0.8)}
    if cpu:
        result["cpu_ms"] = statistics.median(cpu)
    return result


def peak_bytes(fn, device: torch.device) -> int:
    """Peak memory allocated during one fn() call beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Replay the allocation events in order to find the high-water mark of live bytes.
    # Self usage only: an op's cpu_memory_usage also counts its children's allocations (nested ops would count twice).
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def copy_bandwidth(device: torch.device, mbytes: int = 512, reps: int = 20, warmup: int = 5) -> dict:
    """Copy bandwidth of `device`: median time of dst.copy_(src) over a float32 buffer of `mbytes` MiB, and
    bytes moved (read + written) per second. On a GPU this is device-to-device, timed with CUDA events."""
    n = mbytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    stats = measure(lambda: dst.copy_(src), device, warmup=warmup, reps=reps)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"bytes": moved, "buffer_MiB": mbytes, **stats, "GBps": moved / (stats["median_ms"] * 1e-3) / 1e9}


def print_table(rows: list, columns: list) -> None:
    """Print dict rows as an aligned text table over the given columns."""
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_json(path: str, rows: list, device: torch.device, **extra) -> None:
    """{"meta": {device, torch, timestamp, **extra}, "rows": rows}, written atomically (readable at any time)."""
    meta = {"device": device_name(device), "torch": torch.__version__, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(tmp, path)
