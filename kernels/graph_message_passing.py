"""Triton kernels of graph_message_passing (structalign.ops.graph_message_passing, method.md §1.3-1.4).

    A_i. = softmax over row i of the CSR graph of the logits
    out_i = sum_e A_e v_e (+ bias),  v_e = h_self_i on the self loop (indices[e] == i), h_nbr_j otherwise

A program owns BLOCK_R rows (nodes) of one face. Row lengths vary, so the rows' edges are a [BLOCK_R, DEG] tile
(DEG: a power of two >= the longest row, masked), whose softmax is computed once per edge; the aggregation walks
its MAX_DEG columns (a static loop), each column taken out of the tile with a masked row sum. Every index and
softmax gather is a 2-D tile load. (Gathering grad h_nbr with per-column 1-D loads instead, in_edges -> edge_row ->
softmax masked by a test on the loaded edge_row, broadcast into the [16, 128] tile of 64 < C <= 128, does not
compile: with the runtime's divisibility attributes, TritonGPURemoveLayoutConversions rewrites that last load with a
mask layout other than its pointer's, "'tt.load' op failed to verify that mask type matches ptr type".)

Feature tiles are [BLOCK_C, BLOCK_R] (channels x rows) and read through the tensors' strides. Triton orders a
load's lanes along the axis it can prove contiguous (channels when the channel stride is 1), and along the last
axis, rows, when it can prove neither: so gathering rows of a node-contiguous tensor (the model's grad_out, with
strides (N*C, 1, N) after GraphBlock's transpose -> BatchNorm) reads each channel's contiguous node vector instead
of one sector per element, and nothing is copied. The backward's grad h_self / grad h_nbr take grad_out's layout.

The backward recomputes the softmax from the logits into a small [1 or B, E] buffer (_softmax_kernel); then one
program per row tile computes grad logits, grad h_self, a partial sum of grad bias, and gathers grad h_nbr over the
transposed graph (in_ptr / in_edges / edge_row). No atomics: every result is bitwise reproducible.

Computation is in float64 for float64 features and in float32 otherwise (logits are cast in the kernel).
Launchers take the arguments of the C++ ops (csrc/graph_message_passing.cpp) and launch through wrap_triton, so
they can be the body of a torch.library.triton_op.

    python -m pytest -q tests/test_triton_kernels.py tests/test_triton_compile.py
"""
import torch
import triton
import triton.language as tl

from structalign_kernels import acc_dtype, device_of, launch


@triton.jit
def _edge_tile(ptr_ptr, rows, row_ok, DEG: tl.constexpr):
    """Entries ptr[i]:ptr[i + 1] of BLOCK_R rows as a [BLOCK_R, DEG] tile: (ids int64, mask, slot ids, counts)."""
    start = tl.load(ptr_ptr + rows, mask=row_ok, other=0)
    count = tl.load(ptr_ptr + rows + 1, mask=row_ok, other=0) - start
    slots = tl.arange(0, DEG)
    return start[:, None] + slots[None, :], slots[None, :] < count[:, None], slots, count


@triton.jit
def _softmax_tile(logits_ptr, logits_se, edge, edge_ok, ACC: tl.constexpr):
    """Row softmax ([BLOCK_R, DEG], ACC) of the logits of an edge tile; 0 on masked slots."""
    logit = tl.load(logits_ptr + edge * logits_se, mask=edge_ok, other=-float("inf")).to(ACC)
    peak = tl.max(logit, axis=1)
    peak = tl.where(peak == -float("inf"), 0.0, peak)
    ex = tl.where(edge_ok, tl.exp(logit - peak[:, None]), 0.0)
    total = tl.sum(ex, axis=1)
    return ex / tl.where(total > 0, total, 1.0)[:, None]


@triton.jit
def _rows(ptr, rows, stride_n, chans, stride_c, row_mask, ch_ok):
    """Rows of a [N, C] matrix as a [BLOCK_C, BLOCK_R] tile (channels x rows); 0 where masked."""
    return tl.load(ptr + chans[:, None] * stride_c + rows[None, :] * stride_n,
                   mask=ch_ok[:, None] & row_mask[None, :], other=0.0)


@triton.jit
def _column(tile, slots, k):
    """Column k of a [BLOCK_R, DEG] tile as a [BLOCK_R] vector."""
    return tl.sum(tl.where(slots[None, :] == k, tile, 0), axis=1)


@triton.jit
def _fwd_kernel(
    hs_ptr, hs_sb, hs_sn, hs_sc, hn_ptr, hn_sb, hn_sn, hn_sc, logits_ptr, logits_sb, logits_se,
    indptr_ptr, indices_ptr, bias_ptr, bias_s, out_ptr, N, C,
    HAS_BIAS: tl.constexpr, FP64: tl.constexpr, MAX_DEG: tl.constexpr, DEG: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out (Tensor[B, N, C], contiguous) for grid (B, cdiv(N, BLOCK_R), cdiv(C, BLOCK_C))."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < N
    ch_ok = chans < C
    edge, edge_ok, slots, deg = _edge_tile(indptr_ptr, rows, row_ok, DEG)
    attn = _softmax_tile(logits_ptr + pid_b * logits_sb, logits_se, edge, edge_ok, ACC)
    nbr = tl.load(indices_ptr + edge, mask=edge_ok, other=0).to(tl.int32)
    hs = hs_ptr + pid_b * hs_sb
    hn = hn_ptr + pid_b * hn_sb

    acc = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
    for k in tl.static_range(MAX_DEG):
        a_k = _column(attn, slots, k)
        j_k = _column(nbr, slots, k)
        live = row_ok & (k < deg)
        v_self = _rows(hs, rows, hs_sn, chans, hs_sc, live & (j_k == rows), ch_ok).to(ACC)
        v_nbr = _rows(hn, j_k, hn_sn, chans, hn_sc, live & (j_k != rows), ch_ok).to(ACC)
        acc += a_k[None, :] * (v_self + v_nbr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + chans * bias_s, mask=ch_ok, other=0.0).to(ACC)[:, None]
    out = out_ptr + pid_b * N * C + chans[:, None] + rows[None, :] * C
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ch_ok[:, None] & row_ok[None, :])


@triton.jit
def _softmax_kernel(logits_ptr, logits_sb, logits_se, indptr_ptr, attn_ptr, N, E,
                    DEG: tl.constexpr, BLOCK_R: tl.constexpr):
    """attn (Tensor[S, E], contiguous, accumulation dtype): row softmax of the logits of softmax set
    program_id(0) (a face, or the one shared set), for grid (S, cdiv(N, BLOCK_R))."""
    pid_s = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    edge, edge_ok, _, _ = _edge_tile(indptr_ptr, rows, row_ok, DEG)
    attn = _softmax_tile(logits_ptr + pid_s * logits_sb, logits_se, edge, edge_ok, attn_ptr.dtype.element_ty)
    tl.store(attn_ptr + pid_s * E + edge, attn, mask=edge_ok)


@triton.jit
def _bwd_kernel(
    go_ptr, go_sb, go_sn, go_sc, hs_ptr, hs_sb, hs_sn, hs_sc, hn_ptr, hn_sb, hn_sn, hn_sc,
    attn_ptr, attn_sb, indptr_ptr, indices_ptr, in_ptr_ptr, in_edges_ptr, edge_row_ptr,
    grad_hs_ptr, grad_hn_ptr, gh_sb, gh_sn, gh_sc, grad_logits_ptr, grad_bias_ptr, N, C, E,
    NEED_HS: tl.constexpr, NEED_HN: tl.constexpr, NEED_LOGITS: tl.constexpr, NEED_BIAS: tl.constexpr,
    MAX_DEG: tl.constexpr, DEG: tl.constexpr, MAX_IN_DEG: tl.constexpr, IN_DEG: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """For grid (B, cdiv(N, BLOCK_R)), BLOCK_C >= C (a row's dot products need all its channels): grad_hs,
    grad_hn (Tensor[B, N, C], strides gh_*); grad_logits (Tensor[B, E], contiguous); grad_bias (Tensor[programs,
    C]: each program's sum of grad_out). attn (Tensor[1 or B, E]) holds the softmax in the accumulation dtype."""
    ACC: tl.constexpr = attn_ptr.dtype.element_ty
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    chans = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    ch_ok = chans < C
    go = go_ptr + pid_b * go_sb
    attn_b = attn_ptr + pid_b * attn_sb
    g = _rows(go, rows, go_sn, chans, go_sc, row_ok, ch_ok).to(ACC)
    out_offs = pid_b * gh_sb + chans[:, None] * gh_sc + rows[None, :] * gh_sn
    out_ok = ch_ok[:, None] & row_ok[None, :]

    if NEED_HS or NEED_LOGITS:
        edge, edge_ok, slots, deg = _edge_tile(indptr_ptr, rows, row_ok, DEG)
        attn = tl.load(attn_b + edge, mask=edge_ok, other=0.0)
        nbr = tl.load(indices_ptr + edge, mask=edge_ok, other=0).to(tl.int32)
        if NEED_HS:
            # grad h_self_i = A_ii g_i.
            a_self = tl.sum(tl.where(nbr == rows[:, None], attn, 0.0), axis=1)
            tl.store(grad_hs_ptr + out_offs, (a_self[None, :] * g).to(grad_hs_ptr.dtype.element_ty), mask=out_ok)
        if NEED_LOGITS:
            # grad logits through the softmax: A_e (d_e - sum_f A_f d_f), d_e = <g_i, v_e>.
            hs = hs_ptr + pid_b * hs_sb
            hn = hn_ptr + pid_b * hn_sb
            dots = tl.zeros([BLOCK_R, DEG], dtype=ACC)
            for k in tl.static_range(MAX_DEG):
                j_k = _column(nbr, slots, k)
                live = row_ok & (k < deg)
                v_self = _rows(hs, rows, hs_sn, chans, hs_sc, live & (j_k == rows), ch_ok).to(ACC)
                v_nbr = _rows(hn, j_k, hn_sn, chans, hn_sc, live & (j_k != rows), ch_ok).to(ACC)
                d_k = tl.sum(g * (v_self + v_nbr), axis=0)
                dots = tl.where(slots[None, :] == k, d_k[:, None], dots)
            weighted = tl.sum(attn * dots, axis=1)
            grad = attn * (dots - weighted[:, None])
            tl.store(grad_logits_ptr + pid_b * E + edge, grad.to(grad_logits_ptr.dtype.element_ty), mask=edge_ok)

    if NEED_BIAS:
        pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(grad_bias_ptr + pid.to(tl.int64) * C + chans, tl.sum(g, axis=1), mask=ch_ok)

    if NEED_HN:
        # grad h_nbr_j = sum over edges f = (i -> j), i != j, of A_f g_i: a gather over j's incoming edges, whose
        # edge ids, rows and softmax are [BLOCK_R, IN_DEG] tiles.
        t, in_ok, in_slots, in_deg = _edge_tile(in_ptr_ptr, rows, row_ok, IN_DEG)
        f = tl.load(in_edges_ptr + t, mask=in_ok, other=0)
        src = tl.load(edge_row_ptr + f, mask=in_ok, other=0).to(tl.int32)
        a_in = tl.load(attn_b + f, mask=in_ok, other=0.0)
        acc = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
        for k in tl.static_range(MAX_IN_DEG):
            a_k = _column(a_in, in_slots, k)
            s_k = _column(src, in_slots, k)
            use = row_ok & (k < in_deg) & (s_k != rows)
            acc += a_k[None, :] * _rows(go, s_k, go_sn, chans, go_sc, use, ch_ok).to(ACC)
        tl.store(grad_hn_ptr + out_offs, acc.to(grad_hn_ptr.dtype.element_ty), mask=out_ok)


def _tiles(n: int, c: int, fp64: bool, on_gpu: bool) -> dict:
    """Launch shapes for N nodes and C channels: {"fwd": (BLOCK_R, BLOCK_C, num_warps), "bwd": (...), "softmax":
    (BLOCK_R, num_warps)}.

    On a GPU a feature tile holds 2048 float32 (1024 float64) values; the forward splits channels into tiles of at
    most 128 (a bf16 row is then 16 lanes x 16-byte vectors), the backward keeps them whole (its dot products need
    every channel) and runs 8 warps, as it keeps about twice the tiles live. The unrolled gathers are all in flight
    at once: at bf16 C = 128 the forward takes 150 registers a thread and the backward 128, with no spills (the
    compile test reports them, `--rows`). The interpreter runs programs one after another (~10 ms each), so there
    a tile is 8x larger and channels are never split.
    """
    budget = (2048 if on_gpu else 16384) // (2 if fp64 else 1)
    rows = triton.next_power_of_2(max(n, 1))
    whole = triton.next_power_of_2(max(c, 1))
    fwd_c = min(whole, 128) if on_gpu else whole
    return {
        "fwd": (max(1, min(rows, budget // fwd_c)), fwd_c, 4),
        "bwd": (max(1, min(rows, budget // whole)), whole, 8),
        "softmax": (min(rows, 128), 4),
    }


def _logits_strides(logits: torch.Tensor) -> tuple:
    """(face stride, edge stride) of shared (Tensor[E], face stride 0) or per-face (Tensor[B, E]) logits."""
    return (0, logits.stride(0)) if logits.dim() == 1 else (logits.stride(0), logits.stride(1))


def graph_message_passing_forward_triton(h_self, h_nbr, logits, indptr, indices, in_ptr, in_edges, edge_row, bias,
                                         max_deg: int, max_in_deg: int) -> torch.Tensor:
    """out (Tensor[B, N, C], h_self's dtype). h_self, h_nbr (Tensor[B, N, C], any strides); logits (Tensor[E] or
    Tensor[B, E], any float dtype); indptr (Tensor[N + 1]), indices (Tensor[E]) int64; bias (Tensor[C] or None);
    max_deg: the longest row. The transposed graph (in_ptr, in_edges, edge_row) and max_in_deg are unused here."""
    b, n, c = h_self.shape
    out = torch.empty((b, n, c), dtype=h_self.dtype, device=h_self.device)
    if out.numel() == 0:
        return out
    fp64 = h_self.dtype == torch.float64
    bias_args = (bias, bias.stride(0)) if bias is not None else (out, 0)
    block_r, block_c, warps = _tiles(n, c, fp64, on_gpu=h_self.is_cuda)["fwd"]
    grid = (b, triton.cdiv(n, block_r), triton.cdiv(c, block_c))
    with device_of(h_self):
        launch(
            _fwd_kernel, grid,
            h_self, *h_self.stride(), h_nbr, *h_nbr.stride(), logits, *_logits_strides(logits),
            indptr, indices, *bias_args, out, n, c,
            HAS_BIAS=bias is not None, FP64=fp64, MAX_DEG=max_deg, DEG=triton.next_power_of_2(max_deg),
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
        )
    return out


def graph_message_passing_backward_triton(grad_out, h_self, h_nbr, logits, indptr, indices, in_ptr, in_edges,
                                          edge_row, max_deg: int, max_in_deg: int, output_mask) -> tuple:
    """(grad_h_self, grad_h_nbr Tensor[B, N, C] in h_self's dtype, grad_logits in logits' shape and dtype (summed
    over faces for shared logits), grad_bias Tensor[C] in h_self's dtype); an output whose output_mask entry is
    False is an empty Tensor[0]. grad_out, h_self, h_nbr (Tensor[B, N, C], any strides); in_ptr (Tensor[N + 1]),
    in_edges, edge_row (Tensor[E]): the transposed graph; max_deg / max_in_deg: the longest row / the most incoming
    edges of a node. The softmax is recomputed from the logits. grad_h_self and grad_h_nbr have grad_out's strides
    when grad_out is dense (torch.empty_like), else they are contiguous."""
    b, n, c = h_self.shape
    e = indices.numel()
    dev = h_self.device
    need_hs, need_hn, need_logits, need_bias = (bool(m) for m in output_mask)
    acc = acc_dtype(h_self)
    shared = logits.dim() == 1

    def alloc(need, shape, dtype):
        return torch.empty(shape if need else (0,), dtype=dtype, device=dev)

    # grad_out's layout when it is dense (the model's node-contiguous one: nothing is copied), else contiguous.
    grad_hs = torch.empty_like(grad_out, dtype=h_self.dtype) if need_hs else h_self.new_empty((0,))
    grad_hn = torch.empty_like(grad_out, dtype=h_self.dtype) if need_hn else h_self.new_empty((0,))
    gh_strides = (grad_hs if need_hs else grad_hn).stride() if need_hs or need_hn else (0, 0, 0)
    # Shared logits: per-face grads in the acc dtype, summed over faces afterwards (in a fixed order).
    grad_logits = alloc(need_logits, (b, e), acc if shared else logits.dtype)
    if b * c == 0:
        if need_logits:
            grad_logits = torch.zeros_like(logits)
        return grad_hs, grad_hn, grad_logits, alloc(need_bias, (c,), h_self.dtype).zero_()

    tiles = _tiles(n, c, acc == torch.float64, on_gpu=h_self.is_cuda)
    block_r, block_c, warps = tiles["bwd"]
    grid = (b, triton.cdiv(n, block_r))
    grad_bias = alloc(need_bias, (grid[0] * grid[1], c), acc)
    sets = 1 if shared else b
    attn = torch.empty((sets, e), dtype=acc, device=dev)
    deg, in_deg = triton.next_power_of_2(max_deg), triton.next_power_of_2(max_in_deg)
    with device_of(h_self):
        if need_hs or need_hn or need_logits:
            softmax_r, softmax_warps = tiles["softmax"]
            launch(
                _softmax_kernel, (sets, triton.cdiv(n, softmax_r)),
                logits, *_logits_strides(logits), indptr, attn, n, e, DEG=deg, BLOCK_R=softmax_r,
                num_warps=softmax_warps,
            )
        launch(
            _bwd_kernel, grid,
            grad_out, *grad_out.stride(), h_self, *h_self.stride(), h_nbr, *h_nbr.stride(),
            attn, 0 if shared else e, indptr, indices, in_ptr, in_edges, edge_row,
            grad_hs, grad_hn, *gh_strides, grad_logits, grad_bias, n, c, e,
            NEED_HS=need_hs, NEED_HN=need_hn, NEED_LOGITS=need_logits, NEED_BIAS=need_bias,
            MAX_DEG=max_deg, DEG=deg, MAX_IN_DEG=max_in_deg, IN_DEG=in_deg, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=warps,
        )
    if need_logits and shared:
        grad_logits = grad_logits.sum(0).to(logits.dtype)
    if need_bias:
        grad_bias = grad_bias.sum(0).to(h_self.dtype)
    return grad_hs, grad_hn, grad_logits, grad_bias
