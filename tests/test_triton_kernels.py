"""The Triton launchers of structalign_kernels against the plain-PyTorch reference (structalign.ops.reference).

Called directly, with the C++ ops' arguments, on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets it
where there is no GPU) and, as `gpu` tests, on CUDA tensors. The interpreter runs program instances one by one, so
the shapes keep each launch to a few dozen programs. float32 is checked at 1e-5 against the reference, float64
against the reference in float64 at 1e-10 relative to the largest value.

    python -m pytest -q tests/test_triton_kernels.py
"""
import inspect
import os
from functools import lru_cache

import pytest
import torch

from structalign.landmarks import scheme_for
from structalign.ops.graph import LandmarkGraph, RelationSet
from structalign.ops.reference import graph_message_passing_reference, relative_location_loss_reference

pytest.importorskip("triton")

import structalign_kernels.graph_message_passing as gmp_kernels  # noqa: E402
import structalign_kernels.relative_location_loss as loss_kernels  # noqa: E402
from structalign_kernels.graph_message_passing import (graph_message_passing_backward_triton,  # noqa: E402
                                                       graph_message_passing_forward_triton)
from structalign_kernels.relative_location_loss import (CRITERIA, REDUCTIONS,  # noqa: E402
                                                        relative_location_loss_backward_triton,
                                                        relative_location_loss_forward_triton)

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                 reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
FULL = [True, True, True, True]


def assert_close(actual, expected, rel, what=""):
    """|actual - expected| <= rel * max|expected| (+ a tiny floor), and the same dtype and shape."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    err = (actual.detach().double() - expected.detach().double()).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale + 1e-30, f"{what}: max error {err:.3g}, {err / max(scale, 1e-300):.3g} relative"


# ---- graph_message_passing -----------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def scheme_graph(n: int) -> LandmarkGraph:
    return LandmarkGraph.from_edges(n, scheme_for(n).edges)


def graph_args(graph, device):
    return (*graph.tensors(device), *graph.transposed(device))


def gmp_inputs(graph, b, c, dtype, device, per_face=False, logits_dtype=None, bias=True, grad_layout="model"):
    """h_self, h_nbr, logits, bias and an upstream gradient (in the model's node-contiguous layout by default)."""
    n, e = graph.num_nodes, graph.num_edges
    h_self = torch.randn(b, n, c, dtype=dtype, device=device)
    h_nbr = torch.randn(b, n, c, dtype=dtype, device=device)
    logits = torch.randn(*((b,) if per_face else ()), e, dtype=logits_dtype or dtype, device=device)
    bias_t = torch.randn(c, dtype=dtype, device=device) if bias else None
    grad_out = {"model": lambda: torch.randn(b, c, n, dtype=dtype, device=device).transpose(1, 2),
                "contiguous": lambda: torch.randn(b, n, c, dtype=dtype, device=device),
                "expanded": lambda: torch.randn((), dtype=dtype, device=device).expand(b, n, c)}[grad_layout]()
    return h_self, h_nbr, logits, bias_t, grad_out


def gmp_triton(graph, h_self, h_nbr, logits, bias, grad_out, mask=FULL):
    args = graph_args(graph, h_self.device)
    out = graph_message_passing_forward_triton(h_self, h_nbr, logits, *args, bias, graph.max_deg, graph.max_in_deg)
    grads = graph_message_passing_backward_triton(grad_out, h_self, h_nbr, logits, *args, graph.max_deg,
                                                  graph.max_in_deg, mask)
    return out, grads


def gmp_reference(graph, h_self, h_nbr, logits, bias, grad_out):
    """The reference's output and its autograd gradients of (h_self, h_nbr, logits, bias); bias grad 0 if None."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (h_self, h_nbr, logits)]
    bias_leaf = bias.detach().clone().requires_grad_(True) if bias is not None else None
    indptr, indices = graph.tensors(h_self.device)
    out = graph_message_passing_reference(*leaves, indptr, indices, bias_leaf)
    grads = torch.autograd.grad(out, leaves + ([bias_leaf] if bias is not None else []), grad_out)
    grad_bias = grads[3] if bias is not None else grad_out.sum((0, 1)).to(h_self.dtype)
    return out.detach(), (*grads[:3], grad_bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("per_face", [False, True], ids=["shared", "per_face"])
@pytest.mark.parametrize("n,c,bias,grad_layout", [(98, 37, True, "model"), (68, 130, False, "contiguous"),
                                                  (29, 5, True, "expanded")])
def test_gmp_matches_reference(device, dtype, rel, per_face, n, c, bias, grad_layout):
    graph = scheme_graph(n)
    h_self, h_nbr, logits, bias_t, grad_out = gmp_inputs(graph, 3, c, dtype, device, per_face, bias=bias,
                                                         grad_layout=grad_layout)
    out, grads = gmp_triton(graph, h_self, h_nbr, logits, bias_t, grad_out)
    ref_out, ref_grads = gmp_reference(graph, h_self, h_nbr, logits, bias_t, grad_out)
    assert_close(out, ref_out, rel, "out")
    for name, g, r in zip(("grad_h_self", "grad_h_nbr", "grad_logits", "grad_bias"), grads, ref_grads):
        assert_close(g, r, rel, name)
    if grad_layout == "model":  # the gradients take grad_out's layout: nothing was copied
        assert grads[0].stride() == grads[1].stride() == grad_out.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("h_dtype,logits_dtype,rel", [(torch.float32, torch.float64, 1e-5),
                                                      (torch.float64, torch.float32, 1e-10)])
def test_gmp_logits_in_another_dtype(device, h_dtype, logits_dtype, rel):
    """Computed in the features' accumulation dtype; grad_logits comes back in the logits' dtype."""
    graph = scheme_graph(29)
    h_self, h_nbr, logits, bias, grad_out = gmp_inputs(graph, 2, 6, h_dtype, device, per_face=True,
                                                       logits_dtype=logits_dtype)
    out, grads = gmp_triton(graph, h_self, h_nbr, logits, bias, grad_out)
    ref_out, ref_grads = gmp_reference(graph, h_self, h_nbr, logits, bias, grad_out)
    assert grads[2].dtype == logits_dtype
    assert_close(out, ref_out, rel, "out")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, rel)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)], ids=["fp16", "bf16"])
def test_gmp_low_precision_accumulates_in_fp32(device, dtype, tol):
    graph = scheme_graph(98)
    h_self, h_nbr, logits, bias, grad_out = gmp_inputs(graph, 2, 24, dtype, device, per_face=True)
    out, grads = gmp_triton(graph, h_self, h_nbr, logits, bias, grad_out)
    as_fp32 = [t.float() for t in (h_self, h_nbr, logits, bias, grad_out)]
    ref_out, ref_grads = gmp_reference(graph, *as_fp32)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_gmp_strided_features(device):
    """The two halves of one X @ [W_self | W_nbr] and a node-contiguous h_self are read in place."""
    graph = scheme_graph(68)
    b, c = 2, 11
    both = torch.randn(b, 68, 2 * c, device=device)
    h_self_t = torch.randn(b, c, 68, device=device).transpose(1, 2)
    logits = torch.randn(graph.num_edges, b, device=device).t()
    bias = torch.randn(2 * c, device=device)[::2]
    grad_out = torch.randn(b, 68, c, device=device)
    for h_self, h_nbr in ((both[..., :c], both[..., c:]), (h_self_t, both[..., c:])):
        out, grads = gmp_triton(graph, h_self, h_nbr, logits, bias, grad_out)
        ref_out, ref_grads = gmp_reference(graph, h_self, h_nbr, logits, bias, grad_out)
        assert_close(out, ref_out, 1e-5, "out")
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", [[True, False, True, False], [False, True, False, False],
                                  [False, False, True, True], [False, False, False, True]])
def test_gmp_output_mask(device, mask):
    graph = scheme_graph(29)
    h_self, h_nbr, logits, bias, grad_out = gmp_inputs(graph, 2, 7, torch.float32, device)
    _, full = gmp_triton(graph, h_self, h_nbr, logits, bias, grad_out)
    _, part = gmp_triton(graph, h_self, h_nbr, logits, bias, grad_out, mask)
    for need, p, f in zip(mask, part, full):
        if need:
            assert torch.equal(p, f)
        else:
            assert p.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_face", [False, True], ids=["shared", "per_face"])
def test_gmp_empty_batch(device, per_face):
    graph = scheme_graph(29)
    h_self, h_nbr, logits, bias, grad_out = gmp_inputs(graph, 0, 6, torch.float32, device, per_face,
                                                       grad_layout="contiguous")
    out, (g_self, g_nbr, g_logits, g_bias) = gmp_triton(graph, h_self, h_nbr, logits, bias, grad_out)
    assert out.shape == g_self.shape == g_nbr.shape == (0, 29, 6)
    assert g_logits.shape == logits.shape and not g_logits.any()
    assert g_bias.shape == (6,) and not g_bias.any()


@pytest.mark.parametrize("device", DEVICES)
def test_gmp_is_deterministic(device):
    graph = scheme_graph(98)
    inputs = gmp_inputs(graph, 3, 40, torch.float32, device)
    first, second = gmp_triton(graph, *inputs), gmp_triton(graph, *inputs)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


# ---- relative_location_loss ----------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def relation_set(kind: str, device: str = "cuda") -> RelationSet:
    """The Laplacian relations of the 98-point scheme, or all pairs of 98 points on a GPU and of 40 in the CPU
    interpreter (which runs each step of a landmark's walk over its relations in Python)."""
    if kind == "laplacian":
        return RelationSet.laplacian(scheme_for(98).relation_neighbors)
    return RelationSet.pairs(98 if device == "cuda" else 40)


def loss_triton(relations, pred, target, landmark_weight, criterion, reduction, need_grad=True,
                params=(2.0, 20.0, 0.5)):
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    rel = (*relations.tensors(pred.device, acc), *relations.by_point(pred.device, acc))
    return relative_location_loss_forward_triton(pred, target, *rel, landmark_weight, CRITERIA[criterion], *params,
                                                 REDUCTIONS[reduction], need_grad)


def loss_triton_backward(relations, grad_out, pred, target, landmark_weight, criterion, params=(2.0, 20.0, 0.5)):
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    rel = (*relations.tensors(pred.device, acc), *relations.by_point(pred.device, acc))
    return relative_location_loss_backward_triton(grad_out, pred, target, *rel, landmark_weight,
                                                  CRITERIA[criterion], *params)


def loss_reference(relations, pred, target, landmark_weight, criterion, reduction, grad_out=None,
                   params=(2.0, 20.0, 0.5)):
    """The reference loss and its autograd gradient w.r.t. pred (for grad_out, or 1 for a scalar loss)."""
    leaf = pred.detach().clone().requires_grad_(True)
    indices = relations.tensors(pred.device, torch.float64)
    loss = relative_location_loss_reference(leaf, target, *indices, landmark_weight, criterion, *params, reduction)
    (grad,) = torch.autograd.grad(loss, leaf, grad_out if grad_out is not None else torch.ones_like(loss))
    return loss.detach(), grad


def loss_inputs(b, dtype, device, weighted, points: int = 98):
    pred = 4 * torch.randn(b, points, 2, dtype=dtype, device=device)  # residuals on both sides of omega1 = 2
    target = 4 * torch.randn(b, points, 2, dtype=dtype, device=device)
    pred[0, :3] = target[0, :3]  # some residuals exactly 0 (the criteria's derivative there is 0)
    lw = torch.rand(b, points, dtype=dtype, device=device) if weighted else None
    return pred, target, lw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ["laplacian", "pairs"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_loss_matches_reference(device, dtype, rel, kind, weighted):
    relations = relation_set(kind, device)
    pred, target, lw = loss_inputs(3, dtype, device, weighted, relations.num_points)
    for criterion in CRITERIA:
        for reduction in REDUCTIONS:
            loss, grad = loss_triton(relations, pred, target, lw, criterion, reduction)
            what = f"{criterion} {reduction}"
            if reduction == "none":
                grad_out = torch.randn(loss.shape, dtype=dtype, device=device)
                ref_loss, ref_grad = loss_reference(relations, pred, target, lw, criterion, reduction, grad_out)
                assert grad.shape == (0,)
                grad = loss_triton_backward(relations, grad_out, pred, target, lw, criterion)
            else:
                ref_loss, ref_grad = loss_reference(relations, pred, target, lw, criterion, reduction)
            assert_close(loss, ref_loss, rel, f"loss {what}")
            assert_close(grad, ref_grad, rel, f"grad {what}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
def test_loss_backward_of_none_with_expanded_grad_out(device, dtype, rel):
    """loss.sum() and loss.mean() hand the backward an expanded grad_out (strides 0)."""
    relations = relation_set("laplacian")
    pred, target, lw = loss_inputs(5, dtype, device, True)
    for scale in (1.0, 1.0 / (5 * relations.num_relations * 2)):
        grad_out = torch.full((), scale, dtype=dtype, device=device).expand(5, relations.num_relations, 2)
        grad = loss_triton_backward(relations, grad_out, pred, target, lw, "soft_wing")
        _, ref_grad = loss_reference(relations, pred, target, lw, "soft_wing", "none", grad_out)
        assert_close(grad, ref_grad, rel)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_soft_wing_constants_are_float64(device):
    """Non-default soft-wing constants that float32 cannot hold: float64 inputs get float64 constants."""
    relations = relation_set("laplacian")
    pred, target, _ = loss_inputs(2, torch.float64, device, False)
    params = (1.1, 10.3, 0.7)
    for reduction in ("sum", "none"):
        loss, _ = loss_triton(relations, pred, target, None, "soft_wing", reduction, params=params)
        ref_loss, _ = loss_reference(relations, pred, target, None, "soft_wing", reduction, params=params)
        assert_close(loss, ref_loss, 1e-13, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_loss_low_precision_computes_in_fp32(device, dtype):
    relations = relation_set("laplacian")
    pred, target, lw = loss_inputs(2, dtype, device, True)
    loss, grad = loss_triton(relations, pred, target, lw, "soft_wing", "mean")
    ref_loss, ref_grad = loss_reference(relations, pred.float(), target.float(), lw.float(), "soft_wing", "mean")
    assert loss.dtype == grad.dtype == torch.float32
    assert_close(loss, ref_loss, 1e-5)
    assert_close(grad, ref_grad, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
def test_loss_without_gradient_and_empty_batch(device, reduction):
    relations = relation_set("laplacian")
    pred, target, _ = loss_inputs(2, torch.float32, device, False)
    loss, grad = loss_triton(relations, pred, target, None, "l1", reduction, need_grad=False)
    ref_loss, _ = loss_reference(relations, pred, target, None, "l1", reduction)
    assert grad.shape == (0,)
    assert_close(loss, ref_loss, 1e-5)
    empty = pred[:0]
    loss, grad = loss_triton(relations, empty, empty, None, "soft_wing", reduction)
    assert loss.shape == ((0, relations.num_relations, 2) if reduction == "none" else ())
    assert not loss.any() and grad.shape == ((0,) if reduction == "none" else (0, 98, 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["laplacian", "pairs"])
def test_loss_gradient_is_bitwise_reproducible(device, kind):
    """Gradients are fixed-order gathers (no atomics): two runs agree to the bit, on several programs."""
    relations = relation_set(kind, device)
    b = 70 if device == "cuda" else 40
    pred, target, lw = loss_inputs(b, torch.float32, device, True, relations.num_points)
    first = loss_triton(relations, pred, target, lw, "soft_wing", "mean")
    second = loss_triton(relations, pred, target, lw, "soft_wing", "mean")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    grad_out = torch.randn(b, relations.num_relations, 2, device=device)
    first = loss_triton_backward(relations, grad_out, pred, target, lw, "mse")
    assert torch.equal(first, loss_triton_backward(relations, grad_out, pred, target, lw, "mse"))


def test_no_atomics_in_the_kernels():
    for module in (gmp_kernels, loss_kernels):
        assert "tl.atomic" not in inspect.getsource(module), module.__name__


# ---- launch conditions ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_tensors_device():
    """Tensors on the last GPU while the current device is cuda:0: the kernels run where the tensors are."""
    device = f"cuda:{torch.cuda.device_count() - 1}"
    graph = scheme_graph(29)
    inputs = gmp_inputs(graph, 2, 8, torch.float32, device)
    out, grads = gmp_triton(graph, *inputs)
    ref_out, ref_grads = gmp_reference(graph, *inputs)
    assert_close(out, ref_out, 1e-5)
    relations = relation_set("laplacian")
    pred, target, lw = loss_inputs(3, torch.float32, device, True)
    loss, grad = loss_triton(relations, pred, target, lw, "soft_wing", "mean")
    ref_loss, ref_grad = loss_reference(relations, pred, target, lw, "soft_wing", "mean")
    assert_close(loss, ref_loss, 1e-5)
    assert_close(grad, ref_grad, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_launchers_run_for_shapes_under_fake_tensors(device):
    """A triton_op's body is its own fake kernel: under FakeTensorMode the launchers return outputs of the real
    ones' shapes, dtypes and strides (on the interpreter the launch is skipped, see structalign_kernels.launch)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph = scheme_graph(29)
    relations = relation_set("laplacian")
    acc = torch.float32
    gmp_real = gmp_inputs(graph, 2, 6, torch.float32, device, per_face=True)
    loss_real = (*loss_inputs(3, torch.float32, device, True), *relations.tensors(device, acc),
                 *relations.by_point(device, acc))

    def run(hs, hn, lg, bias, go, topo, pred, target, lw, *rel):
        out = graph_message_passing_forward_triton(hs, hn, lg, *topo, bias, graph.max_deg, graph.max_in_deg)
        grads = graph_message_passing_backward_triton(go, hs, hn, lg, *topo, graph.max_deg, graph.max_in_deg, FULL)
        loss = relative_location_loss_forward_triton(pred, target, *rel[:4], *rel[4:], lw, 0, 2.0, 20.0, 0.5, 0,
                                                     True)
        return [out, *grads, *loss]

    real = run(*gmp_real, graph_args(graph, device), *loss_real)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(t) for t in (*gmp_real, *graph_args(graph, device), *loss_real)]
        fake = run(*fake_args[:5], fake_args[5:10], *fake_args[10:])
    for r, f in zip(real, fake):
        assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride())


def test_gpu_tiles_fit_the_register_budget():
    """The GPU tile choice (what the compile test compiles) vs the interpreter's larger tiles."""
    for c in (2, 37, 128, 512):
        gpu = gmp_kernels._tiles(98, c, False, on_gpu=True)
        assert gpu["fwd"][0] * gpu["fwd"][1] <= 2048 and gpu["fwd"][1] <= 128
        assert gpu["bwd"][0] * gpu["bwd"][1] <= 2048 and gpu["bwd"][1] >= c
        assert gmp_kernels._tiles(98, c, False, on_gpu=False)["bwd"][0] >= gpu["bwd"][0]
    assert gmp_kernels._tiles(98, 128, True, on_gpu=True)["bwd"][:2] == (8, 128)
    assert loss_kernels._tiles(4096, 98, on_gpu=True) == (4, 128)
