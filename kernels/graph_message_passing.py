"""Triton kernels of graph_message_passing (structalign.ops.graph_message_passing, method.md §1.3-1.4).

    A_i. = softmax over row i of the CSR graph of the logits
    out_i = sum_e A_e v_e (+ bias),  v_e = h_self_i on the self loop (indices[e] == i), h_nbr_j otherwise

A program owns BLOCK_R rows of one face. Row lengths vary, so the row's edges are a [BLOCK_R, MAX_DEG] tile
(MAX_DEG: a power of two >= the longest row, masked) and the aggregation walks its MAX_DEG columns. The forward
also stores the softmax (fp32, [B or 1, E]) for the backward. The backward gathers grad h_nbr over the transposed
graph (in_ptr / in_edges / edge_row) instead of scattering with atomics, so it is deterministic.

    TRITON_INTERPRET=1 python -m pytest -q tests/ops/test_graph_message_passing.py -k triton
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _graph_message_passing_fwd_kernel(
    hs_ptr, hs_stride_b, hs_stride_n, hn_ptr, hn_stride_b, hn_stride_n, logits_ptr, logits_stride_b,
    indptr_ptr, indices_ptr, bias_ptr, out_ptr, attn_ptr, N, C,
    HAS_BIAS: tl.constexpr, MAX_DEG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < N
    ch_ok = chans < C
    start = tl.load(indptr_ptr + rows, mask=row_ok, other=0)
    deg = tl.load(indptr_ptr + rows + 1, mask=row_ok, other=0) - start
    slots = tl.arange(0, MAX_DEG)
    edge = start[:, None] + slots[None, :]
    edge_ok = slots[None, :] < deg[:, None]
    logit = tl.load(logits_ptr + pid_b * logits_stride_b + edge, mask=edge_ok, other=-float("inf"))
    peak = tl.where(row_ok, tl.max(logit, axis=1), 0.0)
    ex = tl.where(edge_ok, tl.exp(logit - peak[:, None]), 0.0)
    total = tl.where(row_ok, tl.sum(ex, axis=1), 1.0)
    attn = ex / total[:, None]
    nbr = tl.load(indices_ptr + edge, mask=edge_ok, other=0)

    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for k in tl.static_range(MAX_DEG):
        pick = slots[None, :] == k
        a_k = tl.sum(tl.where(pick, attn, 0.0), axis=1)
        j_k = tl.sum(tl.where(pick, nbr, 0), axis=1)
        live = row_ok & (k < deg)
        is_self = j_k == rows
        m_self = (live & is_self)[:, None] & ch_ok[None, :]
        m_nbr = (live & (j_k != rows))[:, None] & ch_ok[None, :]
        v_self = tl.load(hs_ptr + pid_b * hs_stride_b + rows[:, None] * hs_stride_n + chans[None, :], mask=m_self,
                         other=0.0)
        v_nbr = tl.load(hn_ptr + pid_b * hn_stride_b + j_k[:, None] * hn_stride_n + chans[None, :], mask=m_nbr,
                        other=0.0)
        acc += a_k[:, None] * (v_self.to(tl.float32) + v_nbr.to(tl.float32))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + chans, mask=ch_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = row_ok[:, None] & ch_ok[None, :]
    tl.store(out_ptr + (pid_b * N + rows[:, None]) * C + chans[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=out_mask)
    # One program per softmax set writes it: every face when logits are per face, face 0 when they are shared.
    writes_attn = (tl.program_id(2) == 0) & ((logits_stride_b != 0) | (pid_b == 0))
    tl.store(attn_ptr + pid_b * logits_stride_b + edge, attn, mask=edge_ok & writes_attn)


@triton.jit
def _graph_message_passing_bwd_kernel(
    go_ptr, go_stride_b, go_stride_n, hs_ptr, hs_stride_b, hs_stride_n, hn_ptr, hn_stride_b, hn_stride_n,
    attn_ptr, attn_stride_b, indptr_ptr, indices_ptr, in_ptr_ptr, in_edges_ptr, edge_row_ptr,
    grad_hs_ptr, grad_hn_ptr, grad_logits_ptr, N, C, E,
    MAX_DEG: tl.constexpr, MAX_IN_DEG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    chans = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    ch_ok = chans < C
    rc_ok = row_ok[:, None] & ch_ok[None, :]
    start = tl.load(indptr_ptr + rows, mask=row_ok, other=0)
    deg = tl.load(indptr_ptr + rows + 1, mask=row_ok, other=0) - start
    slots = tl.arange(0, MAX_DEG)
    edge = start[:, None] + slots[None, :]
    edge_ok = slots[None, :] < deg[:, None]
    attn_b = attn_ptr + pid_b * attn_stride_b
    attn = tl.load(attn_b + edge, mask=edge_ok, other=0.0)
    nbr = tl.load(indices_ptr + edge, mask=edge_ok, other=0)
    g = tl.load(go_ptr + pid_b * go_stride_b + rows[:, None] * go_stride_n + chans[None, :], mask=rc_ok,
                other=0.0).to(tl.float32)

    # grad logits through the softmax: a_e (d_e - sum_f a_f d_f), d_e = <g_i, v_e>; grad h_self = a_ii g_i.
    dots = tl.zeros([BLOCK_R, MAX_DEG], dtype=tl.float32)
    a_self = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k in tl.static_range(MAX_DEG):
        pick = slots[None, :] == k
        a_k = tl.sum(tl.where(pick, attn, 0.0), axis=1)
        j_k = tl.sum(tl.where(pick, nbr, 0), axis=1)
        live = row_ok & (k < deg)
        is_self = live & (j_k == rows)
        m_self = is_self[:, None] & ch_ok[None, :]
        m_nbr = (live & (j_k != rows))[:, None] & ch_ok[None, :]
        v_self = tl.load(hs_ptr + pid_b * hs_stride_b + rows[:, None] * hs_stride_n + chans[None, :], mask=m_self,
                         other=0.0)
        v_nbr = tl.load(hn_ptr + pid_b * hn_stride_b + j_k[:, None] * hn_stride_n + chans[None, :], mask=m_nbr,
                        other=0.0)
        d_k = tl.sum(g * (v_self.to(tl.float32) + v_nbr.to(tl.float32)), axis=1)
        dots = tl.where(pick, d_k[:, None], dots)
        a_self += tl.where(is_self, a_k, 0.0)
    weighted = tl.sum(attn * dots, axis=1)
    tl.store(grad_logits_ptr + pid_b * E + edge, attn * (dots - weighted[:, None]), mask=edge_ok)
    out_offs = (pid_b * N + rows[:, None]) * C + chans[None, :]
    tl.store(grad_hs_ptr + out_offs, (a_self[:, None] * g).to(grad_hs_ptr.dtype.element_ty), mask=rc_ok)

    # grad h_nbr_j = sum over edges e = (i -> j), i != j, of a_e g_i: a gather over j's incoming edges.
    in_start = tl.load(in_ptr_ptr + rows, mask=row_ok, other=0)
    in_deg = tl.load(in_ptr_ptr + rows + 1, mask=row_ok, other=0) - in_start
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for k in tl.static_range(MAX_IN_DEG):
        live = row_ok & (k < in_deg)
        f = tl.load(in_edges_ptr + in_start + k, mask=live, other=0)
        src = tl.load(edge_row_ptr + f, mask=live, other=0)
        use = live & (src != rows)
        a_f = tl.load(attn_b + f, mask=use, other=0.0)
        g_src = tl.load(go_ptr + pid_b * go_stride_b + src[:, None] * go_stride_n + chans[None, :],
                        mask=use[:, None] & ch_ok[None, :], other=0.0)
        acc += a_f[:, None] * g_src.to(tl.float32)
    tl.store(grad_hn_ptr + out_offs, acc.to(grad_hn_ptr.dtype.element_ty), mask=rc_ok)


def _block_sizes(n: int, c: int, device: torch.device, whole_channels: bool) -> tuple:
    """(BLOCK_R, BLOCK_C). The interpreter runs programs one by one (~10 ms each), so on the CPU a program takes
    a much larger tile than the register budget of a GPU program allows."""
    budget = 2048 if device.type == "cuda" else 16384
    block_c = triton.next_power_of_2(max(c, 1))
    if not whole_channels:
        block_c = min(block_c, 128)
    block_r = max(1, min(triton.next_power_of_2(n), budget // block_c))
    return block_r, block_c


def _channels_contiguous(h: torch.Tensor) -> torch.Tensor:
    return h if h.stride(2) == 1 or h.shape[2] <= 1 else h.contiguous()


def graph_message_passing_forward_triton(h_self, h_nbr, logits, indptr, indices, bias, max_deg: int):
    """Forward. h_self, h_nbr (Tensor[B, N, C]); logits (Tensor[E] or Tensor[B, E]); bias (Tensor[C] or None);
    max_deg: the longest row. Returns out (Tensor[B, N, C]) and the softmax (fp32 Tensor[1 or B, E])."""
    b, n, c = h_self.shape
    h_self, h_nbr = _channels_contiguous(h_self), _channels_contiguous(h_nbr)
    logits2d = logits.float().reshape(-1, indices.numel()).contiguous()
    out = torch.empty((b, n, c), dtype=h_self.dtype, device=h_self.device)
    attn = torch.empty_like(logits2d)
    if out.numel() == 0:
        return out, attn.zero_()
    block_r, block_c = _block_sizes(n, c, h_self.device, whole_channels=False)
    grid = (b, triton.cdiv(n, block_r), triton.cdiv(c, block_c))
    _graph_message_passing_fwd_kernel[grid](
        h_self, h_self.stride(0), h_self.stride(1), h_nbr, h_nbr.stride(0), h_nbr.stride(1),
        logits2d, indices.numel() if logits.dim() == 2 else 0, indptr, indices,
        bias.contiguous() if bias is not None else out, out, attn, n, c,
        HAS_BIAS=bias is not None, MAX_DEG=triton.next_power_of_2(max_deg), BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return out, attn


def graph_message_passing_backward_triton(grad_out, h_self, h_nbr, attn, indptr, indices, in_ptr, in_edges,
                                          edge_row, max_deg: int, max_in_deg: int):
    """Backward from the forward's softmax attn (fp32 Tensor[1 or B, E]) and the transposed graph (in_ptr
    Tensor[N + 1], in_edges / edge_row Tensor[E]). Returns grad_h_self, grad_h_nbr (Tensor[B, N, C]) and the
    per-face grad of the logits (fp32 Tensor[B, E]; sum over faces for shared logits)."""
    b, n, c = h_self.shape
    e = indices.numel()
    grad_out = _channels_contiguous(grad_out)
    h_self, h_nbr = _channels_contiguous(h_self), _channels_contiguous(h_nbr)
    grad_hs = torch.empty((b, n, c), dtype=h_self.dtype, device=h_self.device)
    grad_hn = torch.empty_like(grad_hs)
    grad_logits = torch.empty((b, e), dtype=torch.float32, device=h_self.device)
    if grad_hs.numel() == 0:
        return grad_hs, grad_hn, grad_logits.zero_()
    block_r, block_c = _block_sizes(n, c, h_self.device, whole_channels=True)
    _graph_message_passing_bwd_kernel[(b, triton.cdiv(n, block_r))](
        grad_out, grad_out.stride(0), grad_out.stride(1), h_self, h_self.stride(0), h_self.stride(1),
        h_nbr, h_nbr.stride(0), h_nbr.stride(1), attn, e if attn.shape[0] > 1 else 0, indptr, indices,
        in_ptr, in_edges, edge_row, grad_hs, grad_hn, grad_logits, n, c, e,
        MAX_DEG=triton.next_power_of_2(max_deg), MAX_IN_DEG=triton.next_power_of_2(max_in_deg),
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return grad_hs, grad_hn, grad_logits


def _aot_specs():
    fwd_args = ["hs_ptr", "hs_stride_b", "hs_stride_n", "hn_ptr", "hn_stride_b", "hn_stride_n", "logits_ptr",
                "logits_stride_b", "indptr_ptr", "indices_ptr", "bias_ptr", "out_ptr", "attn_ptr", "N", "C"]
    bwd_args = ["go_ptr", "go_stride_b", "go_stride_n", "hs_ptr", "hs_stride_b", "hs_stride_n", "hn_ptr",
                "hn_stride_b", "hn_stride_n", "attn_ptr", "attn_stride_b", "indptr_ptr", "indices_ptr",
                "in_ptr_ptr", "in_edges_ptr", "edge_row_ptr", "grad_hs_ptr", "grad_hn_ptr", "grad_logits_ptr",
                "N", "C", "E"]
    fp32_ptrs = {"logits_ptr", "attn_ptr", "grad_logits_ptr"}
    idx_ptrs = {"indptr_ptr", "indices_ptr", "in_ptr_ptr", "in_edges_ptr", "edge_row_ptr"}

    def signature(args, dtype, constexprs):
        sig = {}
        for a in args:
            if a in fp32_ptrs:
                sig[a] = "*fp32"
            elif a in idx_ptrs:
                sig[a] = "*i64"
            elif a.endswith("_ptr"):
                sig[a] = f"*{dtype}"
            else:
                sig[a] = "i64" if "stride" in a else "i32"
        sig.update({k: "constexpr" for k in constexprs})
        return sig

    specs = []
    for dtype in ("fp32", "bf16"):
        # The WFLW graph (longest row 8, most incoming edges 8), C = 128 and 256 on a GPU.
        fwd_const = {"HAS_BIAS": True, "MAX_DEG": 8, "BLOCK_R": 16, "BLOCK_C": 128}
        bwd_const = {"MAX_DEG": 8, "MAX_IN_DEG": 8, "BLOCK_R": 8, "BLOCK_C": 256}
        specs.append((_graph_message_passing_fwd_kernel, signature(fwd_args, dtype, fwd_const), fwd_const))
        specs.append((_graph_message_passing_bwd_kernel, signature(bwd_args, dtype, bwd_const), bwd_const))
    return specs


AOT_SPECS = _aot_specs()
