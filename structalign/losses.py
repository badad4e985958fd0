"""Training criteria for landmark regression, in pixels (method.md §1.5, §2).

Element-wise losses of a residual x = |pred - target| (mean over elements unless stated):
    SoftWingLoss      x if x < omega1, else omega2 ln(1 + x / epsilon) + B, B = omega1 - omega2 ln(1 + omega1 / epsilon)
    WingLoss          omega ln(1 + x / epsilon) if x < omega, else x - C, C = omega - omega ln(1 + omega / epsilon)
    AdaptiveWingLoss  Wang et al. ICCV'19, exponent alpha - y with y the target (heatmaps in [0, 1])
    L1Loss, MSELoss
mmpose sums over points and coordinates and averages over the batch; we average over all B x N x 2 elements as the
paper's code does, so mmpose's value is ours times 2N. The paper's constants (2, 20, 0.5) are meant for pixels of a
256 px crop (method.md §2.5).

`build_criterion` makes the training criterion: absolute_weight * loss(pred, target) + relative_weight * the
relative-location loss (the same element-wise loss on Laplacian coordinates, through
structalign.ops.relative_location_loss) + visibility_weight * `visibility_loss`, which trains the visibility head on
the labelled points.
"""
from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from functools import lru_cache

import torch
from torch import nn

from structalign.landmarks import LandmarkScheme, resolve_scheme
from structalign.ops import RelationSet, relative_location_loss
from structalign.ops.backend import check_op_backend
from structalign.ops.reference import CRITERIA as FUSED_CRITERIA
from structalign.ops.reference import relation_weight_reference


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def weighted_mean(elem: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of elem, or sum(weight * elem) / sum(weight) with weight broadcast to elem's shape."""
    if elem.numel() == 0:
        return elem.sum()  # an empty batch contributes 0, not nan
    if weight is None:
        return elem.mean()
    weight = weight.to(elem.dtype).expand_as(elem)
    return (elem * weight).sum() / weight.sum().clamp_min(1e-12)


def visibility_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of visibility logits (Tensor[B, N], logit of P(visible)) against labels (Tensor[B, N]:
    1 visible, 0 occluded, -1 unlabelled), averaged over the labelled points; 0 when none is labelled (no host
    sync either way)."""
    if logits.shape != labels.shape:
        raise ValueError(f"visibility logits have shape {list(logits.shape)} but the labels {list(labels.shape)}")
    labelled = labels >= 0
    bce = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float().clamp_min(0),
                                                         reduction="none")
    return weighted_mean(bce, labelled)


class PointLoss(nn.Module, ABC):
    """An element-wise loss of the residual. forward(pred, target (Tensor[...]), weight (broadcastable or None)).

    With a weight the result is sum(weight * loss) / sum(weight) over the elements (a weighted mean).
    """

    @abstractmethod
    def of_residual(self, x: torch.Tensor) -> torch.Tensor:
        """The loss of each absolute residual x (Tensor[...], >= 0)."""

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.of_residual((pred - target).abs())

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return weighted_mean(self.elementwise(pred, target), weight)


class SoftWingLoss(PointLoss):
    """Soft Wing (Lin et al. 2021): linear below omega1, logarithmic above; continuous at omega1."""

    def __init__(self, omega1: float = 2.0, omega2: float = 20.0, epsilon: float = 0.5):
        super().__init__()
        self.omega1, self.omega2 = _positive("omega1", omega1), _positive("omega2", omega2)
        self.epsilon = _positive("epsilon", epsilon)
        # B makes both branches equal at x = omega1.
        self.b = self.omega1 - self.omega2 * math.log1p(self.omega1 / self.epsilon)

    def of_residual(self, x):
        return torch.where(x < self.omega1, x, self.omega2 * torch.log1p(x / self.epsilon) + self.b)

    def op_params(self) -> dict:
        return {"omega1": self.omega1, "omega2": self.omega2, "epsilon": self.epsilon}

    def extra_repr(self):
        return f"omega1={self.omega1}, omega2={self.omega2}, epsilon={self.epsilon}"


class WingLoss(PointLoss):
    """Wing (Feng et al. CVPR'18): logarithmic below omega, linear above."""

    def __init__(self, omega: float = 10.0, epsilon: float = 2.0):
        super().__init__()
        self.omega, self.epsilon = _positive("omega", omega), _positive("epsilon", epsilon)
        self.c = self.omega - self.omega * math.log1p(self.omega / self.epsilon)

    def of_residual(self, x):
        return torch.where(x < self.omega, self.omega * torch.log1p(x / self.epsilon), x - self.c)

    def extra_repr(self):
        return f"omega={self.omega}, epsilon={self.epsilon}"


class AdaptiveWingLoss(PointLoss):
    """Adaptive Wing (Wang et al. ICCV'19) with mmpose's defaults.

    elementwise(pred, target): the exponent alpha - y uses y = target (heatmap intensities in [0, 1]). On
    coordinates (of_residual, as build_criterion uses it) y = 0, the background branch: smooth near 0, then linear.
    """

    def __init__(self, alpha: float = 2.1, omega: float = 14.0, epsilon: float = 1.0, theta: float = 0.5):
        super().__init__()
        self.alpha, self.omega = _positive("alpha", alpha), _positive("omega", omega)
        self.epsilon, self.theta = _positive("epsilon", epsilon), _positive("theta", theta)

    def _loss(self, delta, y):
        power = self.alpha - y
        ratio = self.theta / self.epsilon
        a = self.omega / (1 + ratio ** power) * power * ratio ** (power - 1) / self.epsilon
        c = self.theta * a - self.omega * torch.log1p(ratio ** power)
        return torch.where(delta < self.theta, self.omega * torch.log1p((delta / self.epsilon) ** power),
                           a * delta - c)

    def elementwise(self, pred, target):
        return self._loss((pred - target).abs(), target)

    def of_residual(self, x):
        return self._loss(x, torch.zeros_like(x))

    def extra_repr(self):
        return f"alpha={self.alpha}, omega={self.omega}, epsilon={self.epsilon}, theta={self.theta}"


class L1Loss(PointLoss):
    def of_residual(self, x):
        return x

    def op_params(self) -> dict:
        return {}


class MSELoss(PointLoss):
    def of_residual(self, x):
        return x * x

    def op_params(self) -> dict:
        return {}


POINT_LOSSES = {"soft_wing": SoftWingLoss, "wing": WingLoss, "adaptive_wing": AdaptiveWingLoss, "l1": L1Loss,
                "mse": MSELoss}


def build_point_loss(name: str, **params) -> PointLoss:
    """The element-wise loss by name with its parameters; unknown names or parameters raise ValueError."""
    if name not in POINT_LOSSES:
        raise ValueError(f"criterion name must be one of {sorted(POINT_LOSSES)}, got {name!r}")
    cls = POINT_LOSSES[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"criterion {name!r} has no parameter {unknown[0]!r}; it takes {allowed or 'none'}")
    return cls(**params)


@lru_cache(maxsize=None)
def laplacian_relations(scheme: LandmarkScheme) -> RelationSet:
    """The relative-location loss relations (method.md §1.5): delta_i = mean of p_j over scheme.relation_neighbors[i],
    minus p_i (nodes without neighbours are skipped)."""
    return RelationSet.laplacian(scheme.relation_neighbors)


class LandmarkCriterion(nn.Module):
    """absolute_weight * point_loss(pred, target) + relative_weight * relative-location loss
    + visibility_weight * visibility_loss(visibility_logits, visibility_labels).

    forward(pred, target (Tensor[B, N, 2], pixels), point_weight (Tensor[B, N] or None), visibility_logits
    (Tensor[B, N] or None: no visibility term), visibility_labels (Tensor[B, N], 1 / 0 / -1 unlabelled)) ->
    (loss, {"absolute": Tensor, "relative": Tensor, "visibility": Tensor}) with the terms detached (before
    weighting; visibility 0 without logits). point_weight weights the two point terms (a relation counts with the
    weights of its anchor and all its members).
    """

    def __init__(self, point_loss: PointLoss, scheme, relative: str | None = "laplacian", relative_weight: float = 1.0,
                 absolute_weight: float = 1.0, op_backend: str | None = None, check_targets: bool = True,
                 visibility_weight: float = 0.0):
        super().__init__()
        if relative not in ("laplacian", None):
            raise ValueError(f"relative must be 'laplacian' or None, got {relative!r}")
        for name, value in (("relative_weight", relative_weight), ("absolute_weight", absolute_weight),
                            ("visibility_weight", visibility_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        check_op_backend(op_backend)
        self.point_loss, self.scheme = point_loss, resolve_scheme(scheme)
        self.relations = laplacian_relations(self.scheme) if relative else None
        self.relative_weight, self.absolute_weight = float(relative_weight), float(absolute_weight)
        self.visibility_weight = float(visibility_weight)
        self.op_backend, self.check_targets = op_backend, check_targets
        self.name = next(k for k, v in POINT_LOSSES.items() if isinstance(point_loss, v))

    def _check(self, pred, target, point_weight):
        n = self.scheme.num_points
        for name, t in (("pred", pred), ("target", target)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(t, 'dtype', type(t))}")
            if t.dim() != 3 or t.shape[-1] != 2:
                raise ValueError(f"{name} must have shape [B, N, 2], got {list(t.shape)}")
            if t.shape[1] != n:
                raise ValueError(f"{name} has {t.shape[1]} landmarks but the criterion's scheme "
                                 f"{self.scheme.name} has {n}")
        if target.shape != pred.shape:
            raise ValueError(f"target must match pred's shape {list(pred.shape)}, got {list(target.shape)}")
        # One host sync per step; it turns a corrupt annotation into an error instead of a NaN loss.
        if self.check_targets and not torch.isfinite(target).all():
            b, k = torch.nonzero(~torch.isfinite(target))[0, :2].tolist()
            raise ValueError(f"target has NaN or infinite coordinates (image {b} of the batch, landmark {k})")
        if point_weight is not None:
            if not isinstance(point_weight, torch.Tensor) or point_weight.shape != pred.shape[:2]:
                raise ValueError(f"point_weight must have shape {list(pred.shape[:2])}, "
                                 f"got {list(getattr(point_weight, 'shape', []))}")

    def _relative(self, pred, target, point_weight):
        if self.name in FUSED_CRITERIA and hasattr(self.point_loss, "op_params"):
            return relative_location_loss(pred, target, self.relations, point_weight, self.name,
                                          reduction="mean", backend=self.op_backend, **self.point_loss.op_params())
        # Criteria the fused op lacks: the op gives |delta(pred) - delta(target)| per relation, the loss follows.
        residual = relative_location_loss(pred, target, self.relations, None, "l1", reduction="none",
                                          backend=self.op_backend)
        weight = None
        if point_weight is not None:
            anchor, indptr, member, _ = self.relations.tensors(pred.device)
            weight = relation_weight_reference(point_weight, anchor, indptr, member).unsqueeze(-1)
        return weighted_mean(self.point_loss.of_residual(residual), weight)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, point_weight: torch.Tensor | None = None,
                visibility_logits: torch.Tensor | None = None, visibility_labels: torch.Tensor | None = None):
        self._check(pred, target, point_weight)
        pred, target = pred.float(), target.float()
        point_weight = None if point_weight is None else point_weight.float()
        absolute = weighted_mean(self.point_loss.of_residual((pred - target).abs()),
                                 None if point_weight is None else point_weight.unsqueeze(-1))
        loss = self.absolute_weight * absolute
        relative = visibility = absolute.new_zeros(())
        if self.relations is not None:
            relative = self._relative(pred, target, point_weight)
            loss = loss + self.relative_weight * relative
        if visibility_logits is not None:
            visibility = visibility_loss(visibility_logits, visibility_labels)
            loss = loss + self.visibility_weight * visibility
        return loss, {"absolute": absolute.detach(), "relative": relative.detach(), "visibility": visibility.detach()}

    def extra_repr(self):
        return (f"scheme={self.scheme.name}, relative={'laplacian' if self.relations else None}, "
                f"absolute_weight={self.absolute_weight}, relative_weight={self.relative_weight}, "
                f"visibility_weight={self.visibility_weight}")


def build_criterion(name: str = "soft_wing", relative: str | None = "laplacian", relative_weight: float = 1.0,
                    scheme="wflw98", *, absolute_weight: float = 1.0, op_backend: str | None = None,
                    check_targets: bool = True, visibility_weight: float = 0.0,
                    **criterion_params) -> LandmarkCriterion:
    """The training criterion from config values (defaults: the paper's Soft Wing 2 / 20 / 0.5 + Laplacian, 1 : 1).

    name: "soft_wing", "wing", "adaptive_wing", "l1" or "mse", with its parameters as keywords (e.g. omega1=2);
    relative: "laplacian" (the relative-location loss over scheme.relation_neighbors) or None; op_backend: backend
    of the relative-location op (None = global default); check_targets: raise on NaN targets (one sync per call);
    visibility_weight: of the visibility head's loss. criterion(pred, target, point_weight=None,
    visibility_logits=None, visibility_labels=None) -> (loss, {"absolute", "relative", "visibility": Tensor}).
    """
    return LandmarkCriterion(build_point_loss(name, **criterion_params), scheme, relative, relative_weight,
                             absolute_weight, op_backend, check_targets, visibility_weight)
