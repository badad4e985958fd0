"""graph_conv (one L-GRN graph-convolution layer: GEMM, aggregation, bias, BatchNorm, ReLU, residual) on the cpp
backend against the unfused reference layer (two matmuls, graph_message_passing, F.batch_norm, relu, add) and a dense
float64 formula; running statistics against nn.BatchNorm1d's.

    python -m pytest -q tests/ops/test_graph_conv.py
"""
from functools import lru_cache

import pytest
import torch

from structalign.landmarks import scheme_for
from structalign.ops import BatchNormArgs, LandmarkGraph, graph_conv
from structalign.ops.backend import cpp_available, triton_available
from structalign.ops.graph_conv import NORM_BATCH, NORM_GIVEN, NORM_NONE

from float64_formulas import gmp_formula

needs_cpp = pytest.mark.skipif(not cpp_available("cpu", "graph_conv"), reason="structalign._C (CPU) is not built")
NORMS = ("none", "batch", "given")


@lru_cache(maxsize=None)
def scheme_graph(n: int) -> LandmarkGraph:
    return LandmarkGraph.from_edges(n, scheme_for(n).edges)


def layer_inputs(graph, b, f, c, per_face, residual, dtype=torch.float32, seed=0):
    """x, weight, logits, bias, residual (or None), and BatchNorm weight / bias / running stats, all leaves."""
    gen = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)

    e = graph.num_edges
    leaves = dict(x=make(b, graph.num_nodes, f), weight=make(2, f, c, scale=f ** -0.5),
                  logits=make(*((b, e) if per_face else (e,))), bias=make(c),
                  residual=make(b, graph.num_nodes, c) if residual else None,
                  bn_weight=make(c, scale=0.3, shift=1.0), bn_bias=make(c, scale=0.3))
    for t in leaves.values():
        if t is not None:
            t.requires_grad_()
    stats = dict(running_mean=make(c, scale=0.1), running_var=make(c, scale=0.1, shift=1.0).abs())
    return leaves, stats


def batch_norm(norm, leaves, stats, momentum=0.1):
    if norm == "none":
        return None
    return BatchNormArgs(stats["running_mean"], stats["running_var"], leaves["bn_weight"], leaves["bn_bias"],
                         norm == "batch", momentum, 1e-5)


def run_layer(backend, graph, norm, relu, leaves, stats, grad_seed=1):
    """Output, the gradients of every leaf the layer uses, and the running statistics after the call."""
    stats = {k: v.clone() for k, v in stats.items()}
    bn = batch_norm(norm, leaves, stats)
    out = graph_conv(leaves["x"], leaves["weight"], leaves["logits"], graph, leaves["bias"], bn, relu,
                     leaves["residual"], backend=backend)
    used = [k for k, t in leaves.items() if t is not None and (norm != "none" or not k.startswith("bn_"))]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    grad_out = grad_out.to(out.dtype)
    grads = torch.autograd.grad(out, [leaves[k] for k in used], grad_out)
    return out, dict(zip(used, grads)), stats


def assert_layers_close(actual, expected, atol, rtol, norm="none"):
    """Outputs, gradients (atol scaled by the gradient's size) and running statistics agree. Under batch
    statistics the bias's gradient is 0 exactly (BatchNorm removes the bias), so both are rounding noise of a sum
    over the B * N rows: held to atol times that count."""
    torch.testing.assert_close(actual[0], expected[0], atol=atol, rtol=rtol, msg=lambda m: f"out: {m}")
    assert actual[1].keys() == expected[1].keys()
    for k in expected[1]:
        scale = max(expected[1][k].abs().max().item(), 1.0)
        if k == "bias" and norm == "batch":
            scale = actual[0].shape[0] * actual[0].shape[1]
        torch.testing.assert_close(actual[1][k], expected[1][k], atol=atol * scale, rtol=rtol,
                                   msg=lambda m: f"grad {k}: {m}")
    for k in expected[2]:
        torch.testing.assert_close(actual[2][k], expected[2][k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


@needs_cpp
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("relu,residual", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("per_face", [False, True])
def test_cpp_matches_the_unfused_reference_layer(norm, relu, residual, per_face):
    graph = scheme_graph(98)
    leaves, stats = layer_inputs(graph, 3, 20, 12, per_face, residual)
    expected = run_layer("reference", graph, norm, relu, leaves, stats)
    assert_layers_close(run_layer("cpp", graph, norm, relu, leaves, stats), expected, 1e-5, 1e-5, norm)


@needs_cpp
@pytest.mark.parametrize("n,b,f,c", [(29, 2, 7, 5), (68, 1, 3, 130)])
def test_float64_cpp_matches_the_reference_to_1e10(n, b, f, c):
    graph = scheme_graph(n)
    leaves, stats = layer_inputs(graph, b, f, c, True, True, dtype=torch.float64)
    for norm in NORMS:
        expected = run_layer("reference", graph, norm, True, leaves, stats)
        assert_layers_close(run_layer("cpp", graph, norm, True, leaves, stats), expected, 1e-10, 1e-10, norm)


@needs_cpp
def test_dense_float64_formula():
    """The layer written densely from its definition (method.md §1.3 + BatchNorm1d over the B * N rows)."""
    graph = scheme_graph(29)
    leaves, stats = layer_inputs(graph, 4, 6, 5, False, True, dtype=torch.float64)
    x, w, lg, bias, res = (leaves[k].detach() for k in ("x", "weight", "logits", "bias", "residual"))
    gamma, beta = leaves["bn_weight"].detach(), leaves["bn_bias"].detach()
    y = gmp_formula(x @ w[0], x @ w[1], lg, graph.indptr, graph.indices, bias).reshape(-1, 5)
    mean, var = y.mean(0), y.var(0, unbiased=False)
    expected = (torch.relu((y - mean) / torch.sqrt(var + 1e-5) * gamma + beta).view(4, 29, 5) + res)
    out, _, after = run_layer("cpp", graph, "batch", True, leaves, stats)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    rows = y.shape[0]
    torch.testing.assert_close(after["running_var"], 0.9 * stats["running_var"] + 0.1 * var * rows / (rows - 1),
                               atol=1e-12, rtol=1e-12)


@needs_cpp
def test_batch_statistics_are_exact_for_a_large_mean():
    """float32 rows y with mean 1e4 and spread 1e-2: the op's batch mean and variance are those of its own y to
    float32 rounding (an E[y^2] - E[y]^2 pass in float32 loses the variance entirely; float32 two-pass sums per face
    are off by ~1e-3)."""
    graph = scheme_graph(98)
    b, c = 64, 4
    h = torch.randn(b, 98, 2 * c) * 1e-2
    bias = torch.full((c,), 1e4)
    _, y, mean, var = torch.ops.structalign.graph_conv(h, torch.randn(graph.num_edges), *graph.tensors(),
                                                       *graph.transposed(), bias, None, None, None, None, None,
                                                       NORM_BATCH, 1e-5, False, graph.max_deg, graph.max_in_deg)
    rows = y.reshape(-1, c).double()
    torch.testing.assert_close(mean.double(), rows.mean(0), rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), rows.var(0, unbiased=False), rtol=1e-5, atol=0)


@needs_cpp
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("per_face", [False, True])
def test_gradcheck_float64(norm, per_face):
    graph = scheme_graph(29)
    leaves, stats = layer_inputs(graph, 2, 3, 4, per_face, True, dtype=torch.float64)
    names = [k for k in leaves if norm != "none" or not k.startswith("bn_")]

    def layer(*tensors):
        args = dict(zip(names, tensors))
        bn = None
        if norm != "none":
            bn = BatchNormArgs(None, None, args["bn_weight"], args["bn_bias"], True, 0.1, 1e-5) if norm == "batch" \
                else BatchNormArgs(stats["running_mean"], stats["running_var"], args["bn_weight"], args["bn_bias"],
                                   False, 0.1, 1e-5)
        return graph_conv(args["x"], args["weight"], args["logits"], graph, args["bias"], bn, True,
                          args["residual"], backend="cpp")

    assert torch.autograd.gradcheck(layer, [leaves[k] for k in names])


@needs_cpp
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_follow_batchnorm1d(momentum):
    """Three training steps then evaluation: the fused layer's BatchNorm1d buffers match the module's own."""
    from structalign.models.lgrn import GraphBlock

    graph = scheme_graph(68)
    torch.manual_seed(0)
    fused = GraphBlock(6, 5, graph, learn_edges=True, op_backend="cpp", fused=True)
    plain = GraphBlock(6, 5, graph, learn_edges=True, op_backend="cpp", fused=False)
    for block in (fused, plain):
        block.bn.momentum = momentum
    plain.load_state_dict(fused.state_dict())
    for step in range(3):
        x = torch.randn(4, 68, 6) * (step + 1) + step
        torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=1e-5)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, atol=1e-6, rtol=1e-6, msg=lambda m: f"{key}: {m}")
    assert fused.bn.num_batches_tracked.item() == 3
    fused.eval(), plain.eval()
    x = torch.randn(2, 68, 6)
    torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("norm,relu,residual", [(NORM_BATCH, True, True), (NORM_GIVEN, True, False),
                                                (NORM_NONE, False, False), (NORM_NONE, True, True)])
@pytest.mark.parametrize("per_face", [False, True])
def test_opcheck(norm, relu, residual, per_face):
    graph = scheme_graph(29)
    b, c, e = 2, 3, graph.num_edges
    h = torch.randn(3, 29, 2 * c + 2)[1:, :, 1:-1]  # strided rows and a batch stride that is not N * 2C
    logits = torch.randn(*((b, e) if per_face else (e,)), requires_grad=True)
    h.requires_grad_()
    ch = [torch.randn(c, requires_grad=True) for _ in range(3)]
    stats = [torch.randn(c), torch.rand(c) + 0.5] if norm == NORM_GIVEN else [None, None]
    res = torch.randn(b, 29, c, requires_grad=True) if residual else None
    args = (h, logits, *graph.tensors(), *graph.transposed(), *ch, *stats, res, norm, 1e-5, relu, graph.max_deg,
            graph.max_in_deg)
    torch.library.opcheck(torch.ops.structalign.graph_conv.default, args)
    out, y, mean, var = torch.ops.structalign.graph_conv(*args)
    saved = (mean, var) if norm == NORM_BATCH else tuple(stats)
    backward_args = (torch.randn(b, 29, c), h.detach(), y, logits.detach(), *graph.tensors(), *graph.transposed(),
                     ch[1].detach(), ch[2].detach(), *saved, norm, 1e-5, relu, graph.max_deg, graph.max_in_deg,
                     [True] * 5)
    torch.library.opcheck(torch.ops.structalign.graph_conv_backward.default, backward_args,
                          test_utils=("test_schema", "test_faketensor"))


@needs_cpp
def test_backward_is_bitwise_deterministic():
    graph = scheme_graph(98)
    leaves, stats = layer_inputs(graph, 32, 16, 24, True, True)
    first = run_layer("cpp", graph, "batch", True, leaves, stats)
    again = run_layer("cpp", graph, "batch", True, leaves, stats)
    assert torch.equal(first[0], again[0])
    for k in first[1]:
        assert torch.equal(first[1][k], again[1][k]), k


@needs_cpp
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_low_precision_is_as_close_to_float64_as_one_rounding(dtype, tol):
    """fp16 / bf16 features (the fused op accumulates in fp32) against the float64 layer on the same rounded
    inputs: output and every gradient within `tol` in relative norm (the unfused bf16 layer is 5.8e-2 off in grad x
    under batch statistics, the fused one 1.3e-2)."""
    graph = scheme_graph(68)
    leaves, stats = layer_inputs(graph, 2, 16, 8, False, True, dtype=dtype)
    leaves64 = {k: None if t is None else t.detach().double().requires_grad_() for k, t in leaves.items()}
    stats64 = {k: t.double() for k, t in stats.items()}
    for norm in ("batch", "given"):
        out, grads, _ = run_layer("cpp", graph, norm, True, leaves, stats)
        out64, grads64, _ = run_layer("reference", graph, norm, True, leaves64, stats64)
        assert out.dtype == dtype
        assert ((out.double() - out64).norm() / out64.norm()).item() < tol
        for k, g in grads64.items():
            if k == "bias" and norm == "batch":
                continue  # 0 exactly: both are rounding noise
            assert ((grads[k].double() - g).norm() / g.norm()).item() < tol, (norm, k)


@needs_cpp
def test_empty_batch():
    graph = scheme_graph(29)
    leaves, stats = layer_inputs(graph, 0, 4, 3, False, True)
    for norm in ("none", "given"):
        out, grads, _ = run_layer("cpp", graph, norm, True, leaves, stats)
        assert out.shape == (0, 29, 3)
        assert not grads["weight"].any() and not grads["bias"].any() and not grads["logits"].any()


@needs_cpp
def test_torch_compile_fullgraph():
    graph = scheme_graph(29)
    leaves, stats = layer_inputs(graph, 2, 5, 4, True, True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def layer(x, weight, logits, bias, residual, gamma, beta):
        bn = BatchNormArgs(None, None, gamma, beta, True, 0.1, 1e-5)
        return graph_conv(x, weight, logits, graph, bias, bn, True, residual, backend="cpp").square().sum()

    names = ("x", "weight", "logits", "bias", "residual", "bn_weight", "bn_bias")
    loss = layer(*(leaves[k] for k in names))
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    bn = BatchNormArgs(None, None, leaves["bn_weight"], leaves["bn_bias"], True, 0.1, 1e-5)
    ref = graph_conv(leaves["x"], leaves["weight"], leaves["logits"], graph, leaves["bias"], bn, True,
                     leaves["residual"], backend="reference").square().sum()
    ref_grads = torch.autograd.grad(ref, [leaves[k] for k in names])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for k, a, e in zip(names, grads, ref_grads):
        # the bias's gradient is 0 exactly under batch statistics: rounding noise of a sum over 2 * 29 rows
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-3 if k == "bias" else 1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.skipif(not triton_available("cpu"), reason="triton missing or TRITON_INTERPRET unset")
def test_triton_backend_is_the_unfused_layer_over_the_triton_kernel():
    """No Triton kernel of its own: backend "triton" runs the reference layer with the Triton message passing."""
    graph = scheme_graph(29)
    leaves, stats = layer_inputs(graph, 2, 5, 4, True, True)
    expected = run_layer("reference", graph, "batch", True, leaves, stats)
    assert_layers_close(run_layer("triton", graph, "batch", True, leaves, stats), expected, 1e-5, 1e-5, "batch")


@needs_cpp
def test_double_backward_is_a_clear_error():
    graph = scheme_graph(29)
    leaves, _ = layer_inputs(graph, 2, 3, 4, False, False)
    out = graph_conv(leaves["x"], leaves["weight"], leaves["logits"], graph, relu=True, backend="cpp")
    (gx,) = torch.autograd.grad(out.square().sum(), leaves["x"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("change,error,match", [
    (dict(weight=torch.randn(3, 4, 5)), ValueError, r"weight must have shape \[2, 4, C\]"),
    (dict(x=torch.randn(2, 28, 4)), ValueError, r"x must have shape \[B, 29, F\]"),
    (dict(residual=torch.randn(2, 29, 4)), ValueError, r"residual must have shape \[2, 29, 5\]"),
    (dict(bias=torch.randn(4)), ValueError, r"bias must be a tensor of shape \[5\]"),
    (dict(logits=torch.randn(7)), ValueError, "logits must have shape"),
    (dict(x=torch.randn(1, 1, 4), graph=LandmarkGraph.from_edges(1, [])), ValueError,
     "more than one value per channel"),
    (dict(batch_norm=(None, None)), TypeError, "batch_norm must be a BatchNormArgs"),
    (dict(batch_norm=BatchNormArgs(None, None, None, None, False, 0.1, 1e-5)), ValueError, "running_mean and"),
    (dict(x=torch.zeros(2, 29, 4, dtype=torch.long)), TypeError, "x must be a floating tensor"),
])
def test_bad_input_names_the_problem(change, error, match):
    graph = change.pop("graph", scheme_graph(29))
    args = dict(x=torch.randn(2, 29, 4), weight=torch.randn(2, 4, 5), logits=torch.randn(graph.num_edges),
                bias=torch.randn(5), batch_norm=BatchNormArgs(None, None, None, None, True, 0.1, 1e-5),
                residual=None)
    args.update(change)
    if graph.num_nodes == 1:
        args["weight"], args["bias"] = torch.randn(2, 4, 5), torch.randn(5)
        args["logits"] = torch.randn(graph.num_edges)
    with pytest.raises(error, match=match):
        graph_conv(args["x"], args["weight"], args["logits"], graph, args["bias"], args["batch_norm"], True,
                   args["residual"])


@needs_cpp
@pytest.mark.parametrize("edit,match", [
    (lambda a: a.update(h=torch.randn(2, 29, 7)), r"h must have shape \[B, N, 2C\]"),
    (lambda a: a.update(norm=3), "norm must be 0"),
    (lambda a: a.update(norm=2), "needs mean and var"),
    (lambda a: a.update(residual=torch.randn(2, 29, 3).double()), "residual has dtype"),
    (lambda a: a.update(nw=torch.randn(5)), r"norm_weight must have shape \[3\]"),
])
def test_cpp_op_called_directly_checks_its_arguments(edit, match):
    graph = scheme_graph(29)
    a = dict(h=torch.randn(2, 29, 6), nw=None, residual=None, norm=1)
    edit(a)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.structalign.graph_conv(a["h"], torch.randn(graph.num_edges), *graph.tensors(), *graph.transposed(),
                                         None, a["nw"], None, None, None, a["residual"], a["norm"], 1e-5, True,
                                         graph.max_deg, graph.max_in_deg)


# ---- CUDA (gpu-marked: skipped without a GPU; `make gpu-check` runs them) -------------------------------------------

def _to(leaves, stats, device):
    moved = {k: None if t is None else t.detach().to(device).requires_grad_() for k, t in leaves.items()}
    return moved, {k: t.to(device) for k, t in stats.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("per_face", [False, True])
@pytest.mark.parametrize("dtype,c", [(torch.float32, 128), (torch.float32, 37), (torch.float64, 24)])
def test_cuda_matches_the_cpu_op(norm, per_face, dtype, c):
    if not cpp_available("cuda", "graph_conv"):
        pytest.skip("structalign._C has no CUDA kernels")
    graph = scheme_graph(98)
    leaves, stats = layer_inputs(graph, 5, 40, c, per_face, True, dtype=dtype)
    expected = run_layer("cpp", graph, norm, True, leaves, stats)
    cuda_leaves, cuda_stats = _to(leaves, stats, "cuda")
    out, grads, after = run_layer("cpp", graph, norm, True, cuda_leaves, cuda_stats)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_layers_close((out.cpu(), {k: g.cpu() for k, g in grads.items()}, {k: t.cpu() for k, t in after.items()}),
                        expected, tol, tol, norm)


@pytest.mark.gpu
def test_cuda_bf16_is_as_close_to_float64_as_one_rounding():
    if not cpp_available("cuda", "graph_conv"):
        pytest.skip("structalign._C has no CUDA kernels")
    graph = scheme_graph(98)
    leaves, stats = layer_inputs(graph, 8, 64, 128, False, True, dtype=torch.bfloat16)
    leaves64 = {k: None if t is None else t.detach().double().requires_grad_() for k, t in leaves.items()}
    stats64 = {k: t.double() for k, t in stats.items()}
    cuda_leaves, cuda_stats = _to(leaves, stats, "cuda")
    for norm in ("batch", "given"):
        out, grads, _ = run_layer("cpp", graph, norm, True, cuda_leaves, cuda_stats)
        out64, grads64, _ = run_layer("reference", graph, norm, True, leaves64, stats64)
        assert ((out.double().cpu() - out64).norm() / out64.norm()).item() < 3e-2
        for k, g in grads64.items():
            if k == "bias" and norm == "batch":
                continue
            assert ((grads[k].double().cpu() - g).norm() / g.norm()).item() < 3e-2, (norm, k)
