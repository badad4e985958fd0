"""Op benchmark: each backend of the fused ops against the paper code's dense eager formulation ("eager") and
torch.compile of the PyTorch reference ("compile"), measured side by side in one run (not a test), with the bytes
each op cannot avoid moving and the share of the device's copy bandwidth (measured in the same run) they achieve.

    python benchmarks/ops.py [--op graph_message_passing|relative_location_loss] [--quick] [--json FILE]
                             [--dtype fp32,bf16] [--batch 64,256] [--channels 128,256] [--logits shared,per-face]
                             [--providers eager,reference,compile,cpp,triton] [--time-budget S] [--device cuda]

Defaults: on the CPU fp32, graph_message_passing at B = 64 and 256, the loss at B = 256 (the figures of
benchmarks/RESULTS.md); on a GPU bf16 and fp32, B = 64, 256, 1024, 4096 for both ops. N = 98 (WFLW graph, 470 edges
with self loops), C = 128 and 256, shared and per-face logits, with bias. relative_location_loss: the cases of
benchmarks/ops_relative_location_loss.py (soft-wing, mean; Laplacian top-3 and all-pairs relations). Modes: forward
(building the autograd graph), backward (through a graph made once), full (forward + backward; also the call whose
peak memory is reported). On a GPU the timings use CUDA events and the table names the device. Cases run in the order
of --batch, then --dtype (so `--batch 4096,1024 --dtype bf16,fp32` measures the B=4096 bf16 targets first); with
--time-budget no new case starts after that many seconds and the table says so. --json is rewritten after every case.

Copy bandwidth ("copy_GB/s" in the header): median time of dst.copy_(src) of a --copy-mb MiB buffer, bytes read +
written per second (device-to-device on a GPU), measured before and after the cases; the larger of the two is used.

Unavoidable bytes ("MB" column, 1e6 bytes; "%copy" = MB / time / copy bandwidth). s_x is the element size of x.
graph_message_passing, F = B*N*C*s_h (one feature tensor), L = numel(logits)*s_logits ([E] shared or [B, E]),
b = C*s_bias (0 without bias):
    forward   read h_self, h_nbr, logits, bias; write out                                = 3F + L + b
    backward  read grad_out, h_self, h_nbr, logits (the softmax is recomputed);
              write grad_h_self, grad_h_nbr, grad_logits, grad_bias                      = 5F + 2L + b
    full      forward + backward (out must be written, and grad_out depends on it)      = 8F + 3L + 2b
relative_location_loss (reduction mean/sum), P = B*N*2*s_pred (one coordinate tensor):
    forward   read pred, target (the loss is a scalar)                                   = 2P
    backward  write grad_pred and read one [B, N, 2] tensor (the gradient saved by the
              fused forward, or pred or target to recompute it: at least one)            = 2P
    full      read pred, target; write grad_pred (one pass computes loss and gradient)    = 3P
The graph's index tensors (indptr, indices: < 4 KB) and the relation tables (<= 0.3 MB for all 4 753 pairs, read by
every block and served from L2) are not counted; landmark weights are not used by these cases.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (OpCase, copy_bandwidth, device_name, measure, peak_bytes, print_table,  # noqa: E402
                     write_json)

from structalign.landmarks import scheme_for  # noqa: E402
from structalign.ops import LandmarkGraph, graph_message_passing  # noqa: E402
from structalign.ops.backend import cpp_available, triton_available  # noqa: E402
from structalign.ops.reference import graph_message_passing_dense, graph_message_passing_reference  # noqa: E402

GMP = "graph_message_passing"
LOSS = "relative_location_loss"
PROVIDERS = ("eager", "reference", "compile", "cpp", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
COLUMNS = ["op", "shape", "mode", "backend", "median_ms", "p20_ms", "p80_ms", "peak_MB", "MB", "GB/s", "%copy",
           "vs_eager", "vs_compile"]
JSON_KEYS = ["op", "backend", "shape", "mode", "dtype", "batch", "channels", "layout", "median_ms", "p20_ms", "p80_ms",
             "peak_bytes", "bytes", "GBps", "pct_copy", "speedup_vs_eager", "speedup_vs_compile", "error"]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def gmp_bytes(b: int, n: int, c: int, feature_size: int, logits_numel: int, logits_size: int,
              bias_bytes: int) -> dict:
    """Unavoidable bytes of graph_message_passing per mode (the model in the module docstring)."""
    f, lg = b * n * c * feature_size, logits_numel * logits_size
    fwd, bwd = 3 * f + lg + bias_bytes, 5 * f + 2 * lg + bias_bytes
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}


def loss_bytes(b: int, n: int, pred_size: int) -> dict:
    """Unavoidable bytes of relative_location_loss (mean/sum) per mode (the model in the module docstring)."""
    p = b * n * 2 * pred_size
    return {"forward": 2 * p, "backward": 2 * p, "full": 3 * p}


def _modes(fn, inputs):
    """forward / backward / full callables of fn(*inputs) -> Tensor, with one fixed upstream gradient."""
    with torch.no_grad():
        grad_out = torch.randn_like(fn(*inputs))
    graph = {}

    def forward():
        return fn(*inputs)

    def backward():
        if "out" not in graph:
            graph["out"] = fn(*inputs)
        return torch.autograd.grad(graph["out"], inputs, grad_out, retain_graph=True)

    def full():
        return torch.autograd.grad(fn(*inputs), inputs, grad_out)

    return forward, backward, full


def available_providers(device: torch.device, op: str, wanted=PROVIDERS) -> list:
    names = [p for p in ("eager", "reference", "compile") if p in wanted]
    if "cpp" in wanted and cpp_available(device.type, op):
        names.append("cpp")
    if "triton" in wanted and triton_available(device.type):  # on the CPU only under TRITON_INTERPRET=1
        names.append("triton")
    return names


def graph_message_passing_cases(device: torch.device, batches=(64, 256), channels=(128, 256),
                                dtypes=(torch.float32,), layouts=("shared", "per-face"),
                                providers=PROVIDERS) -> list:
    """OpCases in the order batch, dtype, channels, layout, provider (each case is built lazily)."""
    graph = LandmarkGraph.from_edges(98, scheme_for(98).edges)
    indptr, indices = graph.tensors(device)
    fns = {
        "eager": lambda hs, hn, lg, bi: graph_message_passing_dense(hs, hn, lg, indptr, indices, bi),
        "reference": lambda hs, hn, lg, bi: graph_message_passing_reference(hs, hn, lg, indptr, indices, bi),
        "compile": torch.compile(lambda hs, hn, lg, bi: graph_message_passing_reference(hs, hn, lg, indptr, indices,
                                                                                        bi)),
        "cpp": lambda hs, hn, lg, bi: graph_message_passing(hs, hn, lg, graph, bi, backend="cpp"),
        "triton": lambda hs, hn, lg, bi: graph_message_passing(hs, hn, lg, graph, bi, backend="triton"),
    }
    names = available_providers(device, GMP, providers)
    cases = []
    for b in batches:
        for dtype in dtypes:
            for c in channels:
                for layout in layouts:
                    per_face = layout == "per-face"
                    shape = f"B={b} N=98 C={c} {dtype_name(dtype)} logits={layout}"
                    logits_shape = (b, graph.num_edges) if per_face else (graph.num_edges,)
                    size = torch.empty((), dtype=dtype).element_size()
                    nbytes = gmp_bytes(b, 98, c, size, (b if per_face else 1) * graph.num_edges, size, c * size)
                    meta = {"dtype": dtype_name(dtype), "batch": b, "channels": c, "layout": layout}
                    make_inputs = _gmp_inputs(b, c, logits_shape, dtype, device)
                    for name in names:
                        cases.append(_lazy_case(GMP, shape, name, fns[name], make_inputs, nbytes, meta,
                                                last=name == names[-1]))
    return cases


def _gmp_inputs(b, c, logits_shape, dtype, device):
    """A factory of the four inputs of one shape, made on first use and shared by the providers of that shape;
    make.release() drops them."""
    made = {}

    def make():
        if "inputs" not in made:
            gen = torch.Generator(device=device).manual_seed(b * 1000 + c)
            tensors = [torch.randn(b, 98, c, generator=gen, device=device),
                       torch.randn(b, 98, c, generator=gen, device=device),
                       torch.randn(logits_shape, generator=gen, device=device),
                       torch.randn(c, generator=gen, device=device)]
            made["inputs"] = [t.to(dtype).requires_grad_(True) for t in tensors]
        return made["inputs"]

    make.release = made.clear
    return make


def _lazy_case(op, shape, provider, fn, make_inputs, nbytes, meta, last=False) -> OpCase:
    """An OpCase whose inputs and autograd graph are made on first use (so a time budget costs no allocation) and
    freed by release() (the shared inputs too, by the last provider of the shape)."""
    state = {}

    def get(mode):
        def call():
            if "modes" not in state:
                state["modes"] = dict(zip(("forward", "backward", "full"), _modes(fn, make_inputs())))
            return state["modes"][mode]()
        return call

    def release():
        state.clear()
        if last:
            make_inputs.release()

    return OpCase(op, shape, provider, get("forward"), get("backward"), get("full"), nbytes, meta, release)


def relative_location_loss_cases(device: torch.device, batches=(256,), dtypes=(torch.float32,),
                                 providers=PROVIDERS) -> list:
    try:
        from ops_relative_location_loss import cases
    except ImportError as exc:
        print(f"note: relative_location_loss cases unavailable ({exc}); running graph_message_passing only")
        return []
    return cases(device, batches=batches, dtypes=dtypes,
                 providers=[p for p in available_providers(device, LOSS, providers)])


def run_case(case: OpCase, device: torch.device, reps: int, warmup: int) -> list:
    """Rows of one case (one per mode); a provider that fails gives rows with "error" set instead of timings."""
    try:
        peak = peak_bytes(case.full, device)
    except Exception as exc:  # noqa: BLE001 (a failing backend must not stop the other rows)
        return [_row(case, mode, None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                for mode in ("forward", "backward", "full")]
    rows = []
    for mode in ("forward", "backward", "full"):
        try:
            stats = measure(getattr(case, mode), device, warmup=warmup, reps=reps)
            rows.append(_row(case, mode, stats, peak, None))
        except Exception as exc:  # noqa: BLE001
            rows.append(_row(case, mode, None, peak, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"))
    return rows


def _row(case: OpCase, mode: str, stats, peak, error) -> dict:
    row = {"op": case.op, "backend": case.provider, "shape": case.shape, "mode": mode, **(case.meta or {}),
           "bytes": (case.nbytes or {}).get(mode), "error": error}
    row.update(stats or {"median_ms": None, "p20_ms": None, "p80_ms": None})
    row["peak_bytes"] = peak
    row["peak_MB"] = "-" if peak is None else peak / 2**20
    if error:
        row["median_ms"] = None
    return row


def annotate(rows: list, copy_gbps: float | None) -> None:
    """Speed-ups against eager and compile of the same op, shape and mode; GB/s and % of the copy bandwidth."""
    baseline = {(r["op"], r["shape"], r["mode"], r["backend"]): r["median_ms"] for r in rows}
    for r in rows:
        ms = r["median_ms"]
        for ref, key in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
            base = baseline.get((r["op"], r["shape"], r["mode"], ref))
            r[key] = base / ms if base and ms else None
            r["vs_" + ref] = f"{r[key]:.2f}x" if r[key] else "-"
        r["GBps"] = r["bytes"] / (ms * 1e-3) / 1e9 if ms and r.get("bytes") else None
        r["pct_copy"] = 100 * r["GBps"] / copy_gbps if r["GBps"] and copy_gbps else None
        r["MB"] = r["bytes"] / 1e6 if r.get("bytes") else "-"
        r["GB/s"] = r["GBps"] if r["GBps"] else "-"
        r["%copy"] = f"{r['pct_copy']:.1f}" if r["pct_copy"] else "-"
        if r.get("error"):
            r["median_ms"] = r["p20_ms"] = r["p80_ms"] = None
            r["vs_eager"] = "ERROR: " + r["error"][:60]


def _csv(text: str, convert=str) -> list:
    return [convert(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=[GMP, LOSS], help="run one op only")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (5 timed after 2 warm-up, not 20/3)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE (rewritten after every case)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", help="comma list of fp32, bf16, fp16, fp64 (default: fp32 on CPU, bf16,fp32 on GPU)")
    parser.add_argument("--batch", help="comma list of batch sizes B (default: 64,256 on CPU and the loss at 256; "
                                        "64,256,1024,4096 on GPU)")
    parser.add_argument("--channels", default="128,256", help="comma list of graph_message_passing channels C")
    parser.add_argument("--logits", default="shared,per-face", help="graph_message_passing logits layouts")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma list of " + ", ".join(PROVIDERS))
    parser.add_argument("--copy-mb", type=int, help="copy-bandwidth buffer in MiB (default 1024 on GPU, 64 on CPU)")
    parser.add_argument("--time-budget", type=float, help="start no new case after this many seconds")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtypes = [DTYPES[d] for d in _csv(args.dtype or ("bf16,fp32" if gpu else "fp32"))]
    gmp_batches = _csv(args.batch or ("64,256,1024,4096" if gpu else "64,256"), int)
    loss_batches = _csv(args.batch, int) if args.batch else (gmp_batches if gpu else [256])
    providers = _csv(args.providers)
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        parser.error(f"unknown providers {sorted(unknown)}")
    # One compiled reference per op; allow its recompilations (dtype, layout, shapes) without hitting the limit.
    torch._dynamo.config.recompile_limit = 64
    # "backward" replays one graph (retain_graph=True), which compiled backwards with donated buffers refuse.
    torch._functorch.config.donated_buffer = False
    torch.manual_seed(0)
    reps, warmup = (5, 2) if args.quick else (20, 3)
    copy_mb = args.copy_mb or (1024 if gpu else 64)
    start = time.perf_counter()
    copy_before = copy_bandwidth(device, copy_mb, reps=max(reps, 10), warmup=warmup)
    print(f"copy bandwidth: {copy_before['GBps']:.1f} GB/s (dst.copy_(src), {copy_mb} MiB, read + written)",
          flush=True)

    cases = []
    if args.op in (None, GMP):
        cases += graph_message_passing_cases(device, gmp_batches, _csv(args.channels, int), dtypes,
                                             _csv(args.logits), providers)
    if args.op in (None, LOSS):
        cases += relative_location_loss_cases(device, loss_batches, dtypes, providers)
    # Run order: batch (as listed), then dtype (as listed), then op; stable within.
    order = {b: i for i, b in enumerate(gmp_batches + [b for b in loss_batches if b not in gmp_batches])}
    dorder = {dtype_name(d): i for i, d in enumerate(dtypes)}
    cases.sort(key=lambda c: (order.get(c.meta["batch"], 0), dorder.get(c.meta["dtype"], 0)))  # stable

    rows, skipped = [], 0
    meta = {"copy_bandwidth": {"before": copy_before}, "reps": reps, "warmup": warmup, "complete": True,
            "argv": sys.argv[1:] if argv is None else list(argv)}
    for i, case in enumerate(cases):
        if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            skipped = len(cases) - i
            meta["complete"] = False
            meta["cases_not_run"] = skipped
            break
        rows += run_case(case, device, reps, warmup)
        if case.release is not None:
            case.release()
        annotate(rows, copy_before["GBps"])
        if args.json:
            write_json(args.json, [{k: r.get(k) for k in JSON_KEYS} for r in rows], device, **meta,
                       copy_GBps=copy_before["GBps"])
    copy_after = copy_bandwidth(device, copy_mb, reps=max(reps, 10), warmup=warmup)
    copy_gbps = max(copy_before["GBps"], copy_after["GBps"])
    meta["copy_bandwidth"]["after"] = copy_after
    annotate(rows, copy_gbps)
    print(f"device: {device_name(device)}; torch {torch.__version__}; {reps} timed runs per row; copy bandwidth "
          f"{copy_gbps:.1f} GB/s (max of {copy_before['GBps']:.1f} before and {copy_after['GBps']:.1f} after); "
          f"%copy = unavoidable MB / time / copy bandwidth")
    print_table(rows, COLUMNS)
    if skipped:
        print(f"time budget of {args.time_budget:.0f} s reached: {skipped} of {len(cases)} cases not run")
    if args.json:
        write_json(args.json, [{k: r.get(k) for k in JSON_KEYS} for r in rows], device, **meta, copy_GBps=copy_gbps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
