"""Triton kernel of relative_location_loss (structalign/ops/relative_location_loss.py is the public entry).

    d_rc = sum_m w_m e[member_m, c] - e[anchor_r, c],   e = pred - target   (c in x, y)
    loss_rc = w_r criterion(d_rc),   w_r = lw[anchor_r] prod_m lw[member_m] (1 when unweighted)
    grad e[j] = sum over the entries t of landmark j of coef_t g[rel_t],   g_rc = scale w_r criterion'(d_rc)

One kernel does the forward, the gradient w.r.t. pred in the same pass (reductions mean / sum), and the backward of
reduction none. A program owns BLOCK_B faces x BLOCK_N landmarks and walks each landmark's entries of the
transposed relation index (point_ptr / point_rel / point_coef: relation rel_t uses landmark j with coefficient
coef_t, -1 as its anchor, +w_m as a member), recomputing d of the relation from pred and target. So each gradient
element is a gather in a fixed order (bitwise identical from run to run, no atomics and no [B, R, 2] buffer), and
each relation's loss is taken once, at its anchor's entry. Loss sums go to one partials slot per program, summed
afterwards in a fixed order.

Computation is in float64 for float64 pred and in float32 otherwise; the soft-wing constants and the gradient scale
are float64 kernel arguments rounded in the kernel to that dtype. Test: pytest tests/test_triton_kernels.py
"""
import math

import torch
import triton
import triton.language as tl

from structalign_kernels import acc_dtype, device_of, launch

CRITERIA = {"soft_wing": 0, "l1": 1, "mse": 2}
REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}
MIN_WEIGHT_SUM = 1e-12


@triton.jit
def _criterion(d, CRITERION: tl.constexpr, omega1, omega2, epsilon, wing_b):
    """Element loss and its derivative: soft_wing (method.md §2.1), l1 or mse; d|d|/dd = 0 at 0 as torch.abs."""
    x = tl.abs(d)
    sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(d.dtype)
    if CRITERION == 2:
        loss = d * d
        grad = 2.0 * d
    elif CRITERION == 1:
        loss = x
        grad = sign
    else:
        linear = x < omega1
        loss = tl.where(linear, x, omega2 * tl.log(1.0 + x / epsilon) + wing_b)
        grad = sign * tl.where(linear, 1.0, omega2 / (epsilon + x))
    return loss, grad


@triton.jit
def _error(pred_ptr, p_off, target_ptr, t_off, mask, ACC: tl.constexpr):
    """pred - target at the given offsets, in ACC."""
    return (tl.load(pred_ptr + p_off, mask=mask, other=0.0).to(ACC)
            - tl.load(target_ptr + t_off, mask=mask, other=0.0).to(ACC))


@triton.jit
def _relative_location_loss_kernel(
    pred_ptr, p_sb, p_sn, p_sc, target_ptr, t_sb, t_sn, t_sc, lw_ptr, lw_sb, lw_sn,
    anchor_ptr, indptr_ptr, member_ptr, weight_ptr, point_ptr_ptr, point_rel_ptr, point_coef_ptr,
    go_ptr, go_sb, go_sr, go_sc, loss_ptr, grad_ptr, partial_ptr, B, N, R,
    omega1: tl.float64, omega2: tl.float64, epsilon: tl.float64, wing_b: tl.float64, grad_scale: tl.float64,
    CRITERION: tl.constexpr, WEIGHTED: tl.constexpr, STORE_NONE: tl.constexpr, NEED_GRAD: tl.constexpr,
    BACKWARD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For grid (cdiv(B, BLOCK_B), cdiv(N, BLOCK_N)): pred, target (Tensor[B, N, 2]) and lw (Tensor[B, N], when
    WEIGHTED) with any strides; grad_out (Tensor[B, R, 2], any strides) when BACKWARD; writes loss (Tensor[B, R, 2],
    contiguous) when STORE_NONE, grad (Tensor[B, N, 2], contiguous) when NEED_GRAD, and partial (Tensor[programs,
    2]: the program's sum of w_r (loss_rx + loss_ry) and of w_r). partial's dtype is the accumulation dtype."""
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    omega1 = tl.full([], omega1, ACC)
    omega2 = tl.full([], omega2, ACC)
    epsilon = tl.full([], epsilon, ACC)
    wing_b = tl.full([], wing_b, ACC)
    grad_scale = tl.full([], grad_scale, ACC)
    faces = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    points = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    face_ok = faces < B
    point_ok = points < N
    fb = faces.to(tl.int64)[:, None]
    p_face = fb * p_sb
    t_face = fb * t_sb
    start = tl.load(point_ptr_ptr + points, mask=point_ok, other=0)
    count = tl.load(point_ptr_ptr + points + 1, mask=point_ok, other=0) - start

    grad_x = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC)
    grad_y = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC)
    loss_sum = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC)
    weight_sum = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC)
    for k in range(0, tl.max(count, axis=0)):
        has = point_ok & (k < count)
        rel = tl.load(point_rel_ptr + start + k, mask=has, other=0)
        coef = tl.load(point_coef_ptr + start + k, mask=has, other=0.0).to(ACC)
        anchor = tl.load(anchor_ptr + rel, mask=has, other=0)
        m_start = tl.load(indptr_ptr + rel, mask=has, other=0)
        m_count = tl.load(indptr_ptr + rel + 1, mask=has, other=0) - m_start
        mask = face_ok[:, None] & has[None, :]

        # d of relation rel (members first, then the anchor, as the reference sums), and its weight.
        dx = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC)
        dy = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC)
        prod = tl.full([BLOCK_B, BLOCK_N], 1.0, ACC)
        for i in range(0, tl.max(m_count, axis=0)):
            has_m = has & (i < m_count)
            m = tl.load(member_ptr + m_start + i, mask=has_m, other=0)[None, :]
            w = tl.load(weight_ptr + m_start + i, mask=has_m, other=0.0).to(ACC)[None, :]
            mask_m = face_ok[:, None] & has_m[None, :]
            dx += w * _error(pred_ptr, p_face + m * p_sn, target_ptr, t_face + m * t_sn, mask_m, ACC)
            dy += w * _error(pred_ptr, p_face + m * p_sn + p_sc, target_ptr, t_face + m * t_sn + t_sc, mask_m, ACC)
            if WEIGHTED:
                prod *= tl.load(lw_ptr + fb * lw_sb + m * lw_sn, mask=mask_m, other=1.0).to(ACC)
        a = anchor[None, :]
        dx -= _error(pred_ptr, p_face + a * p_sn, target_ptr, t_face + a * t_sn, mask, ACC)
        dy -= _error(pred_ptr, p_face + a * p_sn + p_sc, target_ptr, t_face + a * t_sn + t_sc, mask, ACC)
        if WEIGHTED:
            rw = tl.load(lw_ptr + fb * lw_sb + a * lw_sn, mask=mask, other=0.0).to(ACC) * prod
        else:
            rw = tl.where(mask, 1.0, 0.0).to(ACC)

        lx, gx = _criterion(dx, CRITERION, omega1, omega2, epsilon, wing_b)
        ly, gy = _criterion(dy, CRITERION, omega1, omega2, epsilon, wing_b)
        at_anchor = mask & (anchor == points)[None, :]
        out_off = (fb * R + rel[None, :]) * 2
        if STORE_NONE:
            tl.store(loss_ptr + out_off, rw * lx, mask=at_anchor)
            tl.store(loss_ptr + out_off + 1, rw * ly, mask=at_anchor)
        if not BACKWARD:
            loss_sum += tl.where(at_anchor, rw * (lx + ly), 0.0)
            weight_sum += tl.where(at_anchor, rw, 0.0)
        if NEED_GRAD:
            scale = coef[None, :] * (grad_scale * rw)
            gx *= scale
            gy *= scale
            if BACKWARD:
                go_off = fb * go_sb + rel[None, :] * go_sr
                gx *= tl.load(go_ptr + go_off, mask=mask, other=0.0).to(ACC)
                gy *= tl.load(go_ptr + go_off + go_sc, mask=mask, other=0.0).to(ACC)
            grad_x += tl.where(mask, gx, 0.0)
            grad_y += tl.where(mask, gy, 0.0)

    if NEED_GRAD:
        g_off = (fb * N + points[None, :]) * 2
        g_mask = face_ok[:, None] & point_ok[None, :]
        tl.store(grad_ptr + g_off, grad_x, mask=g_mask)
        tl.store(grad_ptr + g_off + 1, grad_y, mask=g_mask)
    if not BACKWARD:
        pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(partial_ptr + pid * 2, tl.sum(tl.sum(loss_sum, axis=1), axis=0))
        tl.store(partial_ptr + pid * 2 + 1, tl.sum(tl.sum(weight_sum, axis=1), axis=0))


def _tiles(b: int, n: int, on_gpu: bool) -> tuple:
    """(BLOCK_B, BLOCK_N): all landmarks of a face in one tile (up to 128), and 512 lanes a program on a GPU (4 per
    thread at 4 warps); the interpreter, which runs programs one after another, takes 8x more faces a program."""
    block_n = min(triton.next_power_of_2(max(n, 1)), 128)
    lanes = 512 if on_gpu else 4096
    return min(triton.next_power_of_2(max(b, 1)), max(1, lanes // block_n)), block_n


def _launch(pred, target, anchor, indptr, member, weight, point_ptr, point_rel, point_coef, landmark_weight,
            criterion: int, omega1: float, omega2: float, epsilon: float, store_none: bool, need_grad: bool,
            grad_scale: float, grad_out=None):
    """Runs the kernel; returns (loss Tensor[B, R, 2] or None, grad Tensor[B, N, 2] or None, partial)."""
    b, n, _ = pred.shape
    r = anchor.numel()
    dev = pred.device
    acc = acc_dtype(pred)
    loss = torch.empty((b, r, 2), dtype=acc, device=dev) if store_none else None
    grad = torch.empty((b, n, 2), dtype=acc, device=dev) if need_grad else None
    block_b, block_n = _tiles(b, n, on_gpu=pred.is_cuda)
    grid = (triton.cdiv(b, block_b), triton.cdiv(n, block_n))
    partial = torch.empty((grid[0] * grid[1], 2), dtype=acc, device=dev)
    if b == 0:
        return loss, grad, partial
    lw = landmark_weight if landmark_weight is not None else pred
    go = grad_out if grad_out is not None else partial.view(-1, 1, 2)
    wing_b = omega1 - omega2 * math.log1p(omega1 / epsilon) if criterion == CRITERIA["soft_wing"] else 0.0
    with device_of(pred):
        launch(
            _relative_location_loss_kernel, grid,
            pred, *pred.stride(), target, *target.stride(), lw, lw.stride(0), lw.stride(1),
            anchor, indptr, member, weight, point_ptr, point_rel, point_coef,
            go, *go.stride(), loss if store_none else partial, grad if need_grad else partial, partial, b, n, r,
            float(omega1), float(omega2), float(epsilon), float(wing_b), float(grad_scale),
            CRITERION=criterion, WEIGHTED=landmark_weight is not None, STORE_NONE=store_none, NEED_GRAD=need_grad,
            BACKWARD=grad_out is not None, BLOCK_B=block_b, BLOCK_N=block_n, num_warps=4,
        )
    return loss, grad, partial


def relative_location_loss_forward_triton(pred, target, anchor, indptr, member, weight, point_ptr, point_rel,
                                          point_coef, landmark_weight, criterion: int, omega1: float, omega2: float,
                                          epsilon: float, reduction: int, need_grad: bool) -> tuple:
    """(loss, grad_pred) as the C++ op structalign::relative_location_loss returns them: loss 0-dim (mean, sum) or
    Tensor[B, R, 2] (none), and grad_pred Tensor[B, N, 2] when need_grad and reduction != none, else Tensor[0]; both
    in the accumulation dtype (float64 for float64 pred, else float32).

    pred, target (Tensor[B, N, 2], any strides); anchor, indptr, member (int64), weight (acc dtype) as
    RelationSet.tensors; point_ptr, point_rel (int64), point_coef (acc dtype) as RelationSet.by_point;
    landmark_weight (Tensor[B, N] or None); criterion / reduction codes as CRITERIA / REDUCTIONS.
    """
    b = pred.shape[0]
    r = anchor.numel()
    none = reduction == REDUCTIONS["none"]
    with_grad = need_grad and not none
    unweighted_mean = reduction == REDUCTIONS["mean"] and landmark_weight is None
    grad_scale = 1.0 / max(b * r * 2, 1) if unweighted_mean else 1.0
    loss, grad, partial = _launch(pred, target, anchor, indptr, member, weight, point_ptr, point_rel, point_coef,
                                  landmark_weight, criterion, omega1, omega2, epsilon, none, with_grad, grad_scale)
    if grad is None:
        grad = torch.empty((0,), dtype=partial.dtype, device=pred.device)
    if none:
        return loss, grad
    total = partial[:, 0].sum()
    if reduction == REDUCTIONS["sum"]:
        return total, grad
    if landmark_weight is None:
        return total / max(b * r * 2, 1), grad
    # Weighted mean: the gradient was accumulated unscaled, since the weight sum is only known after the pass.
    scale = 1.0 / (2.0 * partial[:, 1].sum()).clamp_min(MIN_WEIGHT_SUM)
    return total * scale, grad * scale if with_grad else grad


def relative_location_loss_backward_triton(grad_out, pred, target, anchor, indptr, member, weight, point_ptr,
                                           point_rel, point_coef, landmark_weight, criterion: int, omega1: float,
                                           omega2: float, epsilon: float) -> torch.Tensor:
    """d(sum grad_out * loss) / d pred (Tensor[B, N, 2], acc dtype) for reduction none; grad_out Tensor[B, R, 2]
    with any strides (often an expanded scalar, the backward of .sum())."""
    _, grad, _ = _launch(pred, target, anchor, indptr, member, weight, point_ptr, point_rel, point_coef,
                         landmark_weight, criterion, omega1, omega2, epsilon, False, True, 1.0, grad_out=grad_out)
    return grad
