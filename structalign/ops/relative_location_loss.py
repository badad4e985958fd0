"""relative_location_loss: criterion on landmark positions relative to related landmarks (method.md §1.5).

    loss = reduce_r,c  w_r * criterion(delta_r(pred) - delta_r(target)),
    delta_r(P) = sum_m w_m P[member_m] - P[anchor_r]

Backends: reference (structalign.ops.reference), cpp (structalign._C, CPU and CUDA: torch.ops.structalign.
relative_location_loss[_backward]), triton (structalign_kernels.relative_location_loss, behind the custom op
structalign::relative_location_loss_triton[_backward]). The fused ops return the loss and, for reductions mean / sum,
the gradient w.r.t. pred from the same pass; their backward is then grad_out * that gradient.
Test: pytest tests/ops/test_relative_location_loss.py
"""
import torch

from structalign.ops.backend import extension_error, resolve_backend
from structalign.ops.graph import RelationSet
from structalign.ops.reference import CRITERIA, REDUCTIONS, relative_location_loss_reference

OP = "relative_location_loss"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CRITERION_CODES = {name: code for code, name in enumerate(CRITERIA)}  # soft_wing 0, l1 1, mse 2
REDUCTION_CODES = {name: code for code, name in enumerate(REDUCTIONS)}  # mean 0, sum 1, none 2
_NONE = REDUCTION_CODES["none"]


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
    Returns a float32 loss (float64 for float64 inputs). Only pred gets a gradient: target and landmark_weight
    are treated as constants by the cpp and triton backends.
    """
    _check_inputs(pred, target, relations, landmark_weight, criterion, omega1, omega2, epsilon, reduction)
    tensors = relations.tensors(pred.device)
    name = resolve_backend(backend, pred.device, OP)
    if name == "reference":
        return relative_location_loss_reference(pred, target, *tensors, landmark_weight, criterion,
                                                omega1, omega2, epsilon, reduction)
    if target.dtype != pred.dtype:
        common = torch.promote_types(pred.dtype, target.dtype)
        pred, target = pred.to(common), target.to(common)
    need_grad = pred.requires_grad and torch.is_grad_enabled()
    args = (pred, target, *tensors, landmark_weight, CRITERION_CODES[criterion], float(omega1), float(omega2),
            float(epsilon), REDUCTION_CODES[reduction], need_grad)
    if need_grad and reduction != "none":
        return _FusedGradientLoss.apply(name == "triton", *args)
    fused = torch.ops.structalign.relative_location_loss if name == "cpp" else relative_location_loss_triton
    return fused(*args)[0]


class _FusedGradientLoss(torch.autograd.Function):
    """Autograd of the fused ops for reductions mean / sum: the gradient comes with the loss, backward scales it.

    The ops are differentiable by themselves (register_autograd below); this thinner wrapper is what the public
    function uses, since torch.library's generic autograd wrapper costs about 65 us more per forward + backward
    (measured on the 2-core CPU: 59 vs 123 us for one face), as much as the whole fused kernel at training batches.
    """

    @staticmethod
    def forward(ctx, use_triton, pred, *args):
        fused = relative_location_loss_triton if use_triton else torch.ops.structalign.relative_location_loss
        loss, grad = fused(pred, *args)
        ctx.save_for_backward(grad)
        ctx.pred_dtype = pred.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        _refuse_double_backward()
        (grad,) = ctx.saved_tensors
        return (None, (grad_loss * grad).to(ctx.pred_dtype)) + (None,) * 12


def _acc_dtype(pred: torch.Tensor) -> torch.dtype:
    return torch.float64 if pred.dtype == torch.float64 else torch.float32


def _fake_forward(pred, target, anchor, indptr, member, weight, landmark_weight, criterion, omega1, omega2, epsilon,
                  reduction, need_grad):
    torch._check(pred.dim() == 3 and pred.shape[2] == 2, lambda: f"pred must have shape [B, N, 2], got {pred.shape}")
    torch._check(target.shape == pred.shape, lambda: f"target must match pred's shape {pred.shape}")
    torch._check(indptr.shape[0] == anchor.shape[0] + 1, lambda: "indptr must have R + 1 entries")
    torch._check(reduction in (0, 1, 2), lambda: f"reduction must be 0, 1 or 2, got {reduction}")
    acc = _acc_dtype(pred)
    loss_shape = (pred.shape[0], anchor.shape[0], 2) if reduction == _NONE else ()
    grad_shape = tuple(pred.shape) if need_grad and reduction != _NONE else (0,)
    return pred.new_empty(loss_shape, dtype=acc), pred.new_empty(grad_shape, dtype=acc)


def _fake_backward(grad_out, pred, target, anchor, indptr, member, weight, landmark_weight, criterion, omega1,
                   omega2, epsilon):
    torch._check(grad_out.shape == (pred.shape[0], anchor.shape[0], 2),
                 lambda: f"grad_out must have shape [B, R, 2], got {grad_out.shape}")
    return pred.new_empty(pred.shape, dtype=_acc_dtype(pred))


def _setup_context(ctx, inputs, output):
    pred, target, anchor, indptr, member, weight, landmark_weight, criterion, omega1, omega2, epsilon = inputs[:11]
    reduction, need_grad = inputs[11], inputs[12]
    ctx.reduction, ctx.need_grad, ctx.pred_dtype = reduction, need_grad, pred.dtype
    ctx.params = (criterion, omega1, omega2, epsilon)
    if reduction == _NONE:
        ctx.save_for_backward(pred, target, anchor, indptr, member, weight, landmark_weight)
    else:
        ctx.save_for_backward(output[1])


def _refuse_double_backward():
    # The saved gradient and the backward ops are not differentiable; an error beats a silently zero second order.
    if torch.is_grad_enabled():
        raise RuntimeError("relative_location_loss has no double backward (backward with create_graph=True)")


def _make_backward(backward_op):
    def backward(ctx, grad_loss, _grad_of_grad_pred):
        _refuse_double_backward()
        if ctx.reduction == _NONE:
            grad = backward_op(grad_loss, *ctx.saved_tensors, *ctx.params)
        else:
            if not ctx.need_grad:
                raise RuntimeError("relative_location_loss was called with need_grad=False, so it holds no gradient "
                                   "to propagate; call it with need_grad=True when pred requires grad")
            (grad,) = ctx.saved_tensors
            grad = grad_loss * grad
        return (grad.to(ctx.pred_dtype),) + (None,) * 12

    return backward


# Fake (meta) implementations let torch.compile and opcheck trace the C++ ops without running them; the backward op
# needs one too (aot_autograd traces the backward graph). They are registered only when structalign._C loaded, so
# that importing structalign works, with the reference and triton backends, without the extension.
if extension_error() is None and hasattr(torch.ops.structalign, OP):
    torch.library.register_fake(f"structalign::{OP}")(_fake_forward)
    torch.library.register_fake(f"structalign::{OP}_backward")(_fake_backward)
    torch.library.register_autograd(f"structalign::{OP}",
                                    _make_backward(torch.ops.structalign.relative_location_loss_backward),
                                    setup_context=_setup_context)


# The Triton kernels sit behind their own opaque custom ops: torch.compile cannot trace into a Triton launch on
# the CPU interpreter, and the C++ library already owns the CUDA key of structalign::relative_location_loss.
@torch.library.custom_op(f"structalign::{OP}_triton", mutates_args=())
def relative_location_loss_triton(pred: torch.Tensor, target: torch.Tensor, anchor: torch.Tensor,
                                  indptr: torch.Tensor, member: torch.Tensor, weight: torch.Tensor,
                                  landmark_weight: torch.Tensor | None, criterion: int, omega1: float, omega2: float,
                                  epsilon: float, reduction: int, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton forward: (loss, grad_pred) with the C++ op's contract (csrc/relative_location_loss.cpp)."""
    from structalign_kernels.relative_location_loss import relative_location_loss_forward_triton

    return relative_location_loss_forward_triton(pred, target, anchor, indptr, member, weight, landmark_weight,
                                                 criterion, omega1, omega2, epsilon, reduction, need_grad)


@torch.library.custom_op(f"structalign::{OP}_triton_backward", mutates_args=())
def relative_location_loss_triton_backward(grad_out: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                                           anchor: torch.Tensor, indptr: torch.Tensor, member: torch.Tensor,
                                           weight: torch.Tensor, landmark_weight: torch.Tensor | None,
                                           criterion: int, omega1: float, omega2: float,
                                           epsilon: float) -> torch.Tensor:
    """The Triton backward of reduction none: d(sum grad_out * loss) / d pred."""
    from structalign_kernels.relative_location_loss import relative_location_loss_backward_triton

    return relative_location_loss_backward_triton(grad_out, pred, target, anchor, indptr, member, weight,
                                                  landmark_weight, criterion, omega1, omega2, epsilon)


relative_location_loss_triton.register_fake(_fake_forward)
relative_location_loss_triton_backward.register_fake(_fake_backward)
relative_location_loss_triton.register_autograd(_make_backward(relative_location_loss_triton_backward),
                                                setup_context=_setup_context)
