"""Face-alignment metrics (method.md §5): NME, FR, AUC, CED curves and WFLW subset tables (the CED plot:
structalign.render.plot_ced).

Per-image error e_n = (1/N) sum_k ||pred_nk - target_nk|| / d_n, with d_n the inter-ocular distance (outer eye
corners: WFLW 60/72, 300W 36/45, COFW 8/9), the inter-pupil distance (between the two pupil-group centroids of the
scheme) or the box size sqrt(w h) of the target landmarks. Errors are fractions; `summarize` reports NME and FR in % and AUC in [0, 1].
"""
from __future__ import annotations

import numpy as np
from scipy.stats import mannwhitneyu

from structalign.errors import InputError
from structalign.landmarks import LandmarkScheme, resolve_scheme

NORMS = ("inter_ocular", "inter_pupil", "box")
WFLW_SUBSETS = ("pose", "expression", "illumination", "make-up", "occlusion", "blur")


def _as_points(name: str, value, num_points: int) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[-1] != 2:
        raise InputError(f"{name} must have shape [B, N, 2], got {list(arr.shape)}")
    if arr.shape[1] != num_points:
        raise InputError(f"{name} has {arr.shape[1]} landmarks but the scheme has {num_points}")
    bad = ~np.isfinite(arr)
    if bad.any():
        b, k = np.argwhere(bad)[0, :2]
        raise InputError(f"{name} has NaN or infinite coordinates (image {b}, landmark {k})")
    return arr


def normalizer(target: np.ndarray, scheme: LandmarkScheme, norm: str = "inter_ocular") -> np.ndarray:
    """d_n per image (array[B]) from target (array[B, N, 2]): the distance between the centroids of the scheme's two
    inter-ocular or inter-pupil point groups, or (box) sqrt(width * height) of the target landmarks' bounding box."""
    if norm == "box":
        extent = target.max(axis=1) - target.min(axis=1)
        return np.sqrt(extent[:, 0] * extent[:, 1])
    if norm not in ("inter_ocular", "inter_pupil"):
        raise InputError(f"norm must be one of {NORMS}, got {norm!r}")
    left, right = scheme.ocular if norm == "inter_ocular" else scheme.pupils
    a, b = target[:, list(left)].mean(axis=1), target[:, list(right)].mean(axis=1)
    return np.linalg.norm(a - b, axis=-1)


def per_point_error(pred, target, scheme, norm: str = "inter_ocular") -> np.ndarray:
    """||pred - target|| / d_n per landmark: array[B, N]. pred, target (array or Tensor [B, N, 2] / [N, 2])."""
    scheme = resolve_scheme(scheme)
    pred = _as_points("pred", pred, scheme.num_points)
    target = _as_points("target", target, scheme.num_points)
    if pred.shape != target.shape:
        raise InputError(f"pred has shape {list(pred.shape)} but target has {list(target.shape)}")
    d = normalizer(target, scheme, norm)
    if (d <= 0).any():
        n = int(np.argwhere(d <= 0)[0, 0])
        raise InputError(f"{norm.replace('_', '-')} distance is zero for image {n} of the batch "
                         f"(its two normalising points coincide)")
    return np.linalg.norm(pred - target, axis=-1) / d[:, None]


def per_image_nme(pred, target, scheme, norm: str = "inter_ocular") -> np.ndarray:
    """Per-image NME e_n (array[B], fractions: 0.05 = 5 %)."""
    return per_point_error(pred, target, scheme, norm).mean(axis=1)


def _errors(errors) -> np.ndarray:
    arr = np.asarray(errors, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise InputError(f"errors must be a non-empty 1-D array of per-image errors, got shape {list(arr.shape)}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise InputError("errors must be finite and >= 0")
    return arr


def _threshold(threshold) -> float:
    if not isinstance(threshold, (int, float)) or not 0 < threshold < np.inf:
        raise InputError(f"threshold must be a number > 0, got {threshold!r}")
    return float(threshold)


def summarize(errors, threshold: float = 0.1) -> dict:
    """{"nme": mean error in %, "fr": % of images with e > threshold, "auc": AUC@threshold in [0, 1]}.

    AUC = (1/threshold) * integral_0^threshold CED(t) dt, integrated exactly for the empirical CED (a step
    function): each image contributes max(0, threshold - e_n) / threshold. The official SC script's 20-point
    trapezoid (step 0.005) and STAR's 1e-4 grid approximate this; they differ by ~1e-3.
    """
    e, t = _errors(errors), _threshold(threshold)
    return {"nme": float(e.mean() * 100), "fr": float((e > t).mean() * 100),
            "auc": float(np.clip(t - e, 0.0, None).mean() / t)}


def ced_curve(errors, threshold: float = 0.1, steps: int = 1001) -> tuple:
    """Cumulative error distribution: (t (array[steps]) from 0 to threshold, fraction of images with e <= t)."""
    e, t = _errors(errors), _threshold(threshold)
    if not isinstance(steps, int) or steps < 2:
        raise InputError(f"steps must be an int >= 2, got {steps!r}")
    grid = np.linspace(0.0, t, steps)
    return grid, np.searchsorted(np.sort(e), grid, side="right") / e.size


def subset_table(errors, attributes, threshold: float = 0.1, names=WFLW_SUBSETS) -> dict:
    """Summaries of the full set and of each attribute subset: {"full": {...}, "pose": {...}, ...}.

    errors (array[B]); attributes (array[B, 6] of 0/1 flags, WFLW order pose, expression, illumination, make-up,
    occlusion, blur). Each entry: nme, fr, auc (as `summarize`) and count; a subset with no image has NaN metrics.
    """
    e = _errors(errors)
    attr = np.asarray(attributes)
    if attr.shape != (e.size, len(names)):
        raise InputError(f"attributes must have shape [{e.size}, {len(names)}] (one flag per subset), "
                         f"got {list(attr.shape)}")
    if not np.isin(attr, (0, 1)).all():
        raise InputError("attributes must be 0/1 flags")
    table = {"full": {**summarize(e, threshold), "count": int(e.size)}}
    for k, name in enumerate(names):
        sel = e[attr[:, k] == 1]
        stats = summarize(sel, threshold) if sel.size else {"nme": np.nan, "fr": np.nan, "auc": np.nan}
        table[name] = {**stats, "count": int(sel.size)}
    return table



HEAVY_OCCLUSION = 0.2  # a face is heavily occluded when at least this share of its labelled points is occluded


def occlusion_table(point_errors, visibility, threshold: float = 0.1, heavy: float = HEAVY_OCCLUSION) -> dict:
    """NME on occluded and on visible points, and the faces with at least `heavy` of their labelled points occluded.

    point_errors (array[B, N], fractions); visibility (array[B, N]: 1 visible, 0 occluded, -1 unlabelled).
    Returns {"nme_occluded", "nme_visible" (% over the points with that label; None where there are none),
    "heavy": {nme, fr, auc, count} over the heavily occluded faces (NaN metrics when there are none)}; None when no
    point is labelled.
    """
    err = np.asarray(point_errors, dtype=np.float64)
    labels = np.asarray(visibility)
    if err.ndim != 2 or labels.shape != err.shape:
        raise InputError(f"point_errors and visibility must both have shape [B, N], got {list(err.shape)} and "
                         f"{list(labels.shape)}")
    occluded, visible = labels == 0, labels == 1
    labelled = (occluded | visible).sum(axis=1)
    if not labelled.any():
        return None
    share = occluded.sum(axis=1) / np.maximum(labelled, 1)
    faces = err.mean(axis=1)[(labelled > 0) & (share >= heavy)]
    heavy_stats = summarize(faces, threshold) if faces.size else {"nme": np.nan, "fr": np.nan, "auc": np.nan}
    return {"nme_occluded": float(100 * err[occluded].mean()) if occluded.any() else None,
            "nme_visible": float(100 * err[visible].mean()) if visible.any() else None,
            "heavy": {**heavy_stats, "count": int(faces.size)}}


def visibility_auroc(scores, visibility) -> float | None:
    """Area under the ROC curve of scores (array[B, N], P(visible)) for telling visible (label 1) from occluded
    (label 0) points (unlabelled -1 ignored): the Mann-Whitney U statistic / (n_visible n_occluded); None when
    either class is empty."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(visibility)
    if scores.shape != labels.shape:
        raise InputError(f"scores must match the labels' shape {list(labels.shape)}, got {list(scores.shape)}")
    visible, occluded = scores[labels == 1], scores[labels == 0]
    if not visible.size or not occluded.size:
        return None
    return float(mannwhitneyu(visible, occluded).statistic / (visible.size * occluded.size))
