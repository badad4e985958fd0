"""graph_message_passing on every backend against the PyTorch reference and the paper code's dense formulation.

    python -m pytest -q tests/ops/test_graph_message_passing.py

Triton runs under TRITON_INTERPRET=1 on CPU tensors (set by tests/conftest.py); its shapes stay small because the
interpreter runs each program instance in numpy. Low-precision tolerances (vs the fp32 reference on the same
rounded inputs): fp16 atol = rtol = 2e-3, bf16 atol = rtol = 2e-2 (one rounding of the output / gradients).
"""
from functools import lru_cache

import pytest
import torch

pytest.importorskip("hypothesis")  # property tests; the GPU checks (test_ops_cuda.py) do without it
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from structalign.landmarks import scheme_for
from structalign.ops import LandmarkGraph, graph_message_passing, use_backend
from structalign.ops.backend import cpp_available, triton_available
from structalign.ops.reference import graph_message_passing_dense, graph_message_passing_reference

from float64_formulas import gmp_formula  # noqa: E402

HAS_CPP = cpp_available("cpu", "graph_message_passing")
HAS_TRITON = triton_available("cpu")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="structalign._C (CPU) is not built")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton missing or TRITON_INTERPRET unset")
BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]
LOW_PRECISION = [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)]


@lru_cache(maxsize=None)
def scheme_graph(n: int) -> LandmarkGraph:
    return LandmarkGraph.from_edges(n, scheme_for(n).edges)


def op_graph_args(graph, device="cpu"):
    """The graph arguments of the fused ops: (indptr, indices, in_ptr, in_edges, edge_row) on `device`."""
    return (*graph.tensors(device), *graph.transposed(device))


def sample_inputs(graph, b, c, per_face, with_bias, dtype=torch.float32, device="cpu", requires_grad=True):
    """h_self, h_nbr (Tensor[b, N, c]), logits (Tensor[E] or Tensor[b, E]) and bias (Tensor[c] or None)."""
    n, e = graph.num_nodes, graph.num_edges

    def make(*shape, dt=dtype):
        return torch.randn(*shape, dtype=dt, device=device).requires_grad_(requires_grad)

    logits = make(b, e, dt=torch.float32) if per_face else make(e, dt=torch.float32)
    return make(b, n, c), make(b, n, c), logits, (make(c) if with_bias else None)


def run(backend, graph, h_self, h_nbr, logits, bias, grad_out):
    """Output and the gradients of (h_self, h_nbr, logits, bias) for one upstream gradient."""
    out = graph_message_passing(h_self, h_nbr, logits, graph, bias, backend=backend)
    inputs = [t for t in (h_self, h_nbr, logits, bias) if t is not None]
    return out, torch.autograd.grad(out, inputs, grad_out)


def reference_run(graph, h_self, h_nbr, logits, bias, grad_out):
    indptr, indices = graph.indptr, graph.indices
    out = graph_message_passing_reference(h_self, h_nbr, logits, indptr, indices, bias)
    inputs = [t for t in (h_self, h_nbr, logits, bias) if t is not None]
    return out, torch.autograd.grad(out, inputs, grad_out)


def assert_all_close(actual, expected, atol, rtol, what):
    for k, (a, x) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.float(), x.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}[{k}]: {m}")


# (N, B, per-face logits, bias): the three landmark schemes, B = 1 and B > 1, shared and per-face logits.
CASES = [(29, 1, False, True), (68, 3, True, False), (98, 2, False, False), (98, 3, True, True)]


@pytest.mark.parametrize("n,b,per_face,with_bias", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_and_dense(backend, n, b, per_face, with_bias):
    graph = scheme_graph(n)
    h_self, h_nbr, logits, bias = sample_inputs(graph, b, 37, per_face, with_bias)
    grad_out = torch.randn(b, n, 37)
    out, grads = run(backend, graph, h_self, h_nbr, logits, bias, grad_out)
    ref_out, ref_grads = reference_run(graph, h_self, h_nbr, logits, bias, grad_out)
    assert out.shape == (b, n, 37) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert_all_close(grads, ref_grads, 1e-5, 1e-5, "grad")
    dense = graph_message_passing_dense(h_self, h_nbr, logits, graph.indptr, graph.indices, bias)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    dense_grads = torch.autograd.grad(dense, [t for t in (h_self, h_nbr, logits, bias) if t is not None], grad_out)
    assert_all_close(grads, dense_grads, 1e-5, 1e-5, "grad vs dense")


@pytest.mark.parametrize("per_face", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, per_face):
    graph = scheme_graph(29)
    h_self, h_nbr, logits, bias = sample_inputs(graph, 0, 6, per_face, True)
    out, (g_self, g_nbr, g_logits, g_bias) = run(backend, graph, h_self, h_nbr, logits, bias, torch.zeros(0, 29, 6))
    assert out.shape == (0, 29, 6)
    assert g_self.shape == g_nbr.shape == (0, 29, 6)
    assert g_logits.shape == logits.shape and not g_logits.any()
    assert g_bias.shape == (6,) and not g_bias.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    graph = scheme_graph(68)
    b, c = 2, 11
    # The two halves of one X @ [W_self | W_nbr] (unit channel stride), and a transposed tensor (it is not).
    both = torch.randn(b, 68, 2 * c, requires_grad=True)
    h_self, h_nbr = both[..., :c], both[..., c:]
    h_nbr = h_nbr.transpose(0, 1).contiguous().transpose(0, 1)
    h_self_t = torch.randn(c, 68, b).permute(2, 1, 0).requires_grad_(True)
    logits = torch.randn(graph.num_edges, b).t().requires_grad_(True)
    bias = torch.randn(2 * c)[::2].requires_grad_(True)
    grad_out = torch.randn(b, c, 68).transpose(1, 2)
    for hs in (h_self, h_self_t):
        assert not hs.is_contiguous()
        out, grads = run(backend, graph, hs, h_nbr, logits, bias, grad_out)
        ref_out, ref_grads = reference_run(graph, hs, h_nbr, logits, bias, grad_out)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        assert_all_close(grads, ref_grads, 1e-5, 1e-5, "grad")


@pytest.mark.parametrize("dtype,tol", LOW_PRECISION, ids=["fp16", "bf16"])
@pytest.mark.parametrize("per_face", [False, True])
@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)])
def test_low_precision_accumulates_in_fp32(backend, per_face, dtype, tol):
    graph = scheme_graph(98)
    h_self, h_nbr, logits, bias = sample_inputs(graph, 2, 24, per_face, True, dtype=dtype)
    grad_out = torch.randn(2, 98, 24, dtype=dtype)
    out, grads = run(backend, graph, h_self, h_nbr, logits, bias, grad_out)
    assert out.dtype == dtype and all(g.dtype == t.dtype for g, t in zip(grads, (h_self, h_nbr, logits, bias)))
    as_fp32 = [t.detach().float().requires_grad_(True) for t in (h_self, h_nbr, logits, bias)]
    ref_out, ref_grads = reference_run(graph, *as_fp32, grad_out.float())
    torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
    assert_all_close(grads, ref_grads, tol, tol, "grad")


@needs_cpp
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("per_face", [False, True])
def test_gradcheck_cpp_float64(per_face, seed):
    torch.manual_seed(seed)
    graph = scheme_graph(29)
    h_self, h_nbr, logits, bias = sample_inputs(graph, 2, 5, per_face, True, dtype=torch.float64)
    logits = logits.detach().double().requires_grad_(True)
    fn = lambda hs, hn, lg, bi: graph_message_passing(hs, hn, lg, graph, bi, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h_self, h_nbr, logits, bias), eps=1e-6, atol=1e-6, fast_mode=seed == 1)


@needs_cpp
@pytest.mark.parametrize("per_face", [False, True])
def test_opcheck_cpp(per_face):
    graph = scheme_graph(29)
    h_self, h_nbr, logits, bias = sample_inputs(graph, 2, 7, per_face, True)
    degrees = (graph.max_deg, graph.max_in_deg)
    args = (h_self, h_nbr, logits, *op_graph_args(graph), bias, *degrees)
    torch.library.opcheck(torch.ops.structalign.graph_message_passing.default, args)
    grad_out = torch.randn(2, 29, 7)
    for mask in ([True, True, True, True], [True, False, True, False]):
        backward_args = (grad_out, h_self.detach(), h_nbr.detach(), logits.detach(), *op_graph_args(graph), *degrees,
                         mask)
        torch.library.opcheck(torch.ops.structalign.graph_message_passing_backward.default, backward_args)


@needs_triton
@pytest.mark.parametrize("per_face", [False, True])
def test_opcheck_triton(per_face):
    graph = scheme_graph(29)
    h_self, h_nbr, logits, bias = sample_inputs(graph, 2, 7, per_face, True)
    args = (h_self, h_nbr, logits, *op_graph_args(graph), bias, graph.max_deg, graph.max_in_deg)
    torch.library.opcheck(torch.ops.structalign.graph_message_passing_triton.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_cpp
def test_backward_output_mask_skips_gradients():
    graph = scheme_graph(29)
    h_self, h_nbr, logits, _ = sample_inputs(graph, 2, 7, False, False, requires_grad=False)
    grad_out = torch.randn(2, 29, 7)
    args = (grad_out, h_self, h_nbr, logits, *op_graph_args(graph), graph.max_deg, graph.max_in_deg)
    full = torch.ops.structalign.graph_message_passing_backward(*args, [True, True, True, True])
    part = torch.ops.structalign.graph_message_passing_backward(*args, [False, True, False, False])
    assert [t.numel() for t in part] == [0, 2 * 29 * 7, 0, 0]
    torch.testing.assert_close(part[1], full[1])
    torch.testing.assert_close(full[3], grad_out.sum((0, 1)))


@needs_cpp
def test_auto_backend_is_cpp_on_cpu():
    graph = scheme_graph(29)
    h_self, h_nbr, logits, bias = sample_inputs(graph, 2, 7, False, True, requires_grad=False)
    with use_backend("auto"):
        auto = graph_message_passing(h_self, h_nbr, logits, graph, bias)
    assert torch.equal(auto, graph_message_passing(h_self, h_nbr, logits, graph, bias, backend="cpp"))


@needs_cpp
def test_torch_compile_fullgraph_cpp():
    graph = scheme_graph(29)
    h_self, h_nbr, logits, bias = sample_inputs(graph, 2, 7, True, True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(hs, hn, lg, bi):
        return torch.relu(graph_message_passing(hs, hn, lg, graph, bi, backend="cpp")).sum()

    grad_out = torch.ones(())
    loss = step(h_self, h_nbr, logits, bias)
    grads = torch.autograd.grad(loss, (h_self, h_nbr, logits, bias), grad_out)
    ref = torch.relu(graph_message_passing_reference(h_self, h_nbr, logits, graph.indptr, graph.indices, bias)).sum()
    ref_grads = torch.autograd.grad(ref, (h_self, h_nbr, logits, bias), grad_out)
    torch.testing.assert_close(loss, ref)
    assert_all_close(grads, ref_grads, 1e-5, 1e-5, "grad")


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)])
def test_double_backward_is_a_clear_error(backend):
    graph = scheme_graph(29)
    h_self, h_nbr, logits, bias = sample_inputs(graph, 1, 4, False, False)
    out = graph_message_passing(h_self, h_nbr, logits, graph, backend=backend)
    (g_self,) = torch.autograd.grad((out * out).sum(), (h_self,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g_self.sum().backward()


@st.composite
def random_graphs(draw):
    n = draw(st.integers(1, 12))
    pairs = st.tuples(st.integers(0, n - 1), st.integers(0, n - 1))
    edges = draw(st.lists(pairs, max_size=3 * n))
    return LandmarkGraph.from_edges(n, edges, symmetric=draw(st.booleans()))


def _check_random_graph(backend, graph, b, c, per_face, with_bias, scale):
    h_self, h_nbr, logits, bias = sample_inputs(graph, b, c, per_face, with_bias)
    with torch.no_grad():
        logits.mul_(scale)  # large logits exercise the max-shifted softmax
    grad_out = torch.randn(b, graph.num_nodes, c)
    out, grads = run(backend, graph, h_self, h_nbr, logits, bias, grad_out)
    ref_out, ref_grads = reference_run(graph, h_self, h_nbr, logits, bias, grad_out)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert_all_close(grads, ref_grads, 1e-4, 1e-4, "grad")


@needs_cpp
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=random_graphs(), b=st.integers(1, 3), c=st.integers(1, 9), per_face=st.booleans(),
       with_bias=st.booleans(), scale=st.sampled_from([1.0, 30.0]))
def test_random_graphs_cpp(graph, b, c, per_face, with_bias, scale):
    _check_random_graph("cpp", graph, b, c, per_face, with_bias, scale)


@needs_triton
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=random_graphs(), b=st.integers(1, 2), c=st.integers(1, 9), per_face=st.booleans(),
       with_bias=st.booleans(), scale=st.sampled_from([1.0, 30.0]))
def test_random_graphs_triton(graph, b, c, per_face, with_bias, scale):
    _check_random_graph("triton", graph, b, c, per_face, with_bias, scale)


# ---- float64 is float64 on every backend --------------------------------------------------------------------------

@pytest.mark.parametrize("logits_dtype", [torch.float64, torch.float32], ids=["logits64", "logits32"])
@pytest.mark.parametrize("per_face", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_matches_a_float64_oracle(backend, per_face, logits_dtype):
    """float64 features are computed in float64 (logits too, whatever their dtype): 1e-10 relative, not 1e-7."""
    torch.manual_seed(3)
    graph = scheme_graph(68)
    h_self, h_nbr, _, bias = sample_inputs(graph, 2, 19, per_face, True, dtype=torch.float64)
    logits = (4 * torch.randn((2, graph.num_edges) if per_face else (graph.num_edges,), dtype=torch.float64))
    logits = logits.to(logits_dtype).requires_grad_(True)
    grad_out = torch.randn(2, 68, 19, dtype=torch.float64)
    out, grads = run(backend, graph, h_self, h_nbr, logits, bias, grad_out)
    inputs = (h_self, h_nbr, logits, bias)
    oracle = gmp_formula(h_self, h_nbr, logits, graph.indptr, graph.indices, bias)
    oracle_grads = torch.autograd.grad(oracle, inputs, grad_out)
    assert out.dtype == torch.float64 and grads[2].dtype == logits_dtype
    torch.testing.assert_close(out, oracle, atol=1e-12, rtol=1e-10)
    for k, (g, x) in enumerate(zip(grads, oracle_grads)):
        tol = 1e-10 if g.dtype == torch.float64 else 1e-6  # float32 logits get a float32 gradient
        torch.testing.assert_close(g, x.to(g.dtype), atol=tol * 1e-2, rtol=tol, msg=lambda m: f"grad[{k}]: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_features_with_float64_logits(backend):
    """The API allows logits of another float dtype: computed in the features' float32, logits' grad in float64."""
    graph = scheme_graph(29)
    h_self, h_nbr, logits, bias = sample_inputs(graph, 2, 5, True, True)
    logits64 = logits.detach().double().requires_grad_(True)
    grad_out = torch.randn(2, 29, 5)
    out, grads = run(backend, graph, h_self, h_nbr, logits64, bias, grad_out)
    ref_out, ref_grads = reference_run(graph, h_self, h_nbr, logits, bias, grad_out)
    assert out.dtype == torch.float32 and grads[2].dtype == torch.float64
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert_all_close(grads, ref_grads, 1e-5, 1e-5, "grad")


def test_transposed_graph_lists_every_incoming_edge():
    graph = scheme_graph(98)
    in_ptr, in_edges, edge_row = graph.transposed()
    for j in range(graph.num_nodes):
        incoming = in_edges[in_ptr[j]:in_ptr[j + 1]]
        assert incoming.tolist() == (graph.indices == j).nonzero().flatten().tolist()
    assert torch.equal(edge_row, torch.repeat_interleave(torch.arange(98), graph.indptr.diff()))
    assert graph.max_deg == int(graph.indptr.diff().max()) and graph.max_in_deg == int(in_ptr.diff().max())


# ---- bad input ----------------------------------------------------------------------------------------------------

def _good(b=2, c=4):
    graph = scheme_graph(29)
    h_self, h_nbr, logits, bias = sample_inputs(graph, b, c, False, True, requires_grad=False)
    return graph, h_self, h_nbr, logits, bias


@pytest.mark.parametrize("change,error,match", [
    (lambda a: {**a, "h_self": a["h_self"][0]}, ValueError, r"h_self must have shape \[B, N, C\]"),
    (lambda a: {**a, "h_nbr": a["h_nbr"][:, :5]}, ValueError, "h_nbr must match h_self's shape"),
    (lambda a: {**a, "h_self": a["h_self"][:, :5], "h_nbr": a["h_nbr"][:, :5]}, ValueError, "graph has 29"),
    (lambda a: {**a, "logits": a["logits"][:-1]}, ValueError, "logits must have shape"),
    (lambda a: {**a, "bias": a["bias"][:-1]}, ValueError, "bias must be a tensor of shape"),
    (lambda a: {**a, "h_nbr": a["h_nbr"].double()}, TypeError, "h_nbr has dtype torch.float64"),
    (lambda a: {**a, "h_self": a["h_self"].long()}, TypeError, "h_self must be a floating tensor"),
    (lambda a: {**a, "logits": a["logits"].to("meta")}, ValueError, "logits is on meta"),
    (lambda a: {**a, "graph": None}, TypeError, "graph must be a LandmarkGraph"),
])
def test_bad_input_names_the_problem(change, error, match):
    graph, h_self, h_nbr, logits, bias = _good()
    args = change(dict(h_self=h_self, h_nbr=h_nbr, logits=logits, graph=graph, bias=bias))
    with pytest.raises(error, match=match):
        graph_message_passing(**args)


@pytest.mark.parametrize("indptr,indices,match", [
    ([0, 1, 3], [0, 1, 5], "outside"),
    ([0, 1, 1, 2], [0, 2], "no entry"),
])
def test_bad_graph_is_rejected_at_construction(indptr, indices, match):
    with pytest.raises(ValueError, match=match):
        LandmarkGraph(torch.tensor(indptr), torch.tensor(indices))


@needs_cpp
@pytest.mark.parametrize("edit,match", [
    (lambda a: a.update(indices=a["indices"].clone().index_fill_(0, torch.tensor([3]), 40)),
     r"indices\[3\] = 40 is outside \[0, 29\)"),
    (lambda a: a.update(indices=a["indices"].clone().index_fill_(0, torch.tensor([0]), -1)), r"indices\[0\] = -1"),
    (lambda a: a.update(indptr=a["indptr"].clone().index_fill_(0, torch.tensor([3]), a["indptr"][2].item())),
     "node 2 has no entry"),
    (lambda a: a.update(indptr=a["indptr"] + 1), "indptr must start at 0 and end at E = 133"),
    (lambda a: a.update(indptr=a["indptr"][:-1]), "indptr must have N \\+ 1 = 30 entries"),
    (lambda a: a.update(indptr=a["indptr"].int()), "indptr must be a 1-D int64 tensor"),
    (lambda a: a.update(logits=a["logits"][:-1]), "logits must have shape"),
    (lambda a: a.update(h_nbr=a["h_nbr"].half()), "h_nbr has dtype Half but h_self has Float"),
    (lambda a: a.update(h_self=a["h_self"][0], h_nbr=a["h_nbr"][0]), r"h_self must have shape \[B, N, C\]"),
    (lambda a: a.update(bias=a["bias"][:2]), "bias must have shape"),
    (lambda a: a.update(h_self=a["h_self"].int(), h_nbr=a["h_nbr"].int()), "h_self must be float16"),
])
def test_cpp_op_called_directly_checks_its_arguments(edit, match):
    graph, h_self, h_nbr, logits, bias = _good()
    in_ptr, in_edges, edge_row = graph.transposed()
    args = dict(h_self=h_self, h_nbr=h_nbr, logits=logits, indptr=graph.indptr, indices=graph.indices, in_ptr=in_ptr,
                in_edges=in_edges, edge_row=edge_row, bias=bias, max_deg=graph.max_deg, max_in_deg=graph.max_in_deg)
    edit(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.structalign.graph_message_passing(*args.values())
    grad_out = torch.randn(2, 29, 4)
    backward_args = [args[k] for k in ("h_self", "h_nbr", "logits", "indptr", "indices", "in_ptr", "in_edges",
                                       "edge_row", "max_deg", "max_in_deg")]
    if args["bias"] is bias:  # the backward has no bias argument
        with pytest.raises(RuntimeError, match=match):
            torch.ops.structalign.graph_message_passing_backward(grad_out, *backward_args, [True] * 4)


@needs_cpp
def test_cpp_backward_checks_grad_out():
    graph, h_self, h_nbr, logits, _ = _good()
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        torch.ops.structalign.graph_message_passing_backward(torch.randn(2, 29, 3), h_self, h_nbr, logits,
                                                             *op_graph_args(graph), graph.max_deg, graph.max_in_deg,
                                                             [True] * 4)
