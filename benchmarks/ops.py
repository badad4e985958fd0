"""Op benchmark: each backend of the fused ops against the paper code's dense eager formulation ("eager") and
torch.compile of the PyTorch reference ("compile"), measured side by side in one run (not a test).

    python benchmarks/ops.py [--op graph_message_passing|relative_location_loss] [--quick] [--json FILE]

graph_message_passing: B = 64 and 256, N = 98 (WFLW graph), C = 128 and 256, shared and per-face logits, with bias.
relative_location_loss: the cases of benchmarks/ops_relative_location_loss.py. Modes: forward (building the
autograd graph), backward (through a graph made once), full (forward + backward; also the call whose peak memory is
reported). On a GPU the timings use CUDA events and the table names the device.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import OpCase, device_name, measure, peak_bytes, print_table, write_json  # noqa: E402

from structalign.landmarks import scheme_for  # noqa: E402
from structalign.ops import LandmarkGraph, graph_message_passing  # noqa: E402
from structalign.ops.backend import cpp_available, triton_available  # noqa: E402
from structalign.ops.reference import graph_message_passing_dense, graph_message_passing_reference  # noqa: E402

GMP = "graph_message_passing"
COLUMNS = ["op", "shape", "mode", "backend", "median_ms", "p20_ms", "p80_ms", "peak_MB", "vs_eager", "vs_compile"]


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


def graph_message_passing_cases(device: torch.device) -> list:
    graph = LandmarkGraph.from_edges(98, scheme_for(98).edges)
    indptr, indices = graph.tensors(device)
    providers = {
        "eager": lambda hs, hn, lg, bi: graph_message_passing_dense(hs, hn, lg, indptr, indices, bi),
        "reference": lambda hs, hn, lg, bi: graph_message_passing_reference(hs, hn, lg, indptr, indices, bi),
        "compile": torch.compile(lambda hs, hn, lg, bi: graph_message_passing_reference(hs, hn, lg, indptr, indices,
                                                                                        bi)),
    }
    if cpp_available(device.type, GMP):
        providers["cpp"] = lambda hs, hn, lg, bi: graph_message_passing(hs, hn, lg, graph, bi, backend="cpp")
    if device.type == "cuda" and triton_available("cuda"):
        providers["triton"] = lambda hs, hn, lg, bi: graph_message_passing(hs, hn, lg, graph, bi, backend="triton")
    cases = []
    for b in (64, 256):
        for c in (128, 256):
            for per_face in (False, True):
                shape = f"B={b} N=98 C={c} logits={'per-face' if per_face else 'shared'}"
                logits_shape = (b, graph.num_edges) if per_face else (graph.num_edges,)
                inputs = [torch.randn(b, 98, c, device=device), torch.randn(b, 98, c, device=device),
                          torch.randn(logits_shape, device=device), torch.randn(c, device=device)]
                inputs = [t.requires_grad_(True) for t in inputs]
                for name, fn in providers.items():
                    cases.append(OpCase(GMP, shape, name, *_modes(fn, inputs)))
    return cases


def relative_location_loss_cases(device: torch.device) -> list:
    try:
        from ops_relative_location_loss import cases
    except ImportError as exc:
        print(f"note: relative_location_loss cases unavailable ({exc}); running graph_message_passing only")
        return []
    return cases(device)


def run(cases: list, device: torch.device, reps: int, warmup: int) -> list:
    rows = []
    for case in cases:
        peak = peak_bytes(case.full, device)
        for mode in ("forward", "backward", "full"):
            stats = measure(getattr(case, mode), device, warmup=warmup, reps=reps)
            rows.append({"op": case.op, "backend": case.provider, "shape": case.shape, "mode": mode, **stats,
                         "peak_bytes": peak, "peak_MB": peak / 2**20})
    baseline = {(r["op"], r["shape"], r["mode"], r["backend"]): r["median_ms"] for r in rows}
    for r in rows:
        for ref, key in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
            base = baseline.get((r["op"], r["shape"], r["mode"], ref))
            r[key] = base / r["median_ms"] if base else None
            r["vs_" + ref] = f"{r[key]:.2f}x" if base else "-"
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=[GMP, "relative_location_loss"], help="run one op only")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    # One compiled reference per shape and logits layout; allow them all without hitting the recompile limit.
    torch._dynamo.config.recompile_limit = 64
    # "backward" replays one graph (retain_graph=True), which compiled backwards with donated buffers refuse.
    torch._functorch.config.donated_buffer = False
    torch.manual_seed(0)
    cases = []
    if args.op in (None, GMP):
        cases += graph_message_passing_cases(device)
    if args.op in (None, "relative_location_loss"):
        cases += relative_location_loss_cases(device)
    reps, warmup = (5, 2) if args.quick else (20, 3)
    rows = run(cases, device, reps, warmup)
    print(f"device: {device_name(device)}; torch {torch.__version__}; {reps} timed runs per row")
    print_table(rows, COLUMNS)
    if args.json:
        keys = ["op", "backend", "shape", "mode", "median_ms", "p20_ms", "p80_ms", "peak_bytes", "speedup_vs_eager",
                "speedup_vs_compile"]
        write_json(args.json, [{k: r[k] for k in keys} for r in rows], device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
