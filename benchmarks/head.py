"""L-GRN head benchmark: forward + backward of the whole head (10 graph convolutions, 256 -> 128 -> 2,
WFLW graph), side by side in one run, as milliseconds and as the share of time that is not matrix products.

    flock /tmp/structalign-cpu.lock env MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \
        .venv/bin/python benchmarks/head.py --batches 64,256,1024 --json benchmarks/results/head_cpu_2026-11-29.json
    python3 benchmarks/head.py --device cuda --dtype bf16 --batches 1024,4096 --providers fused,unfused,gemm
        (on a GPU: tools/gpu_check.py's head_bench step)

Providers (same weights, training mode, one backward from the sum of the outputs):
  fused    LGRNHead(fused=True) on the cpp backend: one GEMM with [W_self | W_nbr] and one graph_conv op per layer
  unfused  LGRNHead(fused=False) on the cpp backend: two matmuls, graph_message_passing, BatchNorm, ReLU, residual
  compile  torch.compile of `unfused` (inductor; compile time bounded by --compile-timeout, reported if exceeded)
  dense    the authors' head: two x @ W per layer, -9e15-filled N x N softmax, two batched matmuls, BatchNorm, ReLU,
           residual (structalign.ops.reference.graph_message_passing_dense in every layer)
  gemm     the floor: the head's matrix products alone, with the fused layer's shapes (x @ W_cat and its two
           backward products per layer) and with the unfused layer's shapes (two of each); the smaller is the floor
non_gemm_share = 1 - floor / provider time. --dtype bf16 runs the heads under bf16 autocast and the floor's products
in bf16. Nothing here asserts on time.
"""
import argparse
import os
import signal
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name, measure, print_table, write_json  # noqa: E402

from structalign.landmarks import WFLW98  # noqa: E402
from structalign.models import LGRNHead, message_graph  # noqa: E402
from structalign.models.lgrn import GraphBlock  # noqa: E402
from structalign.ops.graph_conv import batch_norm_args  # noqa: E402
from structalign.ops.reference import graph_conv_reference, graph_message_passing_dense  # noqa: E402

NODE_FEATURES, WIDTH, BLOCKS = 256, 128, 4
PROVIDERS = ("gemm", "fused", "unfused", "compile", "dense")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_heads(device) -> dict:
    """provider -> head module (or a callable head for `dense`), all with the weights of one seeded head."""
    graph = message_graph(WFLW98)
    torch.manual_seed(0)
    fused = LGRNHead(NODE_FEATURES, graph, WIDTH, BLOCKS, op_backend="cpp", fused=True).to(device).train()
    unfused = LGRNHead(NODE_FEATURES, graph, WIDTH, BLOCKS, op_backend="cpp", fused=False).to(device).train()
    unfused.load_state_dict(fused.state_dict())
    reference = LGRNHead(NODE_FEATURES, graph, WIDTH, BLOCKS, op_backend="reference", fused=False).to(device).train()
    reference.load_state_dict(fused.state_dict())
    return {"fused": fused, "unfused": unfused, "compile": torch.compile(unfused, dynamic=False),
            "dense": dense_head(reference)}


def dense_head(head: LGRNHead):
    """The head's layers in the authors' dense formulation (same parameters and BatchNorm modules as `head`)."""
    indptr, indices = head.graph.tensors(next(head.parameters()).device)

    def block(module: GraphBlock, x, residual=None):
        conv = module.conv
        return graph_conv_reference(x, conv.weight, conv.edge_logits, indptr, indices, conv.bias,
                                    batch_norm_args(module.bn), relu=True, residual=residual,
                                    aggregate=graph_message_passing_dense)

    def forward(nodes):
        x = block(head.input, nodes)
        for res in head.blocks:
            x = block(res.second, block(res.first, x), residual=x)
        out = head.output
        return graph_conv_reference(x, out.weight, out.edge_logits, indptr, indices, out.bias,
                                    aggregate=graph_message_passing_dense)

    forward.parameters = head.parameters
    return forward


def gemm_floor(head: LGRNHead, batch: int, device, split: bool, dtype: torch.dtype):
    """A callable running the head's matrix products alone (forward and backward shapes) on fixed tensors. The
    output layer's products stay in fp32, as the head runs that layer outside autocast."""
    rows = batch * head.graph.num_nodes
    shapes = [(c.in_features, c.out_features) for c in head.graph_convs()]
    gen = torch.Generator(device="cpu").manual_seed(1)
    tensors = []
    for k, (f, c) in enumerate(shapes):
        parts = 2 if split else 1
        width = c if split else 2 * c
        dt = dtype if k < len(shapes) - 1 else torch.float32
        tensors.append(tuple(torch.randn(*shape, generator=gen).to(device, dt)
                             for shape in ((rows, f), (f, width), (rows, width))) + (parts,))

    def run():
        for x, w, g, parts in tensors:
            for _ in range(parts):
                torch.mm(x, w)          # h = x @ W
                torch.mm(g, w.t())      # grad x
                torch.mm(x.t(), g)      # grad W
    return run


class CompileTimeout(Exception):
    pass


def first_call_within(fn, seconds: float) -> str | None:
    """Runs fn once (compiling it); None, or why it did not finish within `seconds`."""
    fired = []

    def alarm(signum, frame):
        fired.append(True)
        raise CompileTimeout

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        fn()
    except Exception:
        if not fired:  # a real failure, not the time limit (inductor wraps the alarm's exception in its own)
            raise
        return f"compile not finished within {seconds:.0f} s on {torch.get_num_threads()} threads"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return None


def step_fn(head, nodes, dtype: torch.dtype):
    params = list(head.parameters())
    autocast = torch.autocast(nodes.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        for p in params:
            p.grad = None
        nodes.grad = None
        with autocast:
            out = head(nodes)
        out.sum().backward()
    return step


def interleaved(calls: dict, device, reps: int, warmup: int) -> dict:
    """name -> {median_ms, p20_ms, p80_ms}: the calls run in turn, rep after rep (each timed by harness.measure), so
    a load change on a shared machine hits all of them alike."""
    samples = {name: [] for name in calls}
    for rep in range(warmup + reps):
        for name, fn in calls.items():
            t = measure(fn, device, warmup=0, reps=1)["median_ms"]
            if rep >= warmup:
                samples[name].append(t)
    def quintiles(v):
        return statistics.quantiles(v, n=5, method="inclusive") if len(v) > 1 else [v[0]] * 4

    return {name: {"median_ms": statistics.median(v), "p20_ms": quintiles(v)[0], "p80_ms": quintiles(v)[3]}
            for name, v in samples.items()}


def bench_batch(heads: dict, batch: int, device, dtype: torch.dtype, providers: list, reps: int, warmup: int,
                compile_timeout: float) -> list:
    nodes = torch.randn(batch, 98, NODE_FEATURES, device=device, requires_grad=True)
    outputs = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for name in ("fused", "unfused", "dense"):
            if name in providers:
                outputs[name] = heads[name](nodes).float()
    calls = {"gemm ([W_self|W_nbr])": gemm_floor(heads["fused"], batch, device, False, dtype),
             "gemm (W_self, W_nbr)": gemm_floor(heads["fused"], batch, device, True, dtype)}
    rows, notes = [], {}
    for name in [p for p in PROVIDERS if p in providers and p != "gemm"]:
        step = step_fn(heads[name], nodes, dtype)
        if name == "compile":
            t0 = time.perf_counter()
            problem = first_call_within(step, compile_timeout)
            if problem:
                rows.append({"batch": batch, "provider": name, "note": problem})
                continue
            notes[name] = f"compiled in {time.perf_counter() - t0:.0f} s"
        calls[name] = step
    times = interleaved(calls, device, reps, warmup)
    floor = min(times["gemm ([W_self|W_nbr])"]["median_ms"], times["gemm (W_self, W_nbr)"]["median_ms"])
    for name, stats in times.items():
        row = {"batch": batch, "provider": name, **stats, "note": notes.get(name, "")}
        if not name.startswith("gemm"):
            row["non_gemm_share"] = 1 - floor / stats["median_ms"]
            if name in outputs and "unfused" in outputs:
                row["max_abs_diff_vs_unfused"] = (outputs[name] - outputs["unfused"]).abs().max().item()
        rows.append(row)
    by = {r["provider"]: r for r in rows if "median_ms" in r}
    for r in rows:
        if "non_gemm_share" in r:
            for base in ("unfused", "dense"):
                if base in by:
                    r[f"vs_{base}"] = by[base]["median_ms"] / r["median_ms"]
        r["dtype"] = str(dtype).replace("torch.", "")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="intra-op CPU threads (default: torch's choice)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="bf16: the heads under autocast")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma list of " + ", ".join(PROVIDERS))
    parser.add_argument("--compile-timeout", type=float, default=600.0, help="seconds allowed for one compile")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    providers = args.providers.split(",")
    if set(providers) - set(PROVIDERS) or "gemm" not in providers:
        parser.error(f"--providers: a comma list of {', '.join(PROVIDERS)} including gemm (the floor)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"device: {device_name(device)}; torch {torch.__version__}; {args.dtype}")
    heads = make_heads(device)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        rows += bench_batch(heads, batch, device, DTYPES[args.dtype], providers, args.reps, args.warmup,
                            args.compile_timeout)
    print_table(rows, ["batch", "dtype", "provider", "median_ms", "p20_ms", "p80_ms", "non_gemm_share", "vs_unfused",
                       "vs_dense", "max_abs_diff_vs_unfused", "note"])
    if args.json:
        write_json(args.json, rows, device)


if __name__ == "__main__":
    main()
