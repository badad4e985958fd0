"""relative_location_loss: criterion on landmark positions relative to related landmarks (method.md §1.5).

    loss = reduce_r,c  w_r * criterion( delta_r(pred) - delta_r(target) ),  delta_r(P) = sum_m w_m P[member_m] - P[anchor_r]

Backends: reference (structalign.ops.reference), cpp (structalign._C, CPU and CUDA), triton (structalign_kernels).
"""
import torch

from structalign.ops.backend import resolve_backend
from structalign.ops.graph import RelationSet
from structalign.ops.reference import CRITERIA, REDUCTIONS, relative_location_loss_reference

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
    landmark_weight (Tensor[B, N] or None, e.g. visibility); criterion "soft_wing" (omega1, omega2, epsilon), "l1"
    or "mse"; reduction "mean", "sum" or "none" (Tensor[B, R, 2]). Only pred gets a gradient.
    """
    _check_inputs(pred, target, relations, landmark_weight, criterion, omega1, omega2, epsilon, reduction)
    tensors = relations.tensors(pred.device)
    name = resolve_backend(backend, pred.device, OP)
    if name == "reference":
        return relative_location_loss_reference(pred, target, *tensors, landmark_weight, criterion,
                                                omega1, omega2, epsilon, reduction)
    raise RuntimeError(f"backend {name!r} for {OP} is not wired yet")
