"""Metrics on constructed cases with known per-image errors, and bad input.

    .venv/bin/python -m pytest -q tests/test_metrics.py
"""
import numpy as np
import pytest
import torch

from structalign.landmarks import COFW29, IBUG68, WFLW98
from structalign.metrics import (ced_curve, occlusion_table, per_image_nme, per_point_error, subset_table, summarize,
                                 visibility_auroc)


def faces(scheme, batch, ocular_distance=40.0, seed=0):
    """Random landmarks with the outer eye corners exactly `ocular_distance` apart."""
    pts = np.random.default_rng(seed).uniform(0, 100, size=(batch, scheme.num_points, 2))
    i, j = scheme.ocular
    pts[:, i] = (30.0, 50.0)
    pts[:, j] = (30.0 + ocular_distance, 50.0)
    return pts


@pytest.mark.parametrize("scheme", [WFLW98, IBUG68, COFW29])
def test_known_per_image_errors(scheme):
    target = faces(scheme, 3)
    shifts = np.array([0.02, 0.05, 0.2]) * 40.0  # every point moved by e_n * d_n
    angle = np.random.default_rng(1).uniform(0, 2 * np.pi, size=(3, scheme.num_points))
    pred = target + shifts[:, None, None] * np.stack([np.cos(angle), np.sin(angle)], -1)
    np.testing.assert_allclose(per_image_nme(pred, target, scheme.name), [0.02, 0.05, 0.2])
    np.testing.assert_allclose(per_point_error(torch.tensor(pred), torch.tensor(target), scheme.num_points),
                               np.repeat([[0.02], [0.05], [0.2]], scheme.num_points, 1), rtol=1e-5)


def test_inter_pupil_uses_pupil_group_centroids():
    target = faces(IBUG68, 1)
    target[0, 36:42] = (10.0, 0.0)
    target[0, 42:48] = (10.0, 25.0)
    pred = target + np.array([0.0, 2.5])
    np.testing.assert_allclose(per_image_nme(pred, target, "300w68", norm="inter_pupil"), [0.1])


def test_summary_values():
    errors = np.array([0.02, 0.05, 0.12, 0.08])
    s = summarize(errors)
    assert s["nme"] == pytest.approx(6.75)
    assert s["fr"] == pytest.approx(25.0)
    # AUC = mean(max(0, 0.1 - e)) / 0.1 = (0.08 + 0.05 + 0 + 0.02) / 4 / 0.1
    assert s["auc"] == pytest.approx(0.375)
    grid, ced = ced_curve(errors, steps=100001)
    assert np.trapezoid(ced, grid) / 0.1 == pytest.approx(s["auc"], abs=1e-4)
    np.testing.assert_allclose(ced_curve(errors, steps=5)[1], [0, 0.25, 0.5, 0.5, 0.75])
    assert summarize([0.0, 0.0]) == {"nme": 0.0, "fr": 0.0, "auc": 1.0}
    assert summarize([0.1, 0.3], threshold=0.1)["fr"] == 50.0  # e = threshold is not a failure


def test_subset_table():
    errors = np.array([0.02, 0.05, 0.12, 0.08])
    attributes = np.zeros((4, 6), dtype=int)
    attributes[[0, 2], 0] = 1  # pose
    attributes[3, 4] = 1  # occlusion
    table = subset_table(errors, attributes)
    assert table["full"]["count"] == 4 and table["full"]["nme"] == pytest.approx(6.75)
    assert table["pose"] == pytest.approx({"nme": 7.0, "fr": 50.0, "auc": 0.4, "count": 2})
    assert table["occlusion"]["nme"] == pytest.approx(8.0)
    assert table["blur"]["count"] == 0 and np.isnan(table["blur"]["nme"])
    with pytest.raises(ValueError, match=r"attributes must have shape \[4, 6\]"):
        subset_table(errors, attributes[:, :5])
    with pytest.raises(ValueError, match="0/1 flags"):
        subset_table(errors, attributes * 2)


def test_bad_input():
    target = faces(WFLW98, 2)
    target[1, 72] = target[1, 60]
    with pytest.raises(ValueError, match="inter-ocular distance is zero for image 1"):
        per_image_nme(target, target, "wflw98")
    target = faces(WFLW98, 2)
    pred = target.copy()
    pred[0, 7, 1] = np.nan
    with pytest.raises(ValueError, match=r"pred has NaN or infinite coordinates \(image 0, landmark 7\)"):
        per_image_nme(pred, target, "wflw98")
    with pytest.raises(ValueError, match="pred has 68 landmarks but the scheme has 98"):
        per_image_nme(faces(IBUG68, 1), target, "wflw98")
    with pytest.raises(ValueError, match="norm must be"):
        per_image_nme(target, target, "wflw98", norm="bbox")
    with pytest.raises(ValueError, match="errors must be"):
        summarize([])
    with pytest.raises(ValueError, match="finite"):
        summarize([0.1, np.nan])


def test_occlusion_table_splits_points_by_label_and_finds_heavily_occluded_faces():
    errors = np.array([[0.02, 0.04, 0.30, 0.10, 0.20],    # 1 of 4 labelled points occluded: 25 % -> heavy
                       [0.01, 0.01, 0.01, 0.01, 0.01],    # none occluded
                       [0.50, 0.50, 0.50, 0.50, 0.50]])   # nothing labelled: in neither group
    labels = np.array([[1, 1, 0, 1, -1], [1, 1, 1, 1, 1], [-1, -1, -1, -1, -1]])
    table = occlusion_table(errors, labels, threshold=0.1)
    assert table["nme_occluded"] == pytest.approx(30.0)
    assert table["nme_visible"] == pytest.approx(100 * np.mean([0.02, 0.04, 0.10] + [0.01] * 5))
    heavy = table["heavy"]
    assert heavy["count"] == 1 and heavy["nme"] == pytest.approx(100 * errors[0].mean()) and heavy["fr"] == 100.0
    assert occlusion_table(errors, -np.ones_like(labels)) is None
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        occlusion_table(errors, labels[:, :4])


def test_visibility_auroc_is_the_share_of_correctly_ordered_pairs():
    rng = np.random.default_rng(0)
    labels = rng.choice([-1, 0, 1], size=(20, 30))
    scores = np.round(rng.uniform(size=(20, 30)) + 0.3 * (labels == 1), 1)  # ties on purpose
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert visibility_auroc(scores, labels) == pytest.approx(pairs)
    assert visibility_auroc(scores, np.where(labels == 0, 1, labels)) is None  # no occluded point
    with pytest.raises(ValueError, match="shape"):
        visibility_auroc(scores[:, :3], labels)
