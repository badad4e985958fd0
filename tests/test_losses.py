"""Losses: hand-computed values, the relative-location term against a loop over the relations, bad input.

    .venv/bin/python -m pytest -q tests/test_losses.py
"""
import math

import pytest
import torch

from structalign.landmarks import COFW29, WFLW98
from structalign.losses import (AdaptiveWingLoss, L1Loss, MSELoss, SoftWingLoss, WingLoss, build_criterion,
                                build_point_loss, visibility_loss)


def test_soft_wing_is_continuous_at_omega1_and_matches_the_formula():
    loss = SoftWingLoss()
    x = torch.tensor([2.0 - 1e-6, 2.0, 2.0 + 1e-6])
    values = loss.of_residual(x)
    torch.testing.assert_close(values, torch.full((3,), 2.0), rtol=0, atol=1e-5)
    b = 2.0 - 20.0 * math.log(5.0)
    assert loss.b == pytest.approx(-30.188758, abs=1e-5)
    torch.testing.assert_close(loss.of_residual(torch.tensor([0.5, 10.0])),
                               torch.tensor([0.5, 20.0 * math.log(21.0) + b]))


def test_soft_wing_and_wing_on_ones_vs_zeros():
    pred, target = torch.ones(1, 3, 2), torch.zeros(1, 3, 2)
    assert SoftWingLoss()(pred, target).item() == pytest.approx(1.0)
    # The loss is the mean over B x N x 2 of both branches: residuals 0.5 (linear) and 10 (log) in one batch.
    b = 2.0 - 20.0 * math.log(5.0)
    mixed = SoftWingLoss()(torch.tensor([[[0.5, 10.0]], [[0.0, 0.0]]]), torch.zeros(2, 1, 2))
    assert mixed.item() == pytest.approx((0.5 + 20.0 * math.log(21.0) + b) / 4)
    # mmpose sums over K x D and averages over the batch: 24.3279 for Wing here (method.md §2.4).
    assert WingLoss()(pred, target).item() * 6 == pytest.approx(24.3279, abs=1e-4)
    assert WingLoss()(pred, pred).item() == 0.0
    # Wing is continuous at omega: omega ln(1 + omega / epsilon) = omega - C.
    w = WingLoss(omega=10, epsilon=2)
    torch.testing.assert_close(w.of_residual(torch.tensor([10.0 - 1e-5, 10.0])), torch.full((2,), 10 * math.log(6.0)))


def test_adaptive_wing_mmpose_values():
    loss = AdaptiveWingLoss()
    assert loss(torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)).item() == pytest.approx(8.4959, abs=1e-4)
    assert loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)).item() == 0.0
    weight = torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    assert loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), weight).item() == 0.0
    assert loss(torch.ones(1, 3, 1), torch.ones(1, 3, 1)).item() == 0.0


def test_l1_and_mse():
    pred, target = torch.tensor([[[3.0, -1.0]]]), torch.zeros(1, 1, 2)
    assert L1Loss()(pred, target).item() == pytest.approx(2.0)
    assert MSELoss()(pred, target).item() == pytest.approx(5.0)


def _relative_by_loops(pred, target, scheme, point_loss, visible=None):
    """Mean over (b, i, c) of loss(|delta_i(pred) - delta_i(target)|), as plain loops; relations touching a
    point with visible[b, k] == 0 are left out."""
    values = []
    for b in range(pred.shape[0]):
        for i, js in enumerate(scheme.relation_neighbors):
            if not js or (visible is not None and not all(visible[b, k] for k in (i, *js))):
                continue
            for c in range(2):
                d = sum(pred[b, j, c] - target[b, j, c] for j in js) / len(js) - (pred[b, i, c] - target[b, i, c])
                values.append(point_loss.of_residual(d.abs().reshape(1)))
    return torch.cat(values).mean()


@pytest.mark.parametrize("name", ["soft_wing", "wing", "l1"])
def test_relative_term_against_loops(name):
    scheme = COFW29  # hand-made graph: nodes without out-edges take no relative term
    pred, target = torch.rand(2, 29, 2) * 40, torch.rand(2, 29, 2) * 40
    criterion = build_criterion(name, scheme="cofw29", relative_weight=0.5, op_backend="reference")
    loss, parts = criterion(pred, target)
    expected_rel = _relative_by_loops(pred, target, scheme, criterion.point_loss)
    expected_abs = criterion.point_loss.of_residual((pred - target).abs()).mean()
    torch.testing.assert_close(parts["relative"], expected_rel, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts["absolute"], expected_abs)
    torch.testing.assert_close(loss, expected_abs + 0.5 * expected_rel, rtol=1e-5, atol=1e-5)


def test_without_relative_term_and_with_weights():
    pred, target = torch.rand(2, 98, 2) * 10, torch.rand(2, 98, 2) * 10
    loss, parts = build_criterion(relative=None, absolute_weight=2.0, op_backend="reference")(pred, target)
    assert parts["relative"].item() == 0.0
    torch.testing.assert_close(loss, 2.0 * parts["absolute"])


@pytest.mark.parametrize("name", ["soft_wing", "wing"])
def test_visibility_drops_hidden_points_from_both_terms(name):
    pred, target = torch.rand(1, 98, 2) * 20, torch.rand(1, 98, 2) * 20
    visibility = torch.ones(1, 98)
    visibility[0, 60] = 0
    criterion = build_criterion(name, op_backend="reference")
    base, _ = criterion(pred, target, visibility)
    moved = pred.clone()
    moved[0, 60] += 50.0  # a hidden point's prediction does not matter
    loss, parts = criterion(moved, target, visibility)
    torch.testing.assert_close(loss, base)
    expected = _relative_by_loops(pred, target, WFLW98, criterion.point_loss, visibility)
    torch.testing.assert_close(parts["relative"], expected, rtol=1e-5, atol=1e-5)
    visible = [k for k in range(98) if k != 60]
    torch.testing.assert_close(parts["absolute"],
                               criterion.point_loss.of_residual((pred - target).abs())[:, visible].mean())


def test_gradient_reaches_pred_only():
    pred = (torch.rand(2, 68, 2) * 30).requires_grad_()
    target = torch.rand(2, 68, 2) * 30
    loss, _ = build_criterion(scheme="300w68", op_backend="reference")(pred, target)
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_bad_input():
    criterion = build_criterion(op_backend="reference")
    with pytest.raises(ValueError, match="68 landmarks but the criterion's scheme wflw98 has 98"):
        criterion(torch.rand(2, 68, 2), torch.rand(2, 68, 2))
    target = torch.rand(2, 98, 2)
    target[1, 5, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite coordinates \(image 1 of the batch, landmark 5\)"):
        criterion(torch.rand(2, 98, 2), target)
    with pytest.raises(ValueError, match=r"point_weight must have shape \[2, 98\]"):
        criterion(torch.rand(2, 98, 2), torch.rand(2, 98, 2), torch.ones(2, 68))
    with pytest.raises(ValueError, match="no parameter 'omega'"):
        build_criterion("soft_wing", omega=3)
    with pytest.raises(ValueError, match="criterion name"):
        build_point_loss("huber")
    with pytest.raises(ValueError, match="epsilon must be"):
        build_criterion("wing", epsilon=0)
    with pytest.raises(ValueError, match="relative must be"):
        build_criterion(relative="pairs")
    with pytest.raises(ValueError, match="relative_weight"):
        build_criterion(relative_weight=-1)
    with pytest.raises(ValueError, match="op_backend"):
        build_criterion(op_backend="fused")


@pytest.mark.parametrize("name", ["soft_wing", "wing"])
def test_empty_batch_gives_zero(name):
    loss, parts = build_criterion(name, op_backend="reference")(torch.zeros(0, 98, 2), torch.zeros(0, 98, 2))
    assert loss.item() == 0.0 and parts["relative"].item() == 0.0


def test_the_visibility_term_is_part_of_the_criterion():
    torch.manual_seed(0)
    pred, target = torch.rand(2, 98, 2) * 30, torch.rand(2, 98, 2) * 30
    logits = torch.randn(2, 98, requires_grad=True)
    labels = torch.randint(-1, 2, (2, 98)).float()  # visible, occluded and unlabelled points
    plain, plain_parts = build_criterion(op_backend="reference")(pred, target)
    loss, parts = build_criterion(op_backend="reference", visibility_weight=0.5)(pred, target, None, logits, labels)
    assert parts["visibility"] == visibility_loss(logits, labels).detach() and parts["visibility"] > 0
    torch.testing.assert_close(loss, plain + 0.5 * parts["visibility"])
    loss.backward()
    assert logits.grad[labels < 0].eq(0).all() and logits.grad[labels >= 0].ne(0).all()
    assert plain_parts["visibility"] == 0  # no logits: no visibility term
