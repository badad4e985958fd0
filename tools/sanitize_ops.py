"""A small case of every fused op, forward and backward, for compute-sanitizer (memcheck, racecheck) to watch.

    compute-sanitizer --tool memcheck python3 tools/sanitize_ops.py [--device cuda] [--backend cpp,triton] [--quick]
    TRITON_INTERPRET=1 python3 tools/sanitize_ops.py --device cpu   # the same calls on CPU (gpu_check.py --dry-run)

Runs the fused ops through their public functions with each chosen backend ("cpp" reaches torch.ops.structalign.*,
"triton" the kernels of kernels/*.py) on small tensors: graph_message_passing on the WFLW graph and on a graph with
one 40-neighbour row, C = 37 and 130 (partial channel tiles), shared and per-face logits, with and without bias,
fp32 / bf16 / fp16 / fp64 and mixed feature/logit dtypes; graph_conv (the layer the model runs) on the same graphs,
F = 24, C = 37 and 130, without normalisation, with batch statistics (+ relu + residual) and with running statistics
(+ relu), shared and per-face logits, fp32 / bf16 / fp16 / fp64; relative_location_loss on the Laplacian and
all-pairs relations of 98 points and on 3 000 random pairs of 4 000 points (the path beyond shared memory), every
criterion and reduction, with and without landmark weights, fp32 / bf16 / fp64. Every output and gradient is checked
to be finite. Prints one line per op and backend and a final "sanitize-driver: OK, N calls" (or FAILED); exit 0 on
success, 1 on a failed call, 2 when no chosen backend can run on the device ("SKIPPED"; a backend that cannot run
beside one that can is reported on its own line, e.g. the cpp backend where no CUDA kernels were built).
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402


def _graphs():
    from structalign.landmarks import scheme_for
    from structalign.ops import LandmarkGraph

    star = [(0, j) for j in range(1, 40)] + [(i, i + 1) for i in range(1, 39)]
    return {"wflw98": LandmarkGraph.from_edges(98, scheme_for(98).edges), "star40": LandmarkGraph.from_edges(40, star)}


def _relations():
    from structalign.landmarks import scheme_for
    from structalign.ops import RelationSet

    gen = torch.Generator().manual_seed(1)
    first = torch.randint(0, 4000, (3000,), generator=gen)
    second = (first + torch.randint(1, 4000, (3000,), generator=gen)) % 4000  # never the first
    return {
        "laplacian98": RelationSet.laplacian(scheme_for(98).relation_neighbors),
        "pairs98": RelationSet.pairs(98),
        "wide4000": RelationSet.pairs(4000, torch.stack([first, second], dim=1)),
    }


def _finite(*tensors) -> None:
    for t in tensors:
        if t is not None and t.numel() and not torch.isfinite(t.float()).all():
            raise AssertionError("non-finite value in an output or gradient")


def graph_message_passing_calls(device, backend, quick=False):
    from structalign.ops import graph_message_passing

    gen = torch.Generator().manual_seed(0)
    dtypes = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
              (torch.float64, torch.float64), (torch.float64, torch.float32), (torch.float32, torch.float64)]
    if quick:
        dtypes = dtypes[:2]
    for gname, graph in _graphs().items():
        for feat, logit in dtypes:
            for c in ((130,) if quick else (37, 130)):
                for per_face, with_bias in ((False, True), (True, False)):
                    if (feat, logit) != (torch.float32, torch.float32) and c == 37 and gname == "star40":
                        continue  # keep the sanitizer run short: every dtype on the WFLW graph, both C on star40
                    b, n, e = 2, graph.num_nodes, graph.num_edges

                    def make(*shape, dtype):
                        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

                    h_self, h_nbr = make(b, n, c, dtype=feat), make(b, n, c, dtype=feat)
                    logits = make(*((b, e) if per_face else (e,)), dtype=logit)
                    bias = make(c, dtype=feat) if with_bias else None
                    label = (f"graph_message_passing {gname} C={c} {str(feat)[6:]}/{str(logit)[6:]} "
                             f"{'per-face' if per_face else 'shared'}{' +bias' if with_bias else ''}")

                    def call(h_self=h_self, h_nbr=h_nbr, logits=logits, bias=bias):
                        out = graph_message_passing(h_self, h_nbr, logits, graph, bias, backend=backend)
                        inputs = [t for t in (h_self, h_nbr, logits, bias) if t is not None]
                        grads = torch.autograd.grad(out, inputs, torch.randn_like(out))
                        _finite(out, *grads)

                    yield label, call


def graph_conv_calls(device, backend, quick=False):
    from structalign.ops import BatchNormArgs, graph_conv

    gen = torch.Generator().manual_seed(2)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64][:2 if quick else 4]
    norms = (("none", False, False), ("batch", True, True), ("given", True, False))  # (norm, relu, residual)
    for gname, graph in _graphs().items():
        for dtype in dtypes:
            for c in ((130,) if quick else (37, 130)):
                for (norm, relu, with_residual), per_face in zip(norms, (False, True, False)):
                    if dtype != torch.float32 and gname == "star40":
                        continue  # keep the sanitizer run short: every dtype on the WFLW graph, fp32 on star40
                    b, n, e, f = 2, graph.num_nodes, graph.num_edges, 24

                    def make(*shape, scale=1.0, shift=0.0, grad=True):
                        t = (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)
                        return t.requires_grad_(grad)

                    leaves = {"x": make(b, n, f), "weight": make(2, f, c, scale=f ** -0.5),
                              "logits": make(*((b, e) if per_face else (e,))), "bias": make(c)}
                    if with_residual:
                        leaves["residual"] = make(b, n, c)
                    if norm != "none":
                        leaves.update(bn_weight=make(c, scale=0.3, shift=1.0), bn_bias=make(c, scale=0.3))
                    stats = (make(c, scale=0.1, grad=False), make(c, scale=0.1, shift=1.0, grad=False).abs())
                    label = (f"graph_conv {gname} C={c} {str(dtype)[6:]} {'per-face' if per_face else 'shared'} "
                             f"norm={norm}{' +relu' if relu else ''}{' +residual' if with_residual else ''}")

                    def call(leaves=leaves, stats=stats, norm=norm, relu=relu):
                        bn = None if norm == "none" else BatchNormArgs(*stats, leaves["bn_weight"], leaves["bn_bias"],
                                                                         norm == "batch", 0.1, 1e-5)
                        out = graph_conv(leaves["x"], leaves["weight"], leaves["logits"], graph, leaves["bias"], bn,
                                         relu, leaves.get("residual"), backend=backend)
                        grads = torch.autograd.grad(out, list(leaves.values()), torch.randn_like(out))
                        _finite(out, *grads, *stats)

                    yield label, call


def relative_location_loss_calls(device, backend, quick=False):
    from structalign.ops import relative_location_loss

    gen = torch.Generator().manual_seed(0)
    for rname, rel in _relations().items():
        n = rel.num_points
        for dtype in ((torch.float32,) if quick else (torch.float32, torch.bfloat16, torch.float64)):
            target = (torch.rand(2, n, 2, generator=gen) * 64).to(device=device, dtype=dtype)
            pred = target + (torch.randn(2, n, 2, generator=gen) * 2).to(device=device, dtype=dtype)
            weight = torch.rand(2, n, generator=gen).to(device=device, dtype=dtype)
            combos = [(c, r, w) for c in ("soft_wing", "l1", "mse") for r in ("mean", "sum", "none")
                      for w in (None, weight)]
            if dtype != torch.float32 or rname == "wide4000" or quick:
                combos = [("soft_wing", "mean", None), ("soft_wing", "none", weight), ("mse", "sum", weight)]
            for criterion, reduction, w in combos:
                label = (f"relative_location_loss {rname} {str(dtype)[6:]} {criterion} {reduction}"
                         f"{' weighted' if w is not None else ''}")

                def call(pred=pred, target=target, w=w, criterion=criterion, reduction=reduction):
                    x = pred.detach().clone().requires_grad_()
                    loss = relative_location_loss(x, target, rel, w, criterion=criterion, reduction=reduction,
                                                  backend=backend)
                    loss.backward(torch.randn_like(loss))
                    _finite(loss, x.grad)

                yield label, call


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="cpp", help="comma list of cpp, triton, reference, auto (default cpp)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer cases (fp32 and bf16, C = 130, three loss settings): for the slower racecheck")
    parser.add_argument("--verbose", action="store_true", help="print every call")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    from structalign.ops.backend import resolve_backend

    ops = (("graph_message_passing", graph_message_passing_calls), ("graph_conv", graph_conv_calls),
           ("relative_location_loss", relative_location_loss_calls))
    backends = []
    for backend in args.backend.split(","):
        try:
            for op, _ in ops:
                resolve_backend(backend, device, op)  # raises, naming why, if the backend cannot run op on device
            backends.append(backend)
        except (RuntimeError, ValueError) as exc:
            print(f"sanitize-driver: SKIPPED backend {backend}: {exc}", flush=True)
    if not backends:
        print(f"sanitize-driver: SKIPPED, no backend of {args.backend} can run on {device.type}")
        return 2
    start = time.perf_counter()
    calls = failed = 0
    for backend in backends:
        for op, generate in ops:
            op_calls = op_failed = 0
            for label, call in generate(device, backend, args.quick):
                op_calls += 1
                try:
                    call()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if args.verbose:
                        print(f"  ok    {backend} {label}", flush=True)
                except Exception as exc:  # noqa: BLE001 (report every failing case, then fail)
                    op_failed += 1
                    print(f"  FAIL  {backend} {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                          flush=True)
            print(f"sanitize-driver: {op} ({backend}): {op_calls} forward+backward calls, {op_failed} failed",
                  flush=True)
            calls, failed = calls + op_calls, failed + op_failed
    verdict = "OK" if not failed else f"FAILED ({failed} calls)"
    print(f"sanitize-driver: {verdict}, {calls} calls on {device.type} with backends {','.join(backends)} "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
