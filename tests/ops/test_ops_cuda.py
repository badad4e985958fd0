"""The fused ops on a GPU: every CUDA backend against the reference (fp32 / fp16 / bf16) and against float64 oracles,
the shipped widths, bitwise-deterministic gradients, CUDA-graph capture, torch.compile seeing the Triton kernels,
and tensors on a second GPU. All tests are `gpu`-marked (skipped without CUDA) and need nothing beyond torch and
pytest, so `make gpu-check` runs them on a bare GPU machine.

    python -m pytest -q -m gpu tests/ops/test_ops_cuda.py
"""
import pytest
import torch

from structalign.landmarks import scheme_for
from structalign.ops import LandmarkGraph, RelationSet, graph_message_passing, relative_location_loss
from structalign.ops.reference import CRITERIA, REDUCTIONS, graph_message_passing_reference

pytestmark = pytest.mark.gpu
FUSED = ["cpp", "triton"]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def wflw_graph() -> LandmarkGraph:
    return LandmarkGraph.from_edges(98, scheme_for(98).edges)


def gmp_inputs(graph, b, c, per_face, dtype, device="cuda"):
    """h_self, h_nbr (Tensor[b, N, c]), logits (Tensor[E] or Tensor[b, E], fp32) and bias (Tensor[c])."""
    def make(*shape, dt=dtype):
        return torch.randn(*shape, dtype=dt, device=device).requires_grad_(True)

    e = graph.num_edges
    return make(b, graph.num_nodes, c), make(b, graph.num_nodes, c), make(*((b, e) if per_face else (e,)),
                                                                         dt=torch.float32), make(c)


def gmp_run(backend, graph, inputs, grad_out):
    h_self, h_nbr, logits, bias = inputs
    if backend == "reference":
        indptr, indices = graph.tensors(h_self.device)
        out = graph_message_passing_reference(h_self, h_nbr, logits, indptr, indices, bias)
    else:
        out = graph_message_passing(h_self, h_nbr, logits, graph, bias, backend=backend)
    return out, torch.autograd.grad(out, inputs, grad_out)


def as_float(inputs, dtype=torch.float32):
    return [t.detach().to(dtype).requires_grad_(True) for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("c", [37, 128, 130, 256])
@pytest.mark.parametrize("backend", FUSED)
def test_graph_message_passing_matches_reference(backend, c, dtype):
    graph = wflw_graph()
    for per_face in (False, True):
        inputs = gmp_inputs(graph, 5, c, per_face, dtype)
        grad_out = torch.randn(5, 98, c, dtype=dtype, device="cuda")
        out, grads = gmp_run(backend, graph, inputs, grad_out)
        ref_out, ref_grads = gmp_run("reference", graph, as_float(inputs), grad_out.float())
        tol = TOL[dtype]
        torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
        for k, (g, r) in enumerate(zip(grads, ref_grads)):
            assert g.dtype == inputs[k].dtype
            torch.testing.assert_close(g.float(), r, atol=tol, rtol=tol, msg=lambda m: f"grad[{k}]: {m}")


@pytest.mark.parametrize("backend", FUSED)
def test_graph_message_passing_float64_on_gpu_is_float64(backend):
    """Against the reference run in float64 on the CPU (the CPU tests check that one against an oracle)."""
    graph = wflw_graph()
    inputs = gmp_inputs(graph, 3, 130, True, torch.float64)
    grad_out = torch.randn(3, 98, 130, dtype=torch.float64, device="cuda")
    out, grads = gmp_run(backend, graph, inputs, grad_out)
    cpu_inputs = [t.detach().cpu().double().requires_grad_(True) for t in inputs]
    ref_out, ref_grads = gmp_run("reference", graph, cpu_inputs, grad_out.cpu())
    torch.testing.assert_close(out.cpu(), ref_out, atol=1e-12, rtol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.cpu().double(), r, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", FUSED)
def test_graph_message_passing_is_deterministic(backend):
    graph = wflw_graph()
    inputs = gmp_inputs(graph, 64, 128, True, torch.bfloat16)
    grad_out = torch.randn(64, 98, 128, dtype=torch.bfloat16, device="cuda")
    first = gmp_run(backend, graph, inputs, grad_out)
    second = gmp_run(backend, graph, inputs, grad_out)
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_graph_capture_cpp():
    graph = wflw_graph()
    h_self, h_nbr, logits, bias = gmp_inputs(graph, 4, 64, True, torch.float32)
    step = torch.compile(lambda *a: graph_message_passing(*a[:3], graph, a[3], backend="cpp"),
                         mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            out = step(h_self, h_nbr, logits, bias)
        ref = graph_message_passing_reference(h_self, h_nbr, logits, *graph.tensors("cuda"), bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_torch_compile_sees_the_triton_kernels():
    """triton_op: inductor compiles the user kernels into its own code (fullgraph), forward and backward."""
    graph = wflw_graph()
    inputs = gmp_inputs(graph, 8, 128, True, torch.float32)
    grad_out = torch.randn(8, 98, 128, device="cuda")
    fn = torch.compile(lambda hs, hn, lg, bi: graph_message_passing(hs, hn, lg, graph, bi, backend="triton"),
                       fullgraph=True)
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_out, ref_grads = gmp_run("reference", graph, as_float(inputs), grad_out)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@needs_two_gpus
@pytest.mark.parametrize("backend", FUSED)
def test_second_gpu_runs_on_its_own_device(backend):
    """Tensors on cuda:1 while the current device is cuda:0 launch on cuda:1 and give the right result."""
    graph = wflw_graph()
    inputs = gmp_inputs(graph, 2, 64, True, torch.float32, device="cuda:1")
    grad_out = torch.randn(2, 98, 64, device="cuda:1")
    with torch.cuda.device(0):
        out, grads = gmp_run(backend, graph, inputs, grad_out)
    ref_out, _ = gmp_run("reference", graph, as_float(inputs), grad_out)
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)


@needs_two_gpus
@pytest.mark.parametrize("backend", FUSED)
def test_two_gpus_are_a_clear_error(backend):
    graph = wflw_graph()
    h_self, h_nbr, logits, bias = gmp_inputs(graph, 2, 8, False, torch.float32)
    with pytest.raises(ValueError, match="h_nbr is on cuda:1 but h_self is on cuda:0"):
        graph_message_passing(h_self, h_nbr.detach().to("cuda:1"), logits, graph, bias, backend=backend)


# ---- relative_location_loss -----------------------------------------------------------------------------------------

def relations(kind: str) -> RelationSet:
    if kind == "lap98":
        return RelationSet.laplacian(scheme_for(98).relation_neighbors)
    if kind == "pairs98":
        return RelationSet.pairs(98)
    gen = torch.Generator().manual_seed(1)  # "wide": 4000 landmarks, beyond any per-face shared-memory staging
    first = torch.randint(0, 4000, (3000,), generator=gen)
    second = (first + torch.randint(1, 4000, (3000,), generator=gen)) % 4000
    return RelationSet.pairs(4000, torch.stack([first, second], dim=1))


def loss_inputs(b, n, dtype):
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(b, n, 2, generator=gen, dtype=torch.float64) * 256
    pred = target + torch.randn(b, n, 2, generator=gen, dtype=torch.float64) * 3
    weight = torch.rand(b, n, generator=gen, dtype=torch.float64) + 0.5
    return pred.to(dtype).cuda(), target.to(dtype).cuda(), weight.float().cuda()


def loss_and_grad(pred, target, rel, weight, criterion, reduction, backend):
    x = pred.detach().clone().requires_grad_()
    loss = relative_location_loss(x, target, rel, weight, criterion, reduction=reduction, backend=backend)
    ramp = torch.linspace(-1.0, 2.0, max(loss.numel(), 1), dtype=loss.dtype, device=loss.device)
    (g,) = torch.autograd.grad(loss, x, ramp[: loss.numel()].view_as(loss))
    return loss.detach(), g


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["lap98", "pairs98", "wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_relative_location_loss_matches_reference(backend, kind, dtype):
    rel = relations(kind)
    pred, target, weight = loss_inputs(5, rel.num_points, dtype)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    for criterion in CRITERIA:
        for reduction in REDUCTIONS:
            for w in (None, weight):
                loss, grad = loss_and_grad(pred, target, rel, w, criterion, reduction, backend)
                ref_loss, ref_grad = loss_and_grad(pred, target, rel, w, criterion, reduction, "reference")
                assert loss.dtype == ref_loss.dtype == dtype
                torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=rtol * 1e-2)
                torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_relative_location_loss_gradients_are_bitwise_identical(backend, reduction):
    rel = relations("pairs98")
    pred, target, weight = loss_inputs(256, 98, torch.float32)
    runs = [loss_and_grad(pred, target, rel, weight, "soft_wing", reduction, backend) for _ in range(3)]
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


@pytest.mark.parametrize("backend", FUSED)
def test_relative_location_loss_cuda_graphs(backend):
    rel = relations("lap98")
    pred, target, weight = loss_inputs(8, 98, torch.float32)
    compiled = torch.compile(lambda p, t, w: relative_location_loss(p, t, rel, w, backend=backend),
                             mode="reduce-overhead", fullgraph=True)
    ref_loss, ref_grad = loss_and_grad(pred, target, rel, weight, "soft_wing", "mean", "reference")
    for _ in range(3):  # the later calls replay the captured graph
        x = pred.clone().requires_grad_()
        loss = compiled(x, target, weight)
        loss.backward(torch.full_like(loss, -1.0))  # the ramp of one element
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, ref_grad, rtol=1e-4, atol=1e-6)
