"""Triton kernels of relative_location_loss (structalign/ops/relative_location_loss.py is the public entry).

One kernel does the forward, the gradient w.r.t. pred in the same pass (reductions mean / sum), and the backward
of reduction none. Each program takes a tile of BLOCK_B faces x BLOCK_R relations:

    d_rc = sum_m w_m e[member_m, c] - e[anchor_r, c],   e = pred - target   (c in x, y)
    loss_rc = criterion(d_rc);  grad e[anchor] -= g_rc,  grad e[member_m] += w_m g_rc,  g_rc = scale * criterion'(d_rc)

The loss of each program goes to its own slot of a partials buffer, summed afterwards in a fixed order (so the loss
is deterministic); gradient scatters use tl.atomic_add (relations share landmarks), so gradients may differ in the
last bits between runs. Test: pytest tests/ops/test_relative_location_loss.py
"""
import math

import torch
import triton
import triton.language as tl

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
def _relative_location_loss_kernel(
    pred_ptr, target_ptr, lw_ptr, anchor_ptr, indptr_ptr, member_ptr, weight_ptr,
    grad_out_ptr, loss_ptr, grad_ptr, partial_ptr,
    B, N, R,
    stride_pb, stride_pn, stride_pc, stride_tb, stride_tn, stride_tc, stride_lb, stride_ln,
    omega1, omega2, epsilon, wing_b, grad_scale,
    CRITERION: tl.constexpr, WEIGHTED: tl.constexpr, STORE_NONE: tl.constexpr, NEED_GRAD: tl.constexpr,
    BACKWARD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """pred, target (Tensor[B, N, 2], strided); lw (Tensor[B, N]) when WEIGHTED; grad_out, loss (Tensor[B, R, 2]);
    grad (Tensor[B, N, 2], zeroed); partial (Tensor[programs, 2]: loss sum and relation-weight sum)."""
    acc = partial_ptr.dtype.element_ty
    pid_b = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_b = offs_b < B
    mask_r = offs_r < R
    mask = mask_b[:, None] & mask_r[None, :]
    b64 = offs_b.to(tl.int64)[:, None]

    anchor = tl.load(anchor_ptr + offs_r, mask=mask_r, other=0)
    start = tl.load(indptr_ptr + offs_r, mask=mask_r, other=0)
    count = tl.load(indptr_ptr + offs_r + 1, mask=mask_r, other=0) - start
    max_members = tl.max(count, axis=0)
    a = anchor[None, :]
    p_off = b64 * stride_pb + a * stride_pn
    t_off = b64 * stride_tb + a * stride_tn
    dx = -(tl.load(pred_ptr + p_off, mask=mask, other=0.0).to(acc)
           - tl.load(target_ptr + t_off, mask=mask, other=0.0).to(acc))
    dy = -(tl.load(pred_ptr + p_off + stride_pc, mask=mask, other=0.0).to(acc)
           - tl.load(target_ptr + t_off + stride_tc, mask=mask, other=0.0).to(acc))
    if WEIGHTED:
        rw = tl.load(lw_ptr + b64 * stride_lb + a * stride_ln, mask=mask, other=0.0).to(acc)
    else:
        rw = tl.where(mask, 1.0, 0.0).to(acc)
    for k in range(0, max_members):
        has = mask_r & (k < count)
        m = tl.load(member_ptr + start + k, mask=has, other=0)[None, :]
        w = tl.load(weight_ptr + start + k, mask=has, other=0.0).to(acc)[None, :]
        mk = mask & has[None, :]
        p_off = b64 * stride_pb + m * stride_pn
        t_off = b64 * stride_tb + m * stride_tn
        dx += w * (tl.load(pred_ptr + p_off, mask=mk, other=0.0).to(acc)
                   - tl.load(target_ptr + t_off, mask=mk, other=0.0).to(acc))
        dy += w * (tl.load(pred_ptr + p_off + stride_pc, mask=mk, other=0.0).to(acc)
                   - tl.load(target_ptr + t_off + stride_tc, mask=mk, other=0.0).to(acc))
        if WEIGHTED:
            rw *= tl.load(lw_ptr + b64 * stride_lb + m * stride_ln, mask=mk, other=1.0).to(acc)

    lx, gx = _criterion(dx, CRITERION, omega1, omega2, epsilon, wing_b)
    ly, gy = _criterion(dy, CRITERION, omega1, omega2, epsilon, wing_b)
    out_off = (b64 * R + offs_r[None, :]) * 2
    if STORE_NONE:
        tl.store(loss_ptr + out_off, rw * lx, mask=mask)
        tl.store(loss_ptr + out_off + 1, rw * ly, mask=mask)
    if not BACKWARD:
        pid = pid_b * tl.num_programs(1) + pid_r
        tl.store(partial_ptr + pid * 2, tl.sum(tl.sum(tl.where(mask, rw * (lx + ly), 0.0), axis=1), axis=0))
        tl.store(partial_ptr + pid * 2 + 1, tl.sum(tl.sum(rw, axis=1), axis=0))
    if NEED_GRAD:
        gx *= grad_scale * rw
        gy *= grad_scale * rw
        if BACKWARD:
            gx *= tl.load(grad_out_ptr + out_off, mask=mask, other=0.0).to(acc)
            gy *= tl.load(grad_out_ptr + out_off + 1, mask=mask, other=0.0).to(acc)
        g_off = (b64 * N + a) * 2
        tl.atomic_add(grad_ptr + g_off, -gx, mask=mask)
        tl.atomic_add(grad_ptr + g_off + 1, -gy, mask=mask)
        for k in range(0, max_members):
            has = mask_r & (k < count)
            m = tl.load(member_ptr + start + k, mask=has, other=0)[None, :]
            w = tl.load(weight_ptr + start + k, mask=has, other=0.0).to(acc)[None, :]
            mk = mask & has[None, :]
            g_off = (b64 * N + m) * 2
            tl.atomic_add(grad_ptr + g_off, w * gx, mask=mk)
            tl.atomic_add(grad_ptr + g_off + 1, w * gy, mask=mk)


def _acc_dtype(pred: torch.Tensor) -> torch.dtype:
    return torch.float64 if pred.dtype == torch.float64 else torch.float32


def _blocks(b: int, r: int) -> tuple:
    block_b = min(triton.next_power_of_2(max(b, 1)), 8)
    block_r = min(triton.next_power_of_2(max(r, 1)), 128)
    return block_b, block_r


def _launch(pred, target, anchor, indptr, member, weight, landmark_weight, criterion, omega1, omega2, epsilon,
            reduction, need_grad, grad_out=None):
    b, n, _ = pred.shape
    r = anchor.numel()
    acc = _acc_dtype(pred)
    backward = grad_out is not None
    store_none = reduction == REDUCTIONS["none"] and not backward
    loss_none = torch.empty((b, r, 2), dtype=acc, device=pred.device) if store_none else None
    grad = torch.zeros((b, n, 2), dtype=acc, device=pred.device) if need_grad else None
    block_b, block_r = _blocks(b, r)
    grid = (triton.cdiv(b, block_b), triton.cdiv(r, block_r))
    partial = torch.zeros((grid[0] * grid[1], 2), dtype=acc, device=pred.device)
    if b == 0 or r == 0:
        return loss_none, grad, partial
    count = float(b * r * 2)
    unweighted_mean = reduction == REDUCTIONS["mean"] and landmark_weight is None and not backward
    grad_scale = 1.0 / count if unweighted_mean else 1.0
    lw = landmark_weight if landmark_weight is not None else pred
    wing_b = omega1 - omega2 * math.log1p(omega1 / epsilon)
    _relative_location_loss_kernel[grid](
        pred, target, lw, anchor, indptr, member, weight,
        grad_out if backward else partial, loss_none if store_none else partial, grad if need_grad else partial,
        partial,
        b, n, r,
        pred.stride(0), pred.stride(1), pred.stride(2), target.stride(0), target.stride(1), target.stride(2),
        lw.stride(0), lw.stride(1),
        omega1, omega2, epsilon, wing_b, grad_scale,
        CRITERION=criterion, WEIGHTED=landmark_weight is not None, STORE_NONE=store_none, NEED_GRAD=need_grad,
        BACKWARD=backward, BLOCK_B=block_b, BLOCK_R=block_r, num_warps=4,
    )
    return loss_none, grad, partial


def relative_location_loss_forward_triton(pred, target, anchor, indptr, member, weight, landmark_weight,
                                          criterion: int, omega1: float, omega2: float, epsilon: float,
                                          reduction: int, need_grad: bool):
    """(loss, grad_pred) as the C++ op structalign::relative_location_loss returns them (its schema's comment).

    pred, target (Tensor[B, N, 2], CUDA, or CPU under TRITON_INTERPRET=1); anchor, indptr, member (int64), weight
    (float32) as in RelationSet; landmark_weight (Tensor[B, N] or None); criterion / reduction codes as CRITERIA /
    REDUCTIONS.
    """
    with_grad = need_grad and reduction != REDUCTIONS["none"]
    loss_none, grad, partial = _launch(pred, target, anchor, indptr, member, weight, landmark_weight, criterion,
                                       omega1, omega2, epsilon, reduction, with_grad)
    if grad is None:
        grad = torch.empty((0,), dtype=partial.dtype, device=pred.device)
    if reduction == REDUCTIONS["none"]:
        return loss_none, grad
    total = partial[:, 0].sum()
    if reduction == REDUCTIONS["sum"]:
        return total, grad
    if landmark_weight is None:
        return total / max(pred.shape[0] * anchor.numel() * 2, 1), grad
    # Weighted mean: the gradient was accumulated unscaled, since the weight sum is only known after the pass.
    scale = 1.0 / (2.0 * partial[:, 1].sum()).clamp_min(MIN_WEIGHT_SUM)
    if with_grad:
        grad.mul_(scale)
    return total * scale, grad


def relative_location_loss_backward_triton(grad_out, pred, target, anchor, indptr, member, weight, landmark_weight,
                                           criterion: int, omega1: float, omega2: float, epsilon: float):
    """d(sum grad_out * loss) / d pred (Tensor[B, N, 2], fp32 or fp64) for reduction none; grad_out Tensor[B, R, 2]."""
    grad_out = grad_out.to(_acc_dtype(pred)).contiguous()  # often an expanded scalar (the backward of .sum())
    _, grad, _ = _launch(pred, target, anchor, indptr, member, weight, landmark_weight, criterion, omega1, omega2,
                         epsilon, REDUCTIONS["none"], True, grad_out=grad_out)
    return grad


def _aot_spec(dtype: str, criterion: int, weighted: bool, store_none: bool, need_grad: bool, backward: bool):
    acc = "fp64" if dtype == "fp64" else "fp32"
    signature = {
        "pred_ptr": f"*{dtype}", "target_ptr": f"*{dtype}", "lw_ptr": f"*{dtype}", "anchor_ptr": "*i64",
        "indptr_ptr": "*i64", "member_ptr": "*i64", "weight_ptr": "*fp32", "grad_out_ptr": f"*{acc}",
        "loss_ptr": f"*{acc}", "grad_ptr": f"*{acc}", "partial_ptr": f"*{acc}",
        "B": "i32", "N": "i32", "R": "i32",
        "stride_pb": "i32", "stride_pn": "i32", "stride_pc": "i32", "stride_tb": "i32", "stride_tn": "i32",
        "stride_tc": "i32", "stride_lb": "i32", "stride_ln": "i32",
        "omega1": "fp32", "omega2": "fp32", "epsilon": "fp32", "wing_b": "fp32", "grad_scale": "fp32",
        "CRITERION": "constexpr", "WEIGHTED": "constexpr", "STORE_NONE": "constexpr", "NEED_GRAD": "constexpr",
        "BACKWARD": "constexpr", "BLOCK_B": "constexpr", "BLOCK_R": "constexpr",
    }
    constexprs = {"CRITERION": criterion, "WEIGHTED": weighted, "STORE_NONE": store_none, "NEED_GRAD": need_grad,
                  "BACKWARD": backward, "BLOCK_B": 8, "BLOCK_R": 128}
    return _relative_location_loss_kernel, signature, constexprs


# (kernel, signature, constexprs) for tests/test_triton_aot.py: the training forward (soft-wing, mean, with the
# fused gradient) in fp32 and bf16, a weighted l1 forward, and the backward of reduction none.
AOT_SPECS = [
    _aot_spec("fp32", CRITERIA["soft_wing"], False, False, True, False),
    _aot_spec("bf16", CRITERIA["soft_wing"], False, False, True, False),
    _aot_spec("fp32", CRITERIA["l1"], True, True, False, False),
    _aot_spec("bf16", CRITERIA["mse"], True, False, True, True),
]
