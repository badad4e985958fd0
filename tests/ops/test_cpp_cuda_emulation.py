"""The CUDA kernels (csrc/cuda/*_kernels.cuh), run on the CPU by an emulation of the CUDA execution model, against
the float64 formulas of test_cpp_ops.py.

    python -m pytest -q tests/ops/test_cpp_cuda_emulation.py

csrc/testing/cuda_emulation.h runs every thread of a block as a fiber, block barrier to block barrier (and warp
shuffle to warp shuffle), in ascending or descending thread order; csrc/testing/emulated_ops.cpp mirrors the
launchers (vectorisation test, tiling, shared-memory plan). So without a GPU these tests check the kernels' results,
that two thread orders give the same bits (a missing barrier would show), that every barrier is reached by all
threads, the alignment of vector accesses, and the device-side checks of malformed graphs. Timing, real memory
ordering and bank conflicts need a GPU (tests/ops/test_ops_cuda.py, compute-sanitizer in tools/gpu_check.py).

STRUCTALIGN_EMULATION_CFLAGS adds compiler flags, e.g. an AddressSanitizer run over every global-memory access:
    STRUCTALIGN_EMULATION_CFLAGS="-fsanitize=address" ASAN_OPTIONS=detect_leaks=0 \
    LD_PRELOAD=$(g++ -print-file-name=libasan.so) python -m pytest -q tests/ops/test_cpp_cuda_emulation.py
"""
import ctypes
import hashlib
import os
import shutil
import subprocess

import pytest
import torch

from test_cpp_ops import (CRITERIA, WING, assert_close64, gmp_formula_grads, laplacian_args, malformed_graphs,
                          pairs_args, rll_formula_grad, rll_inputs, scheme_graph)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = [os.path.join(ROOT, "csrc", "testing", "emulated_ops.cpp"), os.path.join(ROOT, "csrc", "testing",
                                                                                  "cuda_emulation.h")]
CUDA_INCLUDE = next((p for p in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include"),
                                 "/usr/local/cuda/include") if os.path.isfile(os.path.join(p, "cuda_fp16.h"))), None)
pytestmark = pytest.mark.skipif(CUDA_INCLUDE is None or shutil.which("g++") is None,
                                reason="needs g++ and the CUDA headers (cuda_fp16.h)")
DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
BIG = 1 << 30  # shared-memory budget that fits anything
H100 = 227 * 1024
A100 = 163 * 1024
I64, INT = ctypes.c_int64, ctypes.c_int


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """The emulation library, built once per source version."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(os.path.join(ROOT, "csrc", "cuda"))) + ["common_math.h", "graph_conv_math.h",
                                                                         "graph_message_passing_math.h",
                                                                         "relative_location_loss_math.h"]:
        path = os.path.join(ROOT, "csrc", "cuda", name) if name.endswith(".cuh") else os.path.join(ROOT, "csrc", name)
        if os.path.isfile(path):
            digest.update(open(path, "rb").read())
    for path in SOURCES:
        digest.update(open(path, "rb").read())
    flags = os.environ.get("STRUCTALIGN_EMULATION_CFLAGS", "").split()
    digest.update(" ".join(flags).encode())
    out = tmp_path_factory.getbasetemp().parent / f"structalign_emu_{digest.hexdigest()[:16]}.so"
    if not out.exists():
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["g++", "-std=c++20", "-O1", "-g", "-shared", "-fPIC", "-Wno-attributes", "-I",
               os.path.join(ROOT, "csrc"), "-I", CUDA_INCLUDE, *flags, SOURCES[0], "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-4000:]
        os.replace(tmp, out)
    return ctypes.CDLL(str(out))


def ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def call(fn, *args):
    error = ctypes.create_string_buffer(1024)
    rc = fn(*args, error, I64(len(error)))
    if rc != 0:
        raise RuntimeError(error.value.decode())


# ---- graph_message_passing -------------------------------------------------------------------------------------------

def emu_forward(lib, h_self, h_nbr, logits, g, bias=None, budget=BIG, reverse=False):
    """out of the emulated forward kernel, and whether the vectorised kernel ran."""
    b, n, c = h_self.shape
    e = g[1].numel()
    out = torch.empty(b, n, c, dtype=h_self.dtype)
    lg = logits.to(acc_dtype(h_self.dtype)).contiguous()
    vec = ctypes.c_int()
    call(lib.emu_gmp_forward, INT(DTYPES[h_self.dtype]), ptr(h_self), I64(h_self.stride(0)), I64(h_self.stride(1)),
         ptr(h_nbr), I64(h_nbr.stride(0)), I64(h_nbr.stride(1)), ptr(lg), I64(e if lg.dim() == 2 else 0), ptr(g[0]),
         ptr(g[1]), ptr(bias), ptr(out), I64(b), I64(n), I64(c), I64(e), I64(g[5]), I64(budget), INT(reverse),
         ctypes.byref(vec))
    return out, bool(vec.value)


def emu_backward(lib, grad_out, h_self, h_nbr, logits, g, mask=(True, True, True, True), budget=BIG, reverse=False,
                 grad_h=None):
    """(grad h_self, grad h_nbr, grad logits, grad bias) as the launcher returns them, and whether it vectorised.
    grad_h (Tensor[B, N, 2C] or None): write grad h_self / grad h_nbr into its two halves (graph_conv's layout)."""
    b, n, c = h_self.shape
    e = g[1].numel()
    acc = acc_dtype(h_self.dtype)
    lg = logits.to(acc).contiguous()
    halves = (None, None) if grad_h is None else (grad_h[..., :c], grad_h[..., c:])
    outs = [(halves[0] if grad_h is not None else torch.empty(b, n, c, dtype=h_self.dtype)) if mask[0] else None,
            (halves[1] if grad_h is not None else torch.empty(b, n, c, dtype=h_self.dtype)) if mask[1] else None,
            torch.empty(b, e, dtype=acc) if mask[2] else None, torch.empty(b, c, dtype=acc) if mask[3] else None]
    strides = (grad_h.stride(0), grad_h.stride(1)) if grad_h is not None else (n * c, c)
    vec = ctypes.c_int()
    call(lib.emu_gmp_backward, INT(DTYPES[h_self.dtype]), ptr(grad_out), I64(grad_out.stride(0)),
         I64(grad_out.stride(1)), ptr(h_self), I64(h_self.stride(0)), I64(h_self.stride(1)), ptr(h_nbr),
         I64(h_nbr.stride(0)), I64(h_nbr.stride(1)), ptr(lg), I64(e if lg.dim() == 2 else 0), *map(ptr, g[:5]),
         *map(ptr, outs[:2]), I64(strides[0]), I64(strides[1]), *map(ptr, outs[2:]), I64(b), I64(n), I64(c), I64(e),
         I64(g[5]), I64(g[6]), I64(budget), INT(reverse), ctypes.byref(vec))
    gh, gn, gl, gb = outs
    if gl is not None:
        gl = (gl if logits.dim() == 2 else gl.sum(0)).to(logits.dtype)
    if gb is not None:
        gb = gb.sum(0).to(h_self.dtype)
    return (gh, gn, gl, gb), bool(vec.value)


def gmp_inputs(g, b, c, per_face, dtype=torch.float64):
    n, e = g[0].numel() - 1, g[1].numel()
    h_self, h_nbr = torch.randn(b, n, c, dtype=dtype), torch.randn(b, n, c, dtype=dtype)
    logits = torch.randn(*((b, e) if per_face else (e,)), dtype=torch.float64) * 2
    return h_self, h_nbr, logits, torch.randn(c, dtype=dtype), torch.randn(b, n, c, dtype=dtype)


# C: vectorised (2 / 16 / 64 / 130 channels of fp64 are whole 16-byte vectors) and one or several channel tiles;
# 37 channels fall back to scalar loads.
@pytest.mark.parametrize("n,b,c,per_face", [(29, 2, 2, False), (98, 2, 16, True), (68, 1, 37, True),
                                            (29, 2, 64, False), (29, 1, 130, True)])
def test_gmp_float64_matches_formula(lib, n, b, c, per_face):
    g = scheme_graph(n)
    h_self, h_nbr, logits, bias, grad_out = gmp_inputs(g, b, c, per_face)
    ref = gmp_formula_grads(h_self, h_nbr, logits, g[0], g[1], bias, grad_out)
    out, vec = emu_forward(lib, h_self, h_nbr, logits, g, bias)
    assert vec == (c % 2 == 0)
    assert_close64(out, ref[0], what="out")
    grads, _ = emu_backward(lib, grad_out, h_self, h_nbr, logits, g)
    for k, name in enumerate(("grad h_self", "grad h_nbr", "grad logits", "grad bias")):
        assert_close64(grads[k], ref[k + 1], what=name)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("c", [8, 40, 96])
def test_gmp_low_precision(lib, dtype, tol, c):
    g = scheme_graph(29)
    h_self, h_nbr, logits, bias, grad_out = gmp_inputs(g, 2, c, True, dtype)
    logits = logits.float()
    ref = gmp_formula_grads(h_self, h_nbr, logits, g[0], g[1], bias, grad_out)
    out, vec = emu_forward(lib, h_self, h_nbr, logits, g, bias)
    assert vec == (c * dtype.itemsize % 16 == 0)
    grads, _ = emu_backward(lib, grad_out, h_self, h_nbr, logits, g)
    for k, (actual, expected) in enumerate(zip((out, *grads), ref)):
        torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=tol, msg=lambda m: f"[{k}] {m}")


def test_gmp_thread_order_and_tile_width_do_not_change_bits(lib):
    """Ascending vs descending thread order (a race would differ), and narrow tiles forced by a small shared-memory
    budget (the tile loop of the backward, partial dot products over several tiles) give the same bits."""
    g = scheme_graph(29)
    h_self, h_nbr, logits, bias, grad_out = gmp_inputs(g, 2, 96, True, torch.float32)
    logits = logits.float()
    out, _ = emu_forward(lib, h_self, h_nbr, logits, g, bias)
    grads, _ = emu_backward(lib, grad_out, h_self, h_nbr, logits, g)
    out_rev, _ = emu_forward(lib, h_self, h_nbr, logits, g, bias, reverse=True)
    grads_rev, _ = emu_backward(lib, grad_out, h_self, h_nbr, logits, g, reverse=True)
    assert torch.equal(out, out_rev)
    for a, x in zip(grads, grads_rev):
        assert torch.equal(a, x)
    # One 16-byte vector a row: 24 tiles instead of 3; same math, another summation order for the dot products.
    small = 29 * 16 + 7 * 1024
    out_narrow, _ = emu_forward(lib, h_self, h_nbr, logits, g, bias, budget=small)
    grads_narrow, _ = emu_backward(lib, grad_out, h_self, h_nbr, logits, g, budget=small)
    torch.testing.assert_close(out_narrow, out, rtol=0, atol=0)
    for a, x in zip(grads_narrow, grads):
        torch.testing.assert_close(a, x, rtol=1e-6, atol=1e-6)
    no_bias = (True, True, True, False)  # the tile loop without the grad-bias barrier
    grads_up, _ = emu_backward(lib, grad_out, h_self, h_nbr, logits, g, no_bias, budget=small)
    grads_down, _ = emu_backward(lib, grad_out, h_self, h_nbr, logits, g, no_bias, budget=small, reverse=True)
    for a, x, y in zip(grads_up[:3], grads_down[:3], grads_narrow[:3]):
        assert torch.equal(a, x) and torch.equal(a, y)
    with pytest.raises(RuntimeError, match="does not fit shared memory"):
        emu_forward(lib, h_self, h_nbr, logits, g, bias, budget=1024)


def test_gmp_strided_and_misaligned_inputs(lib):
    """Row strides are read in place (vectorised when they allow it); an offset of one element (not 16-byte aligned)
    takes the scalar kernel; grad_out with strides (N * C, C, 1) of a wider buffer is read in place."""
    g = scheme_graph(29)
    b, n, c = 2, 29, 16
    wide = torch.randn(b, n, 3 * c + 1)
    logits = torch.randn(b, g[1].numel())
    for h_self, h_nbr, vectorised in ((wide[..., :c], wide[..., c:2 * c], False),  # row stride 3C + 1
                                      (wide[..., 1:c + 1], wide[..., c + 1:2 * c + 1], False)):
        ref = gmp_formula_grads(h_self, h_nbr, logits, g[0], g[1], None, torch.zeros(b, n, c))
        out, vec = emu_forward(lib, h_self, h_nbr, logits, g)
        assert vec == vectorised
        torch.testing.assert_close(out.double(), ref[0], rtol=1e-5, atol=1e-5)
    aligned = torch.randn(b, n, 2 * c)
    h_self, h_nbr = aligned[..., :c], aligned[..., c:]
    grad_out = torch.randn(b, n, 4 * c)[..., c:2 * c]
    ref = gmp_formula_grads(h_self, h_nbr, logits, g[0], g[1], None, grad_out)
    out, vec = emu_forward(lib, h_self, h_nbr, logits, g)
    assert vec
    grads, vec = emu_backward(lib, grad_out, h_self, h_nbr, logits, g, (True, True, True, False))
    assert vec
    for k in range(3):
        torch.testing.assert_close(grads[k].double(), ref[k + 1], rtol=1e-5, atol=1e-5)


def test_gmp_output_mask(lib):
    g = scheme_graph(29)
    h_self, h_nbr, logits, bias, grad_out = gmp_inputs(g, 2, 6, False)
    full, _ = emu_backward(lib, grad_out, h_self, h_nbr, logits, g)
    for mask in ((True, False, False, False), (False, True, False, True), (False, False, True, False)):
        part, _ = emu_backward(lib, grad_out, h_self, h_nbr, logits, g, mask)
        for need, a, x in zip(mask, part, full):
            assert (a is None) != need
            if need:
                assert torch.equal(a, x)


@pytest.mark.parametrize("name,graph,message", malformed_graphs(), ids=[m[0] for m in malformed_graphs()])
def test_gmp_device_checks_reject_malformed_graphs(lib, name, graph, message):
    """The kernels' device checks stop a malformed graph before any out-of-bounds access, as the CPU checks do."""
    device_message = {"indptr[0] != 0": "indptr must start at 0", "empty row": "indptr must increase strictly",
                      "index out of range": "indices holds a node outside", "duplicate neighbour": "twice",
                      "row longer than max_deg": "max_deg", "in-degree above max_in_deg": "max_in_deg",
                      "in_edges out of order": "in_edges must list", "wrong edge_row": "edge_row"}[name]
    h_self, h_nbr, logits, bias, grad_out = gmp_inputs(scheme_graph(29), 2, 4, False)
    if name not in ("in-degree above max_in_deg", "in_edges out of order", "wrong edge_row"):
        with pytest.raises(RuntimeError, match=device_message):
            emu_forward(lib, h_self, h_nbr, logits, graph, bias)
    with pytest.raises(RuntimeError, match=device_message):
        emu_backward(lib, grad_out, h_self, h_nbr, logits, graph)


# ---- graph_conv ------------------------------------------------------------------------------------------------------

def emu_graph_conv(lib, h, logits, g, bias, gamma, beta, stats, residual, norm, relu, grad_out, blocks=0,
                   reverse=False):
    """graph_conv forward and backward as csrc/cuda/graph_conv.cu composes its kernels (aggregation, Welford
    statistics, epilogue; sums, prologue, aggregation backward into the halves of grad_h), every kernel emulated.
    Returns (out, batch mean, batch var, grad_h, grad_logits, grad_bias, grad gamma, grad beta)."""
    b, n, c2 = h.shape
    c = c2 // 2
    acc = acc_dtype(h.dtype)
    y, _ = emu_forward(lib, h[..., :c], h[..., c:], logits, g, bias, reverse=reverse)
    var = None
    if norm == "batch":
        var, mean = torch.var_mean(y.reshape(-1, c).to(acc), 0, correction=0)
    elif norm == "given":
        mean, var = (t.to(acc) for t in stats)
    if norm == "none":
        invstd, scale, shift, mean = torch.ones(c, dtype=acc), torch.ones(c, dtype=acc), torch.zeros(c, dtype=acc), \
            torch.zeros(c, dtype=acc)
    else:
        invstd = (var + 1e-5).rsqrt()
        scale = gamma.to(acc) * invstd
        shift = beta.to(acc) - mean * scale
    out = torch.empty_like(y)
    call(lib.emu_gconv_epilogue, INT(DTYPES[h.dtype]), ptr(y), ptr(scale), ptr(shift), ptr(residual), ptr(out),
         I64(b * n), I64(c), INT(relu), I64(blocks), INT(reverse))
    rows = b * n
    partial = torch.empty((rows + 63) // 64, 2 * c, dtype=acc)
    call(lib.emu_gconv_sums, INT(DTYPES[h.dtype]), ptr(grad_out), ptr(y), ptr(scale), ptr(shift), ptr(mean),
         ptr(partial), I64(rows), I64(c), INT(relu), INT(reverse))
    sums = partial.sum(0)
    sum_gz, sum_gzx = sums[:c], sums[c:] * invstd
    k0 = scale * sum_gz / rows if norm == "batch" else torch.zeros(c, dtype=acc)
    ky = scale * invstd * sum_gzx / rows if norm == "batch" else torch.zeros(c, dtype=acc)
    grad_y = torch.empty_like(y)
    call(lib.emu_gconv_prologue, INT(DTYPES[h.dtype]), ptr(grad_out), ptr(y), ptr(scale), ptr(shift), ptr(mean),
         ptr(k0), ptr(ky), ptr(grad_y), I64(rows), I64(c), INT(relu), I64(blocks), INT(reverse))
    grad_h = torch.full_like(h, float("nan"))
    (_, _, gl, gb), _ = emu_backward(lib, grad_y, h[..., :c], h[..., c:], logits, g, reverse=reverse, grad_h=grad_h)
    return out, mean, var, grad_h, gl, gb, sum_gzx, sum_gz


def graph_conv_cpu(h, logits, g, bias, gamma, beta, stats, residual, norm, relu, grad_out):
    """The same quantities from the C++ CPU ops (tested against the unfused reference in test_graph_conv.py)."""
    code = {"none": 0, "batch": 1, "given": 2}[norm]
    given = stats if norm == "given" else (None, None)
    out, y, mean, var = torch.ops.structalign.graph_conv(h, logits, *g[:5], bias, gamma, beta, *given, residual, code,
                                                         1e-5, relu, g[5], g[6])
    saved = (mean, var) if norm == "batch" else given
    gh, gl, gb, gg, gbeta = torch.ops.structalign.graph_conv_backward(grad_out, h, y, logits, *g[:5], gamma, beta,
                                                                      *saved, code, 1e-5, relu, g[5], g[6],
                                                                      [True] * 5)
    return out, mean, var, gh, gl, gb, gg, gbeta


@pytest.mark.parametrize("norm,relu,residual", [("batch", True, True), ("given", True, False),
                                                ("none", False, True), ("none", True, False)])
@pytest.mark.parametrize("dtype,c", [(torch.float64, 130), (torch.float32, 16), (torch.float32, 37)])
def test_graph_conv_kernels_match_the_cpu_op(lib, norm, relu, residual, dtype, c):
    """The CUDA kernels of graph_conv, composed as the launcher composes them, give the CPU op's outputs and
    gradients (float64: to 1e-10; the halves of h and of grad_h strided, vectorised when C allows it)."""
    g = scheme_graph(68)
    b = 3
    h = torch.randn(b, 68, 2 * c, dtype=dtype)
    logits = torch.randn(b, g[1].numel(), dtype=dtype)
    bias, gamma, beta = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    stats = (torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5)
    res = torch.randn(b, 68, c, dtype=dtype) if residual else None
    grad_out = torch.randn(b, 68, c, dtype=dtype)
    args = (h, logits, g, bias, gamma, beta, stats, res, norm, relu, grad_out)
    emulated, cpu = emu_graph_conv(lib, *args, blocks=3), graph_conv_cpu(*args)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    names = ("out", "mean", "var", "grad_h", "grad_logits", "grad_bias", "grad gamma", "grad beta")
    for name, a, e in zip(names, emulated, cpu):
        if name in ("mean", "var") and norm != "batch":
            continue
        if name in ("grad gamma", "grad beta") and norm == "none":
            continue
        scale = max(e.abs().max().item(), 1.0) * (b * 68 if name == "grad_bias" and norm == "batch" else 1)
        torch.testing.assert_close(a.to(e.dtype), e, atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}")


def test_graph_conv_kernels_are_thread_order_independent(lib):
    g = scheme_graph(29)
    c = 24
    h = torch.randn(2, 29, 2 * c)
    args = (h, torch.randn(g[1].numel()), g, torch.randn(c), torch.rand(c) + 0.5, torch.randn(c),
            None, torch.randn(2, 29, c), "batch", True, torch.randn(2, 29, c))
    up, down = emu_graph_conv(lib, *args), emu_graph_conv(lib, *args, reverse=True)
    for a, x in zip(up, down):
        assert torch.equal(a, x)


# ---- relative_location_loss ------------------------------------------------------------------------------------------

def emu_rll(lib, pred, target, rel, lw=None, criterion="soft_wing", reduction="mean", need_grad=True, grad_out=None,
            budget=BIG, grid=2, reverse=False):
    """(loss, grad) as the launcher returns them, and the kernel's plan (staged tables, g in shared memory, group)."""
    b, n, _ = pred.shape
    r, m = rel[0].numel(), rel[2].numel()
    acc = acc_dtype(pred.dtype)
    backward = grad_out is not None
    none = reduction == "none"
    need_grad = backward or (need_grad and not none)
    grid = min(grid, b)
    loss_none = torch.empty(b, r, 2, dtype=acc) if none and not backward else None
    grad = torch.empty(b, n, 2, dtype=acc) if need_grad else None
    partial = torch.empty(grid, 2, dtype=torch.float64)
    count = b * r * 2
    grad_scale = 1.0 / count if (not backward and reduction == "mean" and lw is None) else 1.0
    lw_acc = None if lw is None else lw.to(acc).contiguous()
    go = None if grad_out is None else grad_out.to(acc).contiguous()
    plan = (ctypes.c_int * 3)()
    call(lib.emu_rll, INT(DTYPES[pred.dtype]), ptr(pred), *(I64(s) for s in pred.stride()), ptr(target),
         *(I64(s) for s in target.stride()), ptr(lw_acc), *map(ptr, rel), ptr(go), ptr(loss_none), ptr(grad),
         ptr(partial), I64(b), I64(n), I64(r), I64(m), I64(CRITERIA[criterion]), *map(ctypes.c_double, WING),
         ctypes.c_double(grad_scale), I64(budget), I64(grid), INT(reverse), plan)
    plan = tuple(plan)
    if backward:
        return grad, plan
    if none:
        return (loss_none, grad), plan
    sums = partial.sum(0)
    loss = sums[0]
    if reduction == "mean":
        if lw is not None:
            scale = 1.0 / (2 * sums[1]).clamp_min(1e-12)
            loss = loss * scale
            grad = grad * scale.to(acc) if grad is not None else None
        else:
            loss = loss / max(count, 1)
    return (loss.to(acc), grad), plan


@pytest.mark.parametrize("relations", ["laplacian", "pairs"])
@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("reduction,weighted", [("mean", False), ("mean", True), ("sum", False), ("none", True)])
def test_rll_float64_matches_formula(lib, relations, criterion, reduction, weighted):
    n = 29
    rel = (laplacian_args if relations == "laplacian" else pairs_args)(n, torch.float64)
    pred, target, lw = rll_inputs(3, n, weighted=weighted)
    (loss, grad), _ = emu_rll(lib, pred, target, rel, lw, criterion, reduction)
    ref_loss, ref_grad = rll_formula_grad(pred, target, rel, lw, criterion, reduction,
                                          torch.zeros(3, rel[0].numel(), 2) if reduction == "none" else None)
    assert loss.dtype == torch.float64
    assert_close64(loss, ref_loss, what="loss")
    if reduction == "none":
        assert grad is None
        grad_out = torch.randn(3, rel[0].numel(), 2, dtype=torch.float64)
        _, ref_grad = rll_formula_grad(pred, target, rel, lw, criterion, reduction, grad_out)
        grad, _ = emu_rll(lib, pred, target, rel, lw, criterion, grad_out=grad_out)
    assert_close64(grad, ref_grad, what="grad")


# Plans: tables and per-relation gradients in shared memory (H100 budget), gradients only (A100 for all pairs of
# 98 landmarks in float64), neither (a small budget: the per-block global scratch).
@pytest.mark.parametrize("relations,dtype,budget,expected_plan", [
    ("pairs", torch.float32, H100, (1, 1, 32)),
    ("pairs", torch.float64, A100, (0, 1, 32)),
    ("laplacian", torch.float32, 1536, (0, 0, 4)),
    ("laplacian", torch.float16, H100, (1, 1, 4)),
])
def test_rll_plans_persistent_grid_and_thread_order(lib, relations, dtype, budget, expected_plan):
    """Each plan, a grid smaller than the batch (blocks loop over faces, prefetching the next face's errors), and
    both thread orders give the formula's values; the two orders give the same bits."""
    n, b = 98, 5
    acc = acc_dtype(dtype)
    rel = (laplacian_args if relations == "laplacian" else pairs_args)(n, acc)
    pred, target, lw = rll_inputs(b, n, dtype, weighted=True)
    (loss, grad), plan = emu_rll(lib, pred, target, rel, lw, budget=budget, grid=2)
    assert plan == expected_plan
    (loss_rev, grad_rev), _ = emu_rll(lib, pred, target, rel, lw, budget=budget, grid=2, reverse=True)
    assert torch.equal(loss, loss_rev) and torch.equal(grad, grad_rev)
    (loss_one, grad_one), _ = emu_rll(lib, pred, target, rel, lw, budget=budget, grid=b)
    # The grid changes the order in which the blocks' partial sums (loss, relation weights) are added.
    torch.testing.assert_close(loss_one, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_one, grad, rtol=1e-6, atol=0)
    ref_loss, ref_grad = rll_formula_grad(pred, target, rel, lw, "soft_wing", "mean")
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item())


def test_rll_strided_pred(lib):
    rel = laplacian_args(29, torch.float32)
    pred, target, _ = rll_inputs(3, 29, torch.float32)
    strided = torch.empty(29, 3, 4).transpose(0, 1)[..., 1:3]
    strided.copy_(pred)
    (loss, grad), _ = emu_rll(lib, strided, target, rel)
    (ref_loss, ref_grad), _ = emu_rll(lib, pred, target, rel)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)


@pytest.mark.parametrize("staged", [True, False])
def test_rll_device_checks_reject_malformed_tables(lib, staged):
    rel = list(laplacian_args(29, torch.float32))
    pred, target, _ = rll_inputs(2, 29, torch.float32)
    budget = BIG if staged else 4 * 1024
    cases = [(2, lambda t: t.index_fill(0, torch.tensor([0]), 29), "member outside"),
             (0, lambda t: t.index_fill(0, torch.tensor([1]), -1), "anchor outside"),
             (1, lambda t: t.index_fill(0, torch.tensor([0]), 1), "indptr must"),
             (4, lambda t: t.index_fill(0, torch.tensor([3]), 10 ** 6), "point_ptr must"),
             (5, lambda t: t.index_fill(0, torch.tensor([2]), 10 ** 6), "point_rel outside")]
    for k, change, message in cases:
        bad = list(rel)
        bad[k] = change(rel[k].clone())
        with pytest.raises(RuntimeError, match=message):
            emu_rll(lib, pred, target, tuple(bad), budget=budget)
