"""Every Triton kernel compiles for sm_80 and sm_90 exactly as Triton's JIT compiles it at run time, without a GPU.

In a subprocess without TRITON_INTERPRET, each launcher of structalign_kernels runs on CPU tensors of real shapes
(the WFLW 98-point graph and relations), through its own tile choice for a CUDA device (`_tiles(..., on_gpu=True)`),
with Triton's active driver replaced by a compile-only one. Triton's own `JITFunction.run` then specialises the
actual arguments as it does on a GPU (the CUDA backend's tt.divisibility=16 on 16-byte aligned pointers and on ints
that are multiples of 16, ints equal to 1 as constants, argument types from the tensors) and hands signature,
constants, attributes and options to `_do_compile`, which records them instead of compiling and launching. Each
distinct specialisation (Triton's own cache key) is then compiled once per arch to PTX and cubin, the way
`_do_compile` does, in parallel worker processes; a worker that crashes (an LLVM abort) names its kernel.

Sweep: graph_message_passing over C in CHANNELS x fp16 / bf16 / fp32 / fp64 x shared / per-face logits (the model's
layouts), plus bias, layout, output-mask and mixed-dtype variants; relative_location_loss over Laplacian and
all-pairs relations x criteria x reductions x weighted / unweighted x forward (with and without gradient) / backward
in float32, soft wing in float64, the training loss in fp16 / bf16 and at other batch sizes. For float64 kernels it also
checks that the TTIR never truncates to a narrower float (float64 means float64).

    python tests/test_triton_compile.py --arch 80 90     # standalone; prints a JSON summary as its last line
"""
import argparse
import collections
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time

import pytest

CHANNELS = (2, 16, 37, 64, 96, 128, 130, 192, 256, 512)
DTYPES = ("float16", "bfloat16", "float32", "float64")
ARCHS = (80, 90)
HERE = os.path.abspath(__file__)


# ---- the launches ------------------------------------------------------------------------------------------------

def graph_launches():
    """(label, launcher, args) of graph_message_passing on the WFLW graph, B = 4."""
    import torch

    from structalign.landmarks import scheme_for
    from structalign.ops.graph import LandmarkGraph
    from structalign_kernels.graph_message_passing import (graph_message_passing_backward_triton as bwd,
                                                           graph_message_passing_forward_triton as fwd)

    graph = LandmarkGraph.from_edges(98, scheme_for(98).edges)
    topo = (*graph.tensors("cpu"), *graph.transposed("cpu"))
    degrees = (graph.max_deg, graph.max_in_deg)
    b, n, e = 4, graph.num_nodes, graph.num_edges
    full = [True, True, True, True]

    def case(label, dtype, c, logits, bias=True, grad_out="model", masks=(full,), fused=False, h_dtype=None):
        h_dtype = h_dtype or dtype
        if fused:  # the two halves of one X @ [W_self | W_nbr]
            both = torch.randn(b, n, 2 * c, dtype=h_dtype)
            h_self, h_nbr = both[..., :c], both[..., c:]
        else:
            h_self, h_nbr = torch.randn(b, n, c, dtype=h_dtype), torch.randn(b, n, c, dtype=h_dtype)
        go = {"model": torch.randn(b, c, n, dtype=h_dtype).transpose(1, 2),  # GraphBlock's transpose -> BN
              "contiguous": torch.randn(b, n, c, dtype=h_dtype),
              "expanded": torch.ones((), dtype=h_dtype).expand(b, n, c)}[grad_out]
        bias_t = torch.randn(c, dtype=h_dtype) if bias else None
        yield f"gmp fwd {label}", fwd, (h_self, h_nbr, logits, *topo, bias_t, *degrees)
        for mask in masks:
            yield f"gmp bwd {label} mask={mask}", bwd, (go, h_self, h_nbr, logits, *topo, *degrees, mask)

    for name in DTYPES:
        dtype = getattr(torch, name)
        for c in CHANNELS:
            # The model: shared fp32 logits (static head), per-face logits in the features' dtype (dynamic head).
            yield from case(f"{name} C={c} shared", dtype, c, torch.randn(e))
            yield from case(f"{name} C={c} per-face", dtype, c, torch.randn(b, e, dtype=dtype))
    # At the shipped width: no bias, the halves of one X @ [W_self | W_nbr], channel-contiguous and expanded
    # grad_out (the output-mask variants with the former), logits in another dtype than the features.
    logits = torch.randn(e)
    for name in ("bfloat16", "float32"):
        dtype = getattr(torch, name)
        yield from case(f"{name} C=128 no bias", dtype, 128, logits, bias=False)
        yield from case(f"{name} C=128 fused halves", dtype, 128, logits, fused=True)
        yield from case(f"{name} C=128 grad_out expanded", dtype, 128, logits, grad_out="expanded")
    yield from case("float32 C=128 grad_out contiguous", torch.float32, 128, logits, grad_out="contiguous",
                    masks=(full, [False, True, False, False], [True, False, True, False], [False, False, False, True]))
    yield from case("float32 C=128 float64 logits", torch.float32, 128, torch.randn(b, e, dtype=torch.float64))
    yield from case("float64 C=128 float32 logits", torch.float64, 128, torch.randn(b, e))


def loss_launches():
    """(label, launcher, args) of relative_location_loss over the WFLW Laplacian and all-pairs relations."""
    import torch

    from structalign.landmarks import scheme_for
    from structalign.ops.graph import RelationSet
    from structalign_kernels.relative_location_loss import (CRITERIA, REDUCTIONS,
                                                            relative_location_loss_backward_triton as bwd,
                                                            relative_location_loss_forward_triton as fwd)

    relation_sets = {"laplacian": RelationSet.laplacian(scheme_for(98).relation_neighbors),
                     "pairs": RelationSet.pairs(98)}
    n = 98

    def cases(relations, dtype, b, criteria, weightings):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        rel = (*relations.tensors("cpu", acc), *relations.by_point("cpu", acc))
        r = relations.num_relations
        pred, target = torch.randn(b, n, 2, dtype=dtype), torch.randn(b, n, 2, dtype=dtype)
        grad_outs = {"expanded": torch.ones((), dtype=acc).expand(b, r, 2),  # the backward of loss.sum()
                     "contiguous": torch.randn(b, r, 2, dtype=acc)}
        for crit_name in criteria:
            for weighted in weightings:
                lw = torch.rand(b, n, dtype=dtype) if weighted else None
                label = f"{dtype} B={b} {crit_name} weighted={weighted}"
                params = (CRITERIA[crit_name], 2.0, 20.0, 0.5)
                for red_name, red in REDUCTIONS.items():
                    for need_grad in (True, False):
                        yield (f"loss fwd {label} {red_name} need_grad={need_grad}", fwd,
                               (pred, target, *rel, lw, *params, red, need_grad))
                for go_name, go in grad_outs.items():
                    yield f"loss bwd {label} grad_out {go_name}", bwd, (go, pred, target, *rel, lw, *params)

    for relations in relation_sets.values():
        # Every criterion x reduction x weighting x forward / backward in float32; soft wing (weighted or not) in
        # float64 and the training loss in fp16 / bf16, and at batch sizes not a multiple of 16, or 1 (a constant).
        yield from cases(relations, torch.float32, 16, CRITERIA, (False, True))
        yield from cases(relations, torch.float64, 16, ("soft_wing",), (False, True))
        for dtype in (torch.float16, torch.bfloat16):
            yield from cases(relations, dtype, 16, ("soft_wing",), (False,))
        for b in (5, 1):
            yield from cases(relations, torch.float32, b, ("soft_wing",), (False,))


# ---- recording what Triton's JIT would compile ---------------------------------------------------------------------

class CompileOnlyDriver:
    """Triton's active driver while recording: the CUDA target of one arch, no device. The arch doubles as the
    device index, so every arch gets its own JIT caches."""

    def __init__(self, arch):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def kernel_modules():
    import importlib
    import pkgutil

    import structalign_kernels

    return [importlib.import_module(f"structalign_kernels.{m.name}")
            for m in pkgutil.iter_modules(structalign_kernels.__path__)]


def record(archs, launch_sets, modules):
    """Runs every launch once per arch, the modules' kernels recorded; returns {(module, kernel, arch, key): spec}
    with the labels of the launches that need it."""
    import torch
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    specs = {}
    label = [None]

    def recorder(mod_name, fn_name):
        def _do_compile(key, signature, device, constexprs, options, attrs, warmup):
            spec = specs.setdefault((mod_name, fn_name, device, key), {
                "module": mod_name, "kernel": fn_name, "arch": device, "signature": signature,
                "constexprs": constexprs, "attrs": attrs, "options": dict(options.__dict__), "labels": []})
            spec["labels"].append(label[0])
            return None  # JITFunction.run returns without launching
        return _do_compile

    patched = []
    for mod in modules:
        for fn_name, obj in vars(mod).items():
            if isinstance(obj, JITFunction):
                obj._do_compile = recorder(mod.__name__, fn_name)
                patched.append((obj, "_do_compile", None))
        if hasattr(mod, "_tiles"):  # the launcher's tile choice for a CUDA device
            patched.append((mod, "_tiles", mod._tiles))
            mod._tiles = lambda *args, on_gpu, _tiles=mod._tiles: _tiles(*args, on_gpu=True)
    try:
        for arch in archs:
            driver.set_active(CompileOnlyDriver(arch))
            torch.manual_seed(0)
            for launches in launch_sets:
                for label[0], launcher, args in launches():
                    launcher(*args)
    finally:
        for obj, name, original in patched:
            if original is None:
                delattr(obj, name)
            else:
                setattr(obj, name, original)
    return specs


# ---- compiling -----------------------------------------------------------------------------------------------------

def compile_spec(spec):
    """Compiles one recorded specialisation as JITFunction._do_compile does; returns a result row."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    src = ASTSource(fn, spec["signature"], spec["constexprs"], spec["attrs"])
    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", spec["arch"], 32), options=spec["options"])
    row = {"cubin_bytes": len(compiled.asm["cubin"]), "ptx_entry": ".entry" in compiled.asm["ptx"],
           "seconds": round(time.perf_counter() - start, 2), **resource_usage(compiled.asm["cubin"])}
    float_ptrs = [t for t in spec["signature"].values() if t.startswith("*") and t[1:3] in ("fp", "bf")]
    if float_ptrs and all(t == "*fp64" for t in float_ptrs):
        row["fp64_truncated"] = "arith.truncf" in compiled.asm["ttir"]
    return row


def resource_usage(cubin):
    """{"regs": registers a thread, "local": local-memory bytes (spills)}, read by Triton's cuobjdump."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+).*LOCAL:(\d+)", out)
    return {"regs": int(found[1]), "local": int(found[2])} if found else {}


def compiler_messages(log_path):
    """The MLIR / LLVM diagnostics a compile printed (they go to the process's stderr, not into the exception)."""
    with open(log_path, errors="replace") as f:
        lines = [line.rstrip() for line in f if "error" in line.lower() or "LLVM ERROR" in line]
    return "\n".join(lines[:6])


def worker_main(jobs_path, indices):
    """Compiles the given jobs one by one, a JSON line each on stdout; job i's stderr goes to <jobs>.<i>.log."""
    with open(jobs_path, "rb") as f:
        specs = pickle.load(f)
    for i in indices:
        with open(f"{jobs_path}.{i}.log", "w") as log:
            sys.stderr.flush()
            os.dup2(log.fileno(), 2)
            try:
                row = compile_spec(specs[i])
            except Exception as exc:  # a compile error of this specialisation: report it, go on with the next
                row = {"error": f"{type(exc).__name__}: {str(exc)[-1000:]}\n{compiler_messages(log.name)}"}
        print(json.dumps({"job": i, **row}), flush=True)


def compile_all(specs, jobs):
    """Compiles every spec in `jobs` worker processes; a worker that dies (an LLVM abort) is restarted after the
    job it died on, which is reported with the compiler's last messages."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs_path = os.path.join(tmp, "jobs.pkl")
        with open(jobs_path, "wb") as f:
            pickle.dump(specs, f)
        # Costly kernels first, spread round-robin over the workers.
        order = sorted(range(len(specs)), key=lambda i: (specs[i]["kernel"] != "_bwd_kernel", i))
        pending = [order[w::jobs] for w in range(jobs)]
        results = {}
        while any(pending):
            procs = [(share, subprocess.Popen([sys.executable, HERE, "--worker", jobs_path,
                                               ",".join(map(str, share))], stdout=subprocess.PIPE, text=True))
                     for share in pending if share]
            pending = []
            for share, proc in procs:
                out, _ = proc.communicate()
                for line in out.splitlines():
                    if line.startswith("{"):
                        row = json.loads(line)
                        results[row.pop("job")] = row
                left = [i for i in share if i not in results]
                if left:
                    results[left[0]] = {"error": f"worker died (rc {proc.returncode}): "
                                                 f"{compiler_messages(f'{jobs_path}.{left[0]}.log')}"}
                    pending.append(left[1:])
        return [results[i] for i in range(len(specs))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rows", help="also write every specialisation's result to this JSON file")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker[0], [int(i) for i in args.worker[1].split(",")])
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: this compiles the kernels for real")
    start = time.perf_counter()
    specs = list(record(args.arch, (graph_launches, loss_launches), kernel_modules()).values())
    recorded = time.perf_counter() - start
    rows = compile_all(specs, args.jobs)
    report = {"launches": sum(len(s["labels"]) for s in specs), "compiled": len(specs),
              "record_seconds": round(recorded, 1), "total_seconds": round(time.perf_counter() - start, 1),
              "per_kernel": dict(collections.Counter(f"{s['kernel']}@sm_{s['arch']}" for s in specs)),
              "failures": []}
    for spec, row in zip(specs, rows):
        if "error" in row or row.get("fp64_truncated") or not row.get("ptx_entry"):
            report["failures"].append({"kernel": spec["kernel"], "arch": spec["arch"],
                                       "constexprs": str(spec["constexprs"]), "signature": str(spec["signature"]),
                                       "first_launch": spec["labels"][0], "launches": len(spec["labels"]), **row})
    report["max_regs"] = {k: max(r.get("regs", 0) for s, r in zip(specs, rows) if s["kernel"] == k)
                          for k in sorted({s["kernel"] for s in specs})}
    report["spilling"] = sorted({s["labels"][0] for s, r in zip(specs, rows) if r.get("local")})[:20]
    if args.rows:
        with open(args.rows, "w") as f:
            json.dump([{"kernel": s["kernel"], "arch": s["arch"], "constexprs": str(s["constexprs"]),
                        "labels": s["labels"], **r} for s, r in zip(specs, rows)], f, indent=1)
    print(json.dumps(report))
    return 1 if report["failures"] else 0


@pytest.mark.slow
def test_triton_kernels_compile_as_the_jit_specialises_them():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, HERE], capture_output=True, text=True, env=env, timeout=1800)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-4000:]
    report = json.loads(lines[-1])
    failures = report["failures"]
    assert not failures, json.dumps(failures[:3], indent=1)[:8000] + f"\n{len(failures)} failing specialisations"
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = {"_fwd_kernel", "_softmax_kernel", "_bwd_kernel", "_relative_location_loss_kernel"}
    assert {k.split("@")[0] for k in report["per_kernel"]} == expected, report["per_kernel"]


if __name__ == "__main__":
    sys.exit(main())
