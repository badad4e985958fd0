"""relative_location_loss: criterion on landmark positions relative to related landmarks (method.md §1.5).

    loss = reduce_r,c  w_r * criterion(delta_r(pred) - delta_r(target)),
    delta_r(P) = sum_m w_m P[member_m] - P[anchor_r]

Backends: reference (structalign.ops.reference), cpp (structalign._C, CPU and CUDA: torch.ops.structalign.
relative_location_loss[_backward]), triton (structalign::relative_location_loss_triton[_backward], triton_ops over
structalign_kernels.relative_location_loss), registered by one template (structalign.ops.fused). The fused ops
return the loss and, for reductions mean / sum, the gradient w.r.t. pred from the same pass; their backward is then
grad_out * that gradient. Gradients are gathered per landmark over RelationSet.by_point: no atomics, bitwise
identical from run to run.
Test: pytest tests/ops/test_relative_location_loss.py
"""
import torch
from torch import Tensor
from torch.library import triton_op

from structalign.ops.backend import extension_error, resolve_backend
from structalign.ops.fused import register_fused
from structalign.ops.graph import RelationSet
from structalign.ops.reference import CRITERIA, REDUCTIONS, acc_dtype, relative_location_loss_reference

try:
    from structalign_kernels import relative_location_loss as triton_launchers
    from structalign_kernels.relative_location_loss import (relative_location_loss_backward_triton,
                                                            relative_location_loss_forward_triton)
except ImportError:  # no Triton: the reference and cpp backends remain
    triton_launchers = None

OP = "relative_location_loss"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(pred, target, relations, landmark_weight, criterion, omega1, omega2, epsilon, reduction):
    if not isinstance(relations, RelationSet):
        raise TypeError(f"relations must be a RelationSet, got {type(relations).__name__}")
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if pred.dim() != 3 or pred.shape[-1] != 2:
        raise ValueError(f"pred must have shape [B, N, 2], got {list(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target must match pred's shape {list(pred.shape)}, got {list(target.shape)}")
    if pred.shape[1] != relations.num_points:
        raise ValueError(f"pred has {pred.shape[1]} landmarks but the relations are over {relations.num_points}")
    if target.device != pred.device:
        raise ValueError(f"target is on {target.device} but pred is on {pred.device}")
    if landmark_weight is not None:
        if not isinstance(landmark_weight, torch.Tensor) or landmark_weight.shape != pred.shape[:2]:
            raise ValueError(f"landmark_weight must have shape {list(pred.shape[:2])}, "
                             f"got {list(getattr(landmark_weight, 'shape', []))}")
        if landmark_weight.dtype not in _FLOATS:
            raise TypeError(f"landmark_weight must be a floating tensor, got dtype {landmark_weight.dtype}")
        if landmark_weight.device != pred.device:
            raise ValueError(f"landmark_weight is on {landmark_weight.device} but pred is on {pred.device}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if criterion == "soft_wing":
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        if not (omega1 > 0 and omega2 > 0):
            raise ValueError(f"omega1 and omega2 must be > 0, got {omega1}, {omega2}")


def relative_location_loss(pred: torch.Tensor, target: torch.Tensor, relations: RelationSet,
                           landmark_weight: torch.Tensor | None = None, criterion: str = "soft_wing",
                           omega1: float = 2.0, omega2: float = 20.0, epsilon: float = 0.5,
                           reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    """Relative-location loss of predicted landmarks against targets, in pixels.

    pred, target (Tensor[B, N, 2]); relations: RelationSet (RelationSet.laplacian(top3) is the paper's loss);
    landmark_weight (Tensor[B, N] or None, e.g. visibility): relation r counts with w[anchor] * prod w[members];
    criterion "soft_wing" (omega1, omega2, epsilon), "l1" or "mse"; reduction "mean" (over B x R x 2, or
    sum(w l) / (2 sum w) when weighted; 0 for an empty batch), "sum", or "none" (Tensor[B, R, 2]).
    backend: None (the global setting), "auto", "reference", "cpp" or "triton".
    Returns a float32 loss (float64, computed in float64, when pred or target is float64). Only pred gets a
    gradient: target and landmark_weight are treated as constants by the cpp and triton backends.
    """
    _check_inputs(pred, target, relations, landmark_weight, criterion, omega1, omega2, epsilon, reduction)
    device = pred.device
    acc = acc_dtype(pred, target)
    name = resolve_backend(backend, device, OP)
    if name == "reference":
        return relative_location_loss_reference(pred, target, *relations.tensors(device, acc), landmark_weight,
                                                criterion, omega1, omega2, epsilon, reduction)
    if target.dtype != pred.dtype:
        common = torch.promote_types(pred.dtype, target.dtype)
        pred, target = pred.to(common), target.to(common)
    fused = _APPLY[name]
    need_grad = pred.requires_grad and torch.is_grad_enabled()
    loss, _ = fused(pred, target, *relations.tensors(device, acc), *relations.by_point(device, acc), landmark_weight,
                    CRITERIA.index(criterion), float(omega1), float(omega2), float(epsilon),
                    REDUCTIONS.index(reduction), need_grad)
    return loss


# ---- one template for both fused backends -----------------------------------------------------------------------
# forward(pred, target, anchor, indptr, member, weight, point_ptr, point_rel, point_coef, landmark_weight,
#         criterion, omega1, omega2, epsilon, reduction, need_grad) -> (loss, grad_pred)
# backward(grad_out, pred, target, anchor, indptr, member, weight, point_ptr, point_rel, point_coef,
#          landmark_weight, criterion, omega1, omega2, epsilon) -> grad_pred   (the backward of reduction none)
# For reductions mean / sum the forward returns d loss / d pred from the same pass (need_grad), and the autograd
# formula scales it; the C++ schemas and their contract are in csrc/relative_location_loss.cpp.
_NONE = REDUCTIONS.index("none")


def _fake_forward(pred, target, anchor, indptr, member, weight, point_ptr, point_rel, point_coef, landmark_weight,
                  criterion, omega1, omega2, epsilon, reduction, need_grad):
    torch._check(pred.dim() == 3 and pred.shape[2] == 2, lambda: f"pred must have shape [B, N, 2], got {pred.shape}")
    torch._check(target.shape == pred.shape, lambda: f"target must match pred's shape {pred.shape}")
    torch._check(indptr.shape[0] == anchor.shape[0] + 1, lambda: "indptr must have R + 1 entries")
    torch._check(reduction in (0, 1, 2), lambda: f"reduction must be 0, 1 or 2, got {reduction}")
    acc = acc_dtype(pred)
    loss_shape = (pred.shape[0], anchor.shape[0], 2) if reduction == _NONE else ()
    grad_shape = tuple(pred.shape) if need_grad and reduction != _NONE else (0,)
    return pred.new_empty(loss_shape, dtype=acc), pred.new_empty(grad_shape, dtype=acc)


def _fake_backward(grad_out, pred, target, anchor, indptr, member, weight, point_ptr, point_rel, point_coef,
                   landmark_weight, criterion, omega1, omega2, epsilon):
    torch._check(grad_out.shape == (pred.shape[0], anchor.shape[0], 2),
                 lambda: f"grad_out must have shape [B, R, 2], got {grad_out.shape}")
    return pred.new_empty(pred.shape, dtype=acc_dtype(pred))


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])  # the gradient that comes with the loss
    ctx.set_materialize_grads(False)  # no zero-filled [B, N, 2] gradient for that output in the backward
    reduction, need_grad = inputs[14], inputs[15]
    ctx.reduction, ctx.need_grad, ctx.pred_dtype = reduction, need_grad, inputs[0].dtype
    if reduction == _NONE:
        ctx.save_for_backward(*inputs[:10])
        ctx.params = inputs[10:14]
    else:
        ctx.save_for_backward(output[1])


def _backward_formula(backward_op):
    def backward(ctx, grad_loss, _grad_of_grad_pred):
        if grad_loss is None:  # the loss is not used (gradients are not materialised as zeros)
            return (None,) * 16
        if ctx.reduction == _NONE:
            grad = backward_op(grad_loss, *ctx.saved_tensors, *ctx.params)
        else:
            if torch.is_grad_enabled():  # create_graph=True: the saved gradient has no derivative of its own
                raise RuntimeError("relative_location_loss: double backward (a gradient of its gradient) is not "
                                   "supported")
            if not ctx.need_grad:
                raise RuntimeError("relative_location_loss was called with need_grad=False, so it holds no gradient "
                                   "to propagate; call it with need_grad=True when pred requires grad")
            (grad,) = ctx.saved_tensors
            grad = grad_loss * grad
        return (grad.to(ctx.pred_dtype),) + (None,) * 15

    return backward


_APPLY = {}  # backend -> the forward op with its autograd formula (register_fused's apply)

if extension_error() is None and hasattr(torch.ops.structalign, OP):
    _APPLY["cpp"] = register_fused(f"structalign::{OP}", f"structalign::{OP}_backward", _setup_context,
                                   _backward_formula(torch.ops.structalign.relative_location_loss_backward),
                                   _fake_forward, _fake_backward)


# The Triton pair: torch.library.triton_op, so torch.compile sees the kernels; its body is its own fake kernel.
# Separate operators because structalign._C owns the CUDA key of structalign::relative_location_loss.
if triton_launchers is not None:
    @triton_op(f"structalign::{OP}_triton", mutates_args=())
    def relative_location_loss_triton(pred: Tensor, target: Tensor, anchor: Tensor, indptr: Tensor, member: Tensor,
                                      weight: Tensor, point_ptr: Tensor, point_rel: Tensor, point_coef: Tensor,
                                      landmark_weight: Tensor | None, criterion: int, omega1: float, omega2: float,
                                      epsilon: float, reduction: int, need_grad: bool) -> tuple[Tensor, Tensor]:
        """The Triton forward (structalign_kernels.relative_location_loss), with the C++ op's contract."""
        return relative_location_loss_forward_triton(pred, target, anchor, indptr, member, weight, point_ptr,
                                                     point_rel, point_coef, landmark_weight, criterion, omega1,
                                                     omega2, epsilon, reduction, need_grad)

    @triton_op(f"structalign::{OP}_triton_backward", mutates_args=())
    def relative_location_loss_triton_backward(grad_out: Tensor, pred: Tensor, target: Tensor, anchor: Tensor,
                                               indptr: Tensor, member: Tensor, weight: Tensor, point_ptr: Tensor,
                                               point_rel: Tensor, point_coef: Tensor, landmark_weight: Tensor | None,
                                               criterion: int, omega1: float, omega2: float,
                                               epsilon: float) -> Tensor:
        """The Triton backward of reduction none, with the C++ backward op's contract."""
        return relative_location_loss_backward_triton(grad_out, pred, target, anchor, indptr, member, weight,
                                                      point_ptr, point_rel, point_coef, landmark_weight, criterion,
                                                      omega1, omega2, epsilon)

    _APPLY["triton"] = register_fused(f"structalign::{OP}_triton", f"structalign::{OP}_triton_backward",
                                      _setup_context, _backward_formula(relative_location_loss_triton_backward))
else:
    relative_location_loss_triton = None
