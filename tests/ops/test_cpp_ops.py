"""The C++ ops' CPU kernels, called directly through torch.ops.structalign, against float64 formulas.

    python -m pytest -q tests/ops/test_cpp_ops.py

The formulas here are written from the definitions (dense N x N softmax, dense relation matrix), independently of
structalign/ops/reference.py; gradients come from autograd over them in float64. float64 inputs must match to 1e-10
relative; float64 features with float32 logits compute in float64 too. The helpers are shared with
tests/ops/test_cpp_cuda_emulation.py, which runs the CUDA kernels in a CPU emulation against the same formulas.
"""

import pytest
import torch

from structalign.landmarks import scheme_for
from structalign.ops.backend import cpp_available
from structalign.ops.graph import LandmarkGraph, RelationSet
from structalign.ops import reference
from structalign.ops.reference import graph_message_passing_reference, relative_location_loss_reference

from float64_formulas import WING, gmp_formula, rll_formula  # noqa: F401  (also used by test_cpp_cuda_emulation)

needs_cpp = pytest.mark.skipif(not cpp_available("cpu", "graph_message_passing"),
                               reason="structalign._C (CPU) is not built")
CRITERIA = {name: code for code, name in enumerate(reference.CRITERIA)}  # the ops' integer codes
REDUCTIONS = {name: code for code, name in enumerate(reference.REDUCTIONS)}


# ---- graph / relation tensors as the ops take them -------------------------------------------------------------------

def scheme_graph(n):
    """(indptr, indices, in_ptr, in_edges, edge_row, max_deg, max_in_deg) of a scheme's graph, as the ops take them."""
    g = LandmarkGraph.from_edges(n, scheme_for(n).edges)
    return (*g.tensors(), *g.transposed(), g.max_deg, g.max_in_deg)


def relation_args(relations, dtype):
    """(anchor, indptr, member, weight, point_ptr, point_rel, point_coef) with the weights in `dtype`."""
    return (*relations.tensors(dtype=dtype), *relations.by_point(dtype=dtype))


def laplacian_args(n, dtype):
    """The paper's relations for N landmarks, with the member weights 1/k (float64) rounded to `dtype`."""
    return relation_args(RelationSet.laplacian(scheme_for(n).relation_neighbors), dtype)


def pairs_args(n, dtype):
    return relation_args(RelationSet.pairs(n), dtype)


# ---- float64 formulas ------------------------------------------------------------------------------------------------

def gmp_formula_grads(h_self, h_nbr, logits, indptr, indices, bias, grad_out):
    """(out, grad h_self, grad h_nbr, grad logits, grad bias) of the formula, all float64."""
    leaves = [t.detach().double().requires_grad_() for t in (h_self, h_nbr, logits)]
    b = None if bias is None else bias.detach().double().requires_grad_()
    out = gmp_formula(*leaves, indptr, indices, b)
    grads = torch.autograd.grad(out, leaves + ([b] if b is not None else []), grad_out.double())
    return (out.detach(), *grads) + ((None,) if b is None else ())


def assert_close64(actual, expected, rel=1e-10, what=""):
    """|actual - expected| <= rel * max|expected| elementwise (float64 agreement at `rel` relative)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    scale = max(expected.abs().max().item(), 1e-300) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale, msg=lambda m: f"{what}: {m}")


# ---- graph_message_passing -------------------------------------------------------------------------------------------

ops = torch.ops.structalign


def gmp(h_self, h_nbr, logits, g, bias=None):
    return ops.graph_message_passing(h_self, h_nbr, logits, *g[:5], bias, *g[5:])


def gmp_backward(grad_out, h_self, h_nbr, logits, g, mask=(True, True, True, True)):
    return ops.graph_message_passing_backward(grad_out, h_self, h_nbr, logits, *g, list(mask))


@needs_cpp
@pytest.mark.parametrize("n,b,c,per_face,with_bias", [(29, 2, 37, False, True), (98, 3, 16, True, False),
                                                      (68, 1, 5, True, True)])
@pytest.mark.parametrize("logits_dtype", [torch.float64, torch.float32])
def test_gmp_float64_matches_formula(n, b, c, per_face, with_bias, logits_dtype):
    g = scheme_graph(n)
    e = g[1].numel()
    h_self, h_nbr = torch.randn(b, n, c, dtype=torch.float64), torch.randn(b, n, c, dtype=torch.float64)
    logits = torch.randn(*((b, e) if per_face else (e,)), dtype=logits_dtype) * 2
    bias = torch.randn(c, dtype=torch.float64) if with_bias else None
    grad_out = torch.randn(b, n, c, dtype=torch.float64)
    ref = gmp_formula_grads(h_self, h_nbr, logits, g[0], g[1], bias, grad_out)
    out = gmp(h_self, h_nbr, logits, g, bias)
    gh, gn, gl, gb = gmp_backward(grad_out, h_self, h_nbr, logits, g, (True, True, True, with_bias))
    assert_close64(out, ref[0], what="out")
    assert_close64(gh, ref[1], what="grad h_self")
    assert_close64(gn, ref[2], what="grad h_nbr")
    assert gl.dtype == logits_dtype and gl.shape == logits.shape
    assert_close64(gl.double(), ref[3], rel=1e-10 if logits_dtype == torch.float64 else 1e-6, what="grad logits")
    if with_bias:
        assert_close64(gb, ref[4], what="grad bias")
    else:
        assert gb.shape == (0,)


@needs_cpp
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_gmp_low_precision_and_float64_logits(dtype, tol):
    """Features below float64 compute in float32 (float64 logits are cast); grad logits keep the logits' dtype."""
    g = scheme_graph(98)
    b, n, c, e = 2, 98, 24, g[1].numel()
    h_self, h_nbr = torch.randn(b, n, c).to(dtype), torch.randn(b, n, c).to(dtype)
    logits, bias, grad_out = torch.randn(b, e, dtype=torch.float64), torch.randn(c).to(dtype), torch.randn(b, n, c)
    ref = gmp_formula_grads(h_self, h_nbr, logits.float(), g[0], g[1], bias, grad_out.to(dtype))
    out = gmp(h_self, h_nbr, logits, g, bias)
    grads = gmp_backward(grad_out.to(dtype), h_self, h_nbr, logits, g)
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[3].dtype == dtype
    assert grads[2].dtype == torch.float64
    for k, (actual, expected) in enumerate(zip((out, *grads), ref)):
        torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=tol, msg=lambda m: f"[{k}] {m}")


@needs_cpp
def test_gmp_reads_strided_rows_in_place_and_copies_strided_channels():
    g = scheme_graph(29)
    b, n, c = 3, 29, 8
    wide = torch.randn(b, n, 3 * c, dtype=torch.float64)
    h_self, h_nbr = wide[..., :c], wide[..., c:2 * c]  # row stride 3C: read in place
    logits = torch.randn(g[1].numel(), dtype=torch.float64)
    grad_out = torch.randn(b, c, n, dtype=torch.float64).transpose(1, 2)  # channel stride N: copied
    ref = gmp_formula_grads(h_self, h_nbr, logits, g[0], g[1], None, grad_out)
    assert_close64(gmp(h_self, h_nbr, logits, g), ref[0])
    grads = gmp_backward(grad_out, h_self, h_nbr, logits, g, (True, True, True, False))
    for k in range(3):
        assert_close64(grads[k], ref[k + 1], what=f"grad {k}")


@needs_cpp
def test_gmp_output_mask_and_empty_problems():
    g = scheme_graph(29)
    h = torch.randn(2, 29, 4)
    logits = torch.randn(g[1].numel())
    gh, gn, gl, gb = gmp_backward(torch.randn(2, 29, 4), h, h, logits, g, (False, True, False, True))
    assert gh.shape == (0,) and gl.shape == (0,) and gn.shape == (2, 29, 4) and gb.shape == (4,)
    empty = torch.randn(0, 29, 4)
    assert gmp(empty, empty, logits, g).shape == (0, 29, 4)
    gh, gn, gl, gb = gmp_backward(empty, empty, empty, logits, g)
    assert gl.shape == logits.shape and not gl.any() and gb.shape == (4,) and not gb.any()


@needs_cpp
def test_gmp_backward_is_bitwise_deterministic():
    g = scheme_graph(98)
    h_self, h_nbr, grad_out = torch.randn(64, 98, 32), torch.randn(64, 98, 32), torch.randn(64, 98, 32)
    logits = torch.randn(64, g[1].numel())
    first = gmp_backward(grad_out, h_self, h_nbr, logits, g)
    for _ in range(2):
        for a, x in zip(gmp_backward(grad_out, h_self, h_nbr, logits, g), first):
            assert torch.equal(a, x)


class _RawGraphOp(torch.autograd.Function):
    """The raw forward op with the raw backward op as its derivative, for gradcheck."""

    @staticmethod
    def forward(ctx, h_self, h_nbr, logits, bias, g):
        ctx.save_for_backward(h_self, h_nbr, logits)
        ctx.g = g
        return gmp(h_self, h_nbr, logits, g, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grads = gmp_backward(grad_out.contiguous(), *ctx.saved_tensors, ctx.g)
        return (*grads[:3], grads[3], None)


@needs_cpp
@pytest.mark.parametrize("per_face", [False, True])
def test_gmp_gradcheck_of_the_raw_ops(per_face):
    """The backward op is the derivative of the forward op (finite differences in float64)."""
    g = scheme_graph(29)
    b, c, e = 2, 3, g[1].numel()
    inputs = [torch.randn(b, 29, c, dtype=torch.float64, requires_grad=True),
              torch.randn(b, 29, c, dtype=torch.float64, requires_grad=True),
              torch.randn(*((b, e) if per_face else (e,)), dtype=torch.float64, requires_grad=True),
              torch.randn(c, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda *t: _RawGraphOp.apply(*t, g), inputs)


@needs_cpp
def test_gmp_and_rll_match_the_reference_module():
    """float32 against structalign/ops/reference.py, called directly."""
    g = scheme_graph(98)
    h_self, h_nbr, logits, bias = torch.randn(3, 98, 40), torch.randn(3, 98, 40), torch.randn(3, g[1].numel()), \
        torch.randn(40)
    torch.testing.assert_close(gmp(h_self, h_nbr, logits, g, bias),
                               graph_message_passing_reference(h_self, h_nbr, logits, g[0], g[1], bias),
                               rtol=1e-5, atol=1e-5)
    rel = laplacian_args(98, torch.float32)
    pred, target, lw = rll_inputs(4, 98, torch.float32, weighted=True)
    for reduction in ("mean", "sum", "none"):
        loss, _ = rll(pred, target, rel, lw, "soft_wing", reduction, need_grad=False)
        ref = relative_location_loss_reference(pred, target, *rel[:4], lw, "soft_wing", *WING, reduction)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def _graph_with(g, **changes):
    names = ("indptr", "indices", "in_ptr", "in_edges", "edge_row", "max_deg", "max_in_deg")
    args = dict(zip(names, g))
    for name, value in changes.items():
        args[name] = value
    return tuple(args[name] for name in names)


def malformed_graphs():
    """(name, graph args, expected message fragment) for graphs the ops must reject; N = 29 scheme graph."""
    g = scheme_graph(29)
    indptr, indices, in_ptr, in_edges, edge_row = (t.clone() for t in g[:5])
    dup = indices.clone()
    dup[1] = dup[0]  # row 0 lists its first neighbour twice
    shifted = indptr.clone()
    shifted[0] = 1
    empty_row = indptr.clone()
    empty_row[1] = empty_row[0]
    far = indices.clone()
    far[3] = 29
    swapped = in_edges.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    wrong_row = edge_row.clone()
    wrong_row[0] = 1
    return [
        ("indptr[0] != 0", _graph_with(g, indptr=shifted), "indptr must start at 0"),
        ("empty row", _graph_with(g, indptr=empty_row), "no entry"),
        ("index out of range", _graph_with(g, indices=far), "outside [0, 29)"),
        ("duplicate neighbour", _graph_with(g, indices=dup), "twice"),
        ("row longer than max_deg", _graph_with(g, max_deg=g[5] - 1), "max_deg"),
        ("in-degree above max_in_deg", _graph_with(g, max_in_deg=g[6] - 1), "max_in_deg"),
        ("in_edges out of order", _graph_with(g, in_edges=swapped), "in_edges"),
        ("wrong edge_row", _graph_with(g, edge_row=wrong_row), "edge_row"),
    ]


BACKWARD_ONLY = ("in-degree above max_in_deg", "in_edges out of order", "wrong edge_row")


@needs_cpp
@pytest.mark.parametrize("name,graph,message", malformed_graphs(), ids=[m[0] for m in malformed_graphs()])
def test_gmp_rejects_malformed_graphs(name, graph, message):
    h = torch.randn(2, 29, 4)
    logits = torch.randn(graph[1].numel())
    if name not in BACKWARD_ONLY:
        with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            gmp(h, h, logits, graph)
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        gmp_backward(h, h, h, logits, graph)


@needs_cpp
def test_gmp_rejects_bad_arguments():
    g = scheme_graph(29)
    h = torch.randn(2, 29, 4)
    logits = torch.randn(g[1].numel())
    cases = [
        (lambda: gmp(h, h.double(), logits, g), "h_nbr has dtype"),
        (lambda: gmp(h.int(), h.int(), logits, g), "h_self must be float16"),
        (lambda: gmp(h, h, logits.int(), g), "logits must be a floating tensor"),
        (lambda: gmp(h, h, logits, g, torch.randn(4).double()), "bias has dtype"),
        (lambda: gmp(h, h, logits[:-1], g), "logits must have shape"),
        (lambda: gmp(h, h, logits, _graph_with(g, indices=g[1].int())), "indices must be a 1-D int64"),
        (lambda: gmp(h, h, logits, _graph_with(g, in_edges=g[3][:-1])), "in_edges must have"),
        (lambda: gmp_backward(h[:, :, :3], h, h, logits, g), "grad_out must have shape"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


# ---- relative_location_loss ------------------------------------------------------------------------------------------

def rll(pred, target, rel, landmark_weight=None, criterion="soft_wing", reduction="mean", need_grad=True):
    return ops.relative_location_loss(pred, target, *rel, landmark_weight, CRITERIA[criterion], *WING,
                                      REDUCTIONS[reduction], need_grad)


def rll_backward(grad_out, pred, target, rel, landmark_weight=None, criterion="soft_wing"):
    return ops.relative_location_loss_backward(grad_out, pred, target, *rel, landmark_weight, CRITERIA[criterion],
                                               *WING)


def rll_inputs(b, n, dtype=torch.float64, weighted=False):
    target = torch.rand(b, n, 2, dtype=torch.float64) * 64
    pred = target + torch.randn(b, n, 2, dtype=torch.float64) * 3  # both soft-wing branches
    lw = torch.rand(b, n, dtype=torch.float64) + 0.5 if weighted else None
    return pred.to(dtype), target.to(dtype), lw


def rll_formula_grad(pred, target, rel, lw, criterion, reduction, grad_out=None):
    p = pred.detach().double().requires_grad_()
    loss = rll_formula(p, target, *rel[:4], lw, criterion, reduction)
    (grad,) = torch.autograd.grad(loss, p, None if grad_out is None else grad_out.double())
    return loss.detach(), grad


@needs_cpp
@pytest.mark.parametrize("relations", ["laplacian", "pairs"])
@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("reduction,weighted", [("mean", False), ("mean", True), ("sum", True), ("none", False)])
def test_rll_float64_matches_formula(relations, criterion, reduction, weighted):
    n = 29
    rel = (laplacian_args if relations == "laplacian" else pairs_args)(n, torch.float64)
    pred, target, lw = rll_inputs(3, n, weighted=weighted)
    loss, grad = rll(pred, target, rel, lw, criterion, reduction)
    ref_loss, ref_grad = rll_formula_grad(pred, target, rel, lw, criterion, reduction,
                                          torch.randn(3, rel[0].numel(), 2) if reduction == "none" else None)
    assert loss.dtype == torch.float64
    assert_close64(loss, ref_loss, what="loss")
    if reduction == "none":
        assert grad.shape == (0,)
        grad_out = torch.randn(3, rel[0].numel(), 2, dtype=torch.float64)
        _, ref_grad = rll_formula_grad(pred, target, rel, lw, criterion, reduction, grad_out)
        grad = rll_backward(grad_out, pred, target, rel, lw, criterion)
    assert_close64(grad, ref_grad, what="grad")


@needs_cpp
@pytest.mark.parametrize("dtype,criterion", [(torch.float32, "soft_wing"), (torch.bfloat16, "mse"),
                                             (torch.float16, "mse")])
def test_rll_low_precision_accumulates_in_float32(dtype, criterion):
    """fp16 / bf16 inputs are widened, not rounded further: float32 agreement with the formula on the rounded
    inputs (mse there: rounded inputs put residuals exactly on the soft-wing / l1 kinks, where float32 and float64
    may pick different branches)."""
    tol = 1e-5
    rel = laplacian_args(98, torch.float32)
    pred, target, _ = rll_inputs(5, 98, dtype)
    loss, grad = rll(pred, target, rel, criterion=criterion)
    ref_loss, ref_grad = rll_formula_grad(pred, target, rel, None, criterion, "mean")
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item())


@needs_cpp
def test_rll_is_bitwise_deterministic():
    rel = pairs_args(68, torch.float32)
    pred, target, lw = rll_inputs(70, 68, torch.float32, weighted=True)
    first = rll(pred, target, rel, lw)
    for _ in range(2):
        again = rll(pred, target, rel, lw)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def malformed_relations():
    """(name, relation args, expected message) for relation tables the ops must reject; N = 29 Laplacian."""
    rel = laplacian_args(29, torch.float64)
    anchor, indptr, member, weight, point_ptr, point_rel, point_coef = (t.clone() for t in rel)

    def with_(k, value):
        args = list(rel)
        args[k] = value
        return tuple(args)

    bad_member = member.clone()
    bad_member[0] = 29
    bad_coef = point_coef.clone()
    bad_coef[0] += 1
    bad_rel = point_rel.clone()
    bad_rel[[0, 1]] = bad_rel[[1, 0]]
    short_ptr = point_ptr.clone()
    short_ptr[-1] -= 1
    return [
        ("member out of range", with_(2, bad_member), r"member\[0\] = 29"),
        ("wrong coefficient", with_(6, bad_coef), "must be relation"),
        ("entries out of order", with_(5, bad_rel), "must be relation"),
        ("point_ptr end", with_(4, short_ptr), "point_ptr must start at 0"),
        ("weight dtype", with_(3, weight.float()), "weight .in the accumulation dtype. must be a 1-D Double"),
        ("point_rel length", with_(5, point_rel[:-1]), "point_rel"),
    ]


@needs_cpp
@pytest.mark.parametrize("name,rel,message", malformed_relations(), ids=[m[0] for m in malformed_relations()])
def test_rll_rejects_malformed_relations(name, rel, message):
    pred, target, _ = rll_inputs(2, 29)
    with pytest.raises(RuntimeError, match=message):
        rll(pred, target, rel)
