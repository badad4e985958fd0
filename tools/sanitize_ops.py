"""A small case of every fused op, forward and backward, for compute-sanitizer (memcheck, racecheck) to watch.

    compute-sanitizer --tool memcheck python3 tools/sanitize_ops.py [--device cuda] [--backend cpp] [--quick]
    python3 tools/sanitize_ops.py --device cpu          # the same calls on CPU tensors (gpu_check.py --dry-run)

Runs structalign.ops.graph_message_passing and relative_location_loss through their public functions with the
chosen backend (which reach torch.ops.structalign.* for "cpp") on small tensors: graph_message_passing on the WFLW
graph and on a graph with one 40-neighbour row, C = 37 and 130 (partial channel tiles), shared and per-face logits,
with and without bias, fp32 / bf16 / fp16 / fp64 and mixed feature/logit dtypes; relative_location_loss on the
Laplacian and all-pairs relations of 98 points and on 3 000 random pairs of 4 000 points (the path beyond shared
memory), every criterion and reduction, with and without landmark weights, fp32 / bf16 / fp64. Every output and
gradient is checked to be finite. Prints one line per op and a final "sanitize-driver: OK, N calls" (or FAILED);
exit 0 on success, 1 on a failed call, 2 when the backend cannot run on the device (e.g. no CUDA kernels built).
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
    parser.add_argument("--backend", default="cpp", choices=["cpp", "triton", "reference", "auto"])
    parser.add_argument("--quick", action="store_true",
                        help="fewer cases (fp32 and bf16, C = 130, three loss settings): for the slower racecheck")
    parser.add_argument("--verbose", action="store_true", help="print every call")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    from structalign.ops.backend import cpp_available, extension_error

    if args.backend == "cpp":
        missing = [op for op in ("graph_message_passing", "relative_location_loss")
                   if not cpp_available(device.type, op)]
        if missing:
            why = extension_error() or f"structalign._C has no {device.type.upper()} kernels"
            print(f"sanitize-driver: SKIPPED, backend cpp cannot run {missing} on {device.type}: {why}")
            return 2
    start = time.perf_counter()
    calls = failed = 0
    for op, generate in (("graph_message_passing", graph_message_passing_calls),
                         ("relative_location_loss", relative_location_loss_calls)):
        op_calls = op_failed = 0
        for label, call in generate(device, args.backend, args.quick):
            op_calls += 1
            try:
                call()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if args.verbose:
                    print(f"  ok    {label}", flush=True)
            except Exception as exc:  # noqa: BLE001 (report every failing case, then fail)
                op_failed += 1
                print(f"  FAIL  {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
        print(f"sanitize-driver: {op}: {op_calls} forward+backward calls, {op_failed} failed", flush=True)
        calls, failed = calls + op_calls, failed + op_failed
    verdict = "OK" if not failed else f"FAILED ({failed} calls)"
    print(f"sanitize-driver: {verdict}, {calls} calls on {device.type} with backend {args.backend} "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
