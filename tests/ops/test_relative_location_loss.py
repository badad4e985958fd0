"""structalign.ops.relative_location_loss: every backend against the reference, the reference against the paper
code's dense form, gradients, gradcheck, opcheck, half precision, random pair lists, torch.compile and bad input.

    pytest -q tests/ops/test_relative_location_loss.py
"""
import pytest
import torch

pytest.importorskip("hypothesis")  # property tests; the GPU checks (test_ops_cuda.py) do without it
from hypothesis import given, settings
from hypothesis import strategies as st

from structalign.landmarks import scheme_for
from structalign.ops import RelationSet, relative_location_loss
from structalign.ops.backend import cpp_available, resolve_backend, triton_available
from structalign.ops.reference import (
    CRITERIA,
    REDUCTIONS,
    relative_location_loss_dense,
    relative_location_loss_reference,
)

from float64_formulas import rll_formula  # noqa: E402

OP = "relative_location_loss"
HAS_CPP = cpp_available("cpu", OP)
HAS_TRITON = triton_available("cpu")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="structalign._C is not built (run `make ext`)")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton missing or TRITON_INTERPRET unset")
CPP = pytest.param("cpp", marks=needs_cpp)
TRITON = pytest.param("triton", marks=needs_triton)

GIVEN_PAIRS = [(0, 5), (5, 0), (3, 27), (10, 11), (28, 1), (14, 7), (7, 14), (2, 2 + 20)]


def make_relations(kind: str) -> RelationSet:
    """lap98 / lap68 / lap29: the schemes' Laplacian relations; pairs98 / pairs29: all i < j; given29: a pair list."""
    if kind.startswith("lap"):
        return RelationSet.laplacian(scheme_for(int(kind[3:])).relation_neighbors)
    if kind.startswith("pairs"):
        return RelationSet.pairs(int(kind[5:]))
    return RelationSet.pairs(29, GIVEN_PAIRS)


def make_inputs(batch: int, points: int, dtype=torch.float32, spread: float = 3.0):
    """Targets in a 256-px crop, predictions a few pixels off (both soft-wing branches are hit)."""
    target = torch.rand(batch, points, 2) * 256
    pred = target + torch.randn(batch, points, 2) * spread
    weight = (torch.rand(batch, points) > 0.2).float() * torch.rand(batch, points).add(0.5)
    return pred.to(dtype), target.to(dtype), weight


def upstream(loss: torch.Tensor) -> torch.Tensor:
    """A fixed, non-uniform upstream gradient for loss (any shape)."""
    ramp = torch.linspace(-1.0, 2.0, max(loss.numel(), 1), dtype=loss.dtype, device=loss.device)
    return ramp[: loss.numel()].view_as(loss)


def loss_and_grad(pred, target, relations, weight, criterion, reduction, backend):
    x = pred.detach().clone().requires_grad_()
    loss = relative_location_loss(x, target, relations, weight, criterion, reduction=reduction, backend=backend)
    (g,) = torch.autograd.grad(loss, x, upstream(loss), allow_unused=True)
    return loss.detach(), torch.zeros_like(x) if g is None else g


def assert_close(actual, expected, rtol, atol, what):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, check_dtype=False, msg=lambda m: f"{what}: {m}")


def _cases():
    for kind in ("lap98", "lap68", "lap29", "pairs98", "given29"):
        for criterion in CRITERIA:
            for reduction in REDUCTIONS:
                for weighted in (False, True):
                    # The interpreter runs one Triton program at a time: its full grid is the 98-pt Laplacian set.
                    quick = kind in ("lap98", "given29") or (criterion == "soft_wing" and not weighted)
                    yield pytest.param(kind, criterion, reduction, weighted, "cpp", marks=needs_cpp)
                    if quick:
                        yield pytest.param(kind, criterion, reduction, weighted, "triton", marks=needs_triton)


@pytest.mark.parametrize("kind, criterion, reduction, weighted, backend", list(_cases()))
def test_matches_reference(kind, criterion, reduction, weighted, backend):
    rel = make_relations(kind)
    pred, target, weight = make_inputs(3, rel.num_points)
    weight = weight if weighted else None
    loss, grad = loss_and_grad(pred, target, rel, weight, criterion, reduction, backend)
    ref_loss, ref_grad = loss_and_grad(pred, target, rel, weight, criterion, reduction, "reference")
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, 1e-5, 1e-5, "loss")
    assert_close(grad, ref_grad, 1e-4, 1e-6, "grad")


@pytest.mark.parametrize("kind", ["lap98", "lap68", "lap29", "pairs98", "given29"])
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("weighted", [False, True])
def test_reference_matches_dense(kind, criterion, weighted):
    rel = make_relations(kind)
    pred, target, weight = make_inputs(4, rel.num_points)
    weight = weight if weighted else None
    for reduction in REDUCTIONS:
        args = (pred, target, *rel.tensors(), weight, criterion, 2.0, 20.0, 0.5, reduction)
        assert_close(relative_location_loss_reference(*args), relative_location_loss_dense(*args), 1e-4, 1e-4,
                     reduction)


@pytest.mark.parametrize("backend", [CPP, TRITON])
@pytest.mark.parametrize("batch", [0, 1, 17])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_batch_sizes(backend, batch, reduction):
    # 17 = one full CPU block of faces plus a partial one.
    rel = make_relations("lap98")
    pred, target, weight = make_inputs(batch, 98)
    for w in (None, weight):
        loss, grad = loss_and_grad(pred, target, rel, w, "soft_wing", reduction, backend)
        ref_loss, ref_grad = loss_and_grad(pred, target, rel, w, "soft_wing", reduction, "reference")
        assert_close(loss, ref_loss, 1e-5, 1e-5, "loss")
        assert_close(grad, ref_grad, 1e-4, 1e-6, "grad")
    if batch == 0 and reduction == "mean":
        assert loss.item() == 0.0


@pytest.mark.parametrize("backend", [CPP, TRITON])
def test_non_contiguous_inputs(backend):
    rel = make_relations("lap98")
    pred, target, weight = make_inputs(4, 98)
    pred_t = pred.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (196, 1, 98)
    target_t = torch.stack([target, target], dim=1).flatten(0, 1)[::2]  # every other face of a doubled batch
    weight_t = weight.t().contiguous().t()
    assert not (pred_t.is_contiguous() or target_t.is_contiguous() or weight_t.is_contiguous())
    for reduction in REDUCTIONS:
        loss, grad = loss_and_grad(pred_t, target_t, rel, weight_t, "soft_wing", reduction, backend)
        ref_loss, ref_grad = loss_and_grad(pred, target, rel, weight, "soft_wing", reduction, "reference")
        assert_close(loss, ref_loss, 1e-5, 1e-5, "loss")
        assert_close(grad, ref_grad, 1e-4, 1e-6, "grad")


@pytest.mark.parametrize("backend", [CPP, TRITON])
def test_expanded_upstream_gradient(backend):
    rel = make_relations("lap29")
    pred, target, weight = make_inputs(3, 29)
    grads = []
    for name in (backend, "reference"):
        x = pred.clone().requires_grad_()
        relative_location_loss(x, target, rel, weight, reduction="none", backend=name).sum().backward()
        grads.append(x.grad)
    assert_close(grads[0], grads[1], 1e-4, 1e-6, "grad")


# Kernels load half inputs and compute in fp32 like the reference, so the loss agrees to fp32 accuracy; the gradient
# w.r.t. pred is rounded to pred's dtype (fp16: 10-bit, bf16: 7-bit mantissa).
HALF_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_grad_close_off_kinks(grad, ref_grad, rel, pred, target, rtol, what="grad"):
    """Compare gradients on landmarks whose relations all keep |d| away from the criterion's kinks (0 and omega1 = 2).

    Half-precision pixel coordinates are coarse (bf16 steps by 1 px above 128), so relation residuals often sit
    exactly on a kink, where the derivative depends on the last bit of d and thus on the summation order.
    """
    anchor, indptr, member, weight = rel.tensors(pred.device)
    d = relative_location_loss_reference(pred, target, anchor, indptr, member, weight, criterion="l1",
                                         reduction="none")
    near = ((d < 1e-3) | ((d - 2.0).abs() < 1e-3)).any(-1).float()  # [B, R]
    owner = torch.repeat_interleave(torch.arange(anchor.numel(), device=pred.device), indptr.diff())
    touched = torch.zeros(pred.shape[:2], device=pred.device).index_add_(1, anchor, near)
    touched.index_add_(1, member, near[:, owner])
    keep = (touched == 0).unsqueeze(-1)
    assert keep.float().mean() > 0.5, "too few landmarks away from the kinks to compare"
    grad, ref_grad = grad.float(), ref_grad.float()
    assert_close(torch.where(keep, grad, 0), torch.where(keep, ref_grad, 0), rtol,
                 1e-3 * ref_grad.abs().max().item(), what)


@pytest.mark.parametrize("backend", [CPP, TRITON])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision(backend, dtype, reduction):
    rel = make_relations("lap98")
    pred, target, weight = make_inputs(3, 98, dtype=dtype)
    loss, grad = loss_and_grad(pred, target, rel, weight, "soft_wing", reduction, backend)
    ref_loss, ref_grad = loss_and_grad(pred, target, rel, weight, "soft_wing", reduction, "reference")
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close(loss, ref_loss, 1e-5, 1e-4, "loss")
    assert_grad_close_off_kinks(grad, ref_grad, rel, pred, target, HALF_TOL[dtype])


@needs_cpp
def test_auto_backend_and_mixed_dtypes():
    assert resolve_backend("auto", torch.device("cpu"), OP) == "cpp"
    rel = make_relations("lap29")
    pred, target, weight = make_inputs(2, 29)
    pred = pred.to(torch.bfloat16)  # as under autocast, against float32 targets
    loss, grad = loss_and_grad(pred, target, rel, weight, "soft_wing", "mean", "auto")
    ref_loss, ref_grad = loss_and_grad(pred, target, rel, weight, "soft_wing", "mean", "reference")
    assert grad.dtype == torch.bfloat16
    assert_close(loss, ref_loss, 1e-5, 1e-5, "loss")
    assert_grad_close_off_kinks(grad, ref_grad, rel, pred, target, HALF_TOL[torch.bfloat16])


def _away_from_kinks(rel, batch, seed):
    """float64 inputs whose relation residuals keep 1e-3 away from 0 and from the soft-wing kink at omega1 = 2."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, rel.num_points, 2, generator=gen, dtype=torch.float64) * 64
    pred = target + torch.randn(batch, rel.num_points, 2, generator=gen, dtype=torch.float64) * 3
    anchor, indptr, member, weight = rel.tensors()
    d = relative_location_loss_reference(pred, target, anchor, indptr, member, weight, criterion="l1",
                                         reduction="none")
    ok = bool((d > 1e-3).all() and ((d - 2.0).abs() > 1e-3).all())
    return pred, target, ok


@needs_cpp
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_gradcheck_cpp(reduction, criterion):
    rel = make_relations("lap29")
    for seed in range(50):
        pred, target, ok = _away_from_kinks(rel, 2, seed)
        if ok:
            break
    assert ok, "no float64 sample away from the kinks"
    weight = torch.rand(2, 29, dtype=torch.float64) + 0.5
    for w in (None, weight):
        def fn(p):
            return relative_location_loss(p, target, rel, w, criterion, reduction=reduction, backend="cpp")

        assert torch.autograd.gradcheck(fn, (pred.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)


def relation_args(rel, dtype=torch.float32, device="cpu"):
    """The relation arguments of the fused ops: (anchor, indptr, member, weight, point_ptr, point_rel, point_coef)."""
    return (*rel.tensors(device, dtype), *rel.by_point(device, dtype))


def _op_args(rel, pred, target, weight, reduction, need_grad=True):
    return (pred, target, *relation_args(rel), weight, 0, 2.0, 20.0, 0.5, reduction, need_grad)


@needs_cpp
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_cpp(reduction):
    rel = make_relations("lap29")
    pred, target, weight = make_inputs(3, 29)
    for w in (None, weight):
        args = _op_args(rel, pred.requires_grad_(), target, w, reduction)
        torch.library.opcheck(torch.ops.structalign.relative_location_loss.default, args)
    grad_out = torch.randn(3, rel.num_relations, 2)
    torch.library.opcheck(torch.ops.structalign.relative_location_loss_backward.default,
                          (grad_out, pred.detach(), target, *relation_args(rel), weight, 0, 2.0, 20.0, 0.5))


@needs_triton
@pytest.mark.parametrize("reduction", [0, 2])
def test_opcheck_triton(reduction):
    rel = make_relations("given29")
    pred, target, weight = make_inputs(2, 29)
    torch.library.opcheck(torch.ops.structalign.relative_location_loss_triton.default,
                          _op_args(rel, pred.requires_grad_(), target, weight, reduction),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ---- float64 is float64 on every backend; gradients are deterministic --------------------------------------------

@pytest.mark.parametrize("kind", ["lap29", "given29"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend", ["reference", CPP, TRITON])
def test_float64_matches_a_float64_oracle(backend, kind, reduction, weighted):
    """float64 inputs give a float64 loss and gradient computed in float64 (weights 1/k too): 1e-10 relative."""
    rel = make_relations(kind)
    # the relation weights the ops get are exact in float64: 1/k for the Laplacian, 1 for pairs
    k = rel.indptr.diff().repeat_interleave(rel.indptr.diff()).double()
    assert torch.equal(rel.weight, 1.0 / k) or bool((rel.weight == 1.0).all())
    pred, target, weight = (t.double() for t in make_inputs(3, 29))
    weight = weight if weighted else None
    for criterion in CRITERIA:
        x = pred.clone().requires_grad_()
        loss = relative_location_loss(x, target, rel, weight, criterion, reduction=reduction, backend=backend)
        (grad,) = torch.autograd.grad(loss, x, upstream(loss))
        y = pred.clone().requires_grad_()
        oracle = rll_formula(y, target, rel.anchor, rel.indptr, rel.member, rel.weight, weight, criterion, reduction)
        (oracle_grad,) = torch.autograd.grad(oracle, y, upstream(oracle))
        assert loss.dtype == torch.float64 and grad.dtype == torch.float64
        torch.testing.assert_close(loss, oracle, rtol=1e-10, atol=1e-12, msg=lambda m: f"{criterion} loss: {m}")
        torch.testing.assert_close(grad, oracle_grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{criterion} grad: {m}")


@pytest.mark.parametrize("backend", [CPP, TRITON])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_are_bitwise_identical_between_runs(backend, reduction):
    """All-pairs relations share every landmark: a scatter with atomics would add in a varying order."""
    rel = make_relations("pairs29")
    pred, target, weight = make_inputs(4, 29)
    runs = [loss_and_grad(pred, target, rel, weight, "soft_wing", reduction, backend) for _ in range(3)]
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


@pytest.mark.parametrize("kind", ["lap98", "pairs29", "given29"])
def test_by_point_index_gathers_the_scatter(kind):
    """grad e[j] = sum over j's entries coef * g[rel] equals the scatter -g[anchor] + w g[member]."""
    rel = make_relations(kind)
    g = torch.randn(2, rel.num_relations, 2, dtype=torch.float64)
    anchor, indptr, member, weight = rel.tensors(dtype=torch.float64)
    owner = torch.repeat_interleave(torch.arange(rel.num_relations), indptr.diff())
    scatter = torch.zeros(2, rel.num_points, 2, dtype=torch.float64).index_add_(1, anchor, -g)
    scatter.index_add_(1, member, weight.view(1, -1, 1) * g[:, owner])
    point_ptr, point_rel, point_coef = rel.by_point(dtype=torch.float64)
    point = torch.repeat_interleave(torch.arange(rel.num_points), point_ptr.diff())
    gather = torch.zeros_like(scatter).index_add_(1, point, point_coef.view(1, -1, 1) * g[:, point_rel])
    torch.testing.assert_close(gather, scatter, rtol=0, atol=1e-14)
    assert rel.max_point_entries == int(point_ptr.diff().max())


@needs_cpp
def test_loss_independent_of_thread_count():
    rel = make_relations("pairs98")
    pred, target, _ = make_inputs(40, 98)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.structalign.relative_location_loss(*_op_args(rel, pred, target, None, 0))
        torch.set_num_threads(2)
        two = torch.ops.structalign.relative_location_loss(*_op_args(rel, pred, target, None, 0))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@needs_cpp
def test_no_gradient_requested():
    rel = make_relations("lap98")
    pred, target, _ = make_inputs(2, 98)
    loss, grad = torch.ops.structalign.relative_location_loss(*_op_args(rel, pred, target, None, 0, need_grad=False))
    assert grad.numel() == 0
    assert_close(loss, relative_location_loss_reference(pred, target, *rel.tensors()), 1e-5, 1e-5, "loss")
    x = pred.clone().requires_grad_()
    with torch.no_grad():
        assert_close(relative_location_loss(x, target, rel, backend="cpp"), loss, 0, 0, "no_grad")
    out, _ = torch.ops.structalign.relative_location_loss(*_op_args(rel, x, target, None, 0, need_grad=False))
    with pytest.raises(RuntimeError, match="need_grad=False"):
        out.backward()


@pytest.mark.parametrize("backend", [CPP, TRITON])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_is_an_error(backend, reduction):
    rel = make_relations("given29")
    pred, target, _ = make_inputs(2, 29)
    x = pred.requires_grad_()
    loss = relative_location_loss(x, target, rel, reduction=reduction, backend=backend).sum()
    with pytest.raises(RuntimeError, match="double backward|once_differentiable"):
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        g.sum().backward()


@needs_cpp
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_random_pair_lists_cpp(data):
    n = data.draw(st.integers(2, 12), label="points")
    pairs = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda p: p[0] != p[1]),
                               min_size=1, max_size=30), label="pairs")
    batch = data.draw(st.integers(0, 20), label="batch")
    criterion = data.draw(st.sampled_from(CRITERIA), label="criterion")
    reduction = data.draw(st.sampled_from(REDUCTIONS), label="reduction")
    weighted = data.draw(st.booleans(), label="weighted")
    rel = RelationSet.pairs(n, pairs)
    pred, target, weight = make_inputs(batch, n, spread=data.draw(st.sampled_from([0.5, 3.0, 30.0])))
    weight = weight if weighted else None
    loss, grad = loss_and_grad(pred, target, rel, weight, criterion, reduction, "cpp")
    ref_loss, ref_grad = loss_and_grad(pred, target, rel, weight, criterion, reduction, "reference")
    assert_close(loss, ref_loss, 1e-5, 1e-4, "loss")
    assert_close(grad, ref_grad, 1e-4, 1e-5, "grad")


@needs_triton
@settings(max_examples=6, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)).filter(lambda p: p[0] != p[1]), min_size=1,
                      max_size=20),
       criterion=st.sampled_from(CRITERIA))
def test_random_pair_lists_triton(pairs, criterion):
    rel = RelationSet.pairs(7, pairs)
    pred, target, weight = make_inputs(3, 7)
    loss, grad = loss_and_grad(pred, target, rel, weight, criterion, "mean", "triton")
    ref_loss, ref_grad = loss_and_grad(pred, target, rel, weight, criterion, "mean", "reference")
    assert_close(loss, ref_loss, 1e-5, 1e-5, "loss")
    assert_close(grad, ref_grad, 1e-4, 1e-6, "grad")


@needs_cpp
def test_torch_compile_fullgraph_cpp():
    rel = make_relations("lap98")
    pred, target, weight = make_inputs(4, 98)

    def step(p, t, w):
        return relative_location_loss(p, t, rel, w, backend="cpp")

    compiled = torch.compile(step, fullgraph=True)
    x = pred.clone().requires_grad_()
    loss = compiled(x, target, weight)
    loss.backward(upstream(loss))
    ref_loss, ref_grad = loss_and_grad(pred, target, rel, weight, "soft_wing", "mean", "reference")
    assert_close(loss.detach(), ref_loss, 1e-5, 1e-5, "loss")
    assert_close(x.grad, ref_grad, 1e-4, 1e-6, "grad")


@pytest.mark.parametrize("backend", ["reference", CPP, TRITON])
def test_bad_input_messages(backend):
    rel = make_relations("lap29")
    pred, target, weight = make_inputs(2, 29)

    def call(p=pred, t=target, r=rel, w=None, **kw):
        return relative_location_loss(p, t, r, w, backend=backend, **kw)

    with pytest.raises(ValueError, match=r"pred must have shape \[B, N, 2\]"):
        call(p=pred[..., :1])
    with pytest.raises(ValueError, match="target must match"):
        call(t=target[:1])
    with pytest.raises(ValueError, match="29 landmarks but the relations are over 98"):
        call(r=make_relations("lap98"))
    with pytest.raises(TypeError, match="pred must be a floating tensor"):
        call(p=pred.long())
    with pytest.raises(ValueError, match="target is on meta"):
        call(t=target.to("meta"))
    with pytest.raises(ValueError, match="landmark_weight must have shape"):
        call(w=weight[:, :5])
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        call(epsilon=0.0)
    with pytest.raises(ValueError, match="criterion must be one of"):
        call(criterion="huber")
    with pytest.raises(ValueError, match="reduction must be one of"):
        call(reduction="max")
    with pytest.raises(TypeError, match="relations must be a RelationSet"):
        call(r=[(0, 1)])


@needs_cpp
def test_bad_input_messages_direct_cpp_call():
    rel = make_relations("lap29")
    pred, target, weight = make_inputs(2, 29)
    anchor, indptr, member, w, point_ptr, point_rel, point_coef = relation_args(rel)
    op = torch.ops.structalign.relative_location_loss

    def call(p=pred, t=target, a=anchor, ip=indptr, m=member, mw=w, lw=None, crit=0, eps=0.5, red=0):
        return op(p, t, a, ip, m, mw, point_ptr, point_rel, point_coef, lw, crit, 2.0, 20.0, eps, red, True)

    bad = member.clone()
    bad[3] = 29
    cases = [
        (dict(p=pred[0]), r"pred must have shape \[B, N, 2\]"),
        (dict(p=pred.int(), t=target.int()), "pred must be float16, bfloat16, float32 or float64"),
        (dict(t=target.double()), "target has dtype Double but pred has Float"),
        (dict(m=bad), r"member\[3\] = 29 is outside \[0, 29\)"),
        (dict(a=anchor - 1), r"anchor\[0\] = -1 is outside \[0, 29\)"),
        (dict(ip=indptr[:-1]), "indptr must have R \\+ 1"),
        (dict(ip=indptr.flip(0)), "indptr must start at 0"),
        (dict(a=anchor.int()), "anchor must be a 1-D int64 tensor"),
        (dict(mw=w.double()), r"weight \(in the accumulation dtype\) must be a 1-D Float tensor, got Double"),
        (dict(lw=weight[:1]), "landmark_weight must have shape"),
        (dict(crit=7), "criterion must be 0 \\(soft_wing\\), 1 \\(l1\\) or 2 \\(mse\\), got 7"),
        (dict(red=5), "reduction must be 0 \\(mean\\), 1 \\(sum\\) or 2 \\(none\\), got 5"),
        (dict(eps=-1.0), "epsilon must be > 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call(**kwargs)
    backward = torch.ops.structalign.relative_location_loss_backward
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[2, 27, 2\]"):
        backward(torch.zeros(2, 5, 2), pred, target, anchor, indptr, member, w, point_ptr, point_rel, point_coef, None,
                 0, 2.0, 20.0, 0.5)
