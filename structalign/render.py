"""Pictures of results: landmark overlays (`structalign eval`'s worst, median and best images, `structalign
predict`'s pictures and video frames, all drawn by `draw_landmarks`) and CED plots.

Coordinates are image pixels with pixel centres at integers, the convention of the datasets, of predict's outputs and
of cv2's drawing; cv2 draws anti-aliased at 1/16-pixel precision on numpy arrays, the form video frames already have.
"""
import os

import cv2
import numpy as np
from PIL import Image

from structalign import metrics
from structalign.data.reference_pipeline import read_rgb
from structalign.errors import InputError

PREDICTION_COLOUR = (255, 40, 40)  # red
REFERENCE_COLOUR = (40, 220, 40)  # green
BOX_COLOUR = (255, 220, 0)  # yellow
_SHIFT = 4  # cv2 fixed-point coordinates: 4 fractional bits, 1/16 px
_SCALE = 1 << _SHIFT


def _fixed(value: float) -> int:
    return int(round(float(value) * _SCALE))


def draw_landmarks(rgb: np.ndarray, points=(), reference=(), boxes=(), occluded=()) -> np.ndarray:
    """A copy of rgb (uint8[H, W, 3]) with the boxes (each x0, y0, x1, y1) in yellow, then the reference point sets
    (each array[N, 2]) in green, then the point sets (each array[N, 2]) in red; dots of radius max(H, W) / 200 px,
    at least 1 px. occluded: per point set of `points`, bool[N] or None: its True points are drawn as rings (1.5 x
    the dot radius, hollow) instead of dots, e.g. points predicted occluded."""
    out = np.array(rgb, dtype=np.uint8, order="C", copy=True)
    if out.ndim != 3 or out.shape[2] != 3:
        raise InputError(f"an overlay needs an RGB image of shape [H, W, 3], got {list(out.shape)}")
    radius = max(1.0, max(out.shape[:2]) / 200)
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(out, (_fixed(x0), _fixed(y0)), (_fixed(x1), _fixed(y1)), BOX_COLOUR,
                      max(1, round(radius / 2)), cv2.LINE_AA, shift=_SHIFT)
    rings = list(occluded) + [None] * (len(points) - len(occluded))
    for point_sets, colour, hollow in ((reference, REFERENCE_COLOUR, [None] * len(reference)),
                                       (points, PREDICTION_COLOUR, rings)):
        for pts, ring in zip(point_sets, hollow):
            pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
            ring = np.zeros(len(pts), bool) if ring is None else np.asarray(ring, bool).reshape(-1)
            if len(ring) != len(pts):
                raise InputError(f"occluded: {len(ring)} flags for a set of {len(pts)} points")
            for (x, y), hollow_point in zip(pts, ring):
                size, thickness = ((_fixed(1.5 * radius), max(1, round(radius / 2))) if hollow_point
                                   else (_fixed(radius), -1))  # thickness -1: filled
                cv2.circle(out, (_fixed(x), _fixed(y)), size, colour, thickness, cv2.LINE_AA, shift=_SHIFT)
    return out


def save_overlay(image_path: str, out_path: str, points=(), reference=(), boxes=()) -> str:
    """Write out_path (PNG): image_path with `draw_landmarks(image, points, reference, boxes)`; returns out_path.
    DatasetError naming image_path when it cannot be read."""
    picture = draw_landmarks(np.asarray(read_rgb(image_path)), points, reference, boxes)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    Image.fromarray(picture).save(out_path)
    return out_path


def plot_ced(curves: dict, path, threshold: float = 0.1) -> None:
    """Write a PNG of the CED curves of several methods: curves {name: per-image errors (array[B])}."""
    if not isinstance(curves, dict) or not curves:
        raise InputError("curves must be a non-empty dict {name: per-image errors}")
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write the CED plot {path!r}: folder {parent!r} does not exist")
    from matplotlib.figure import Figure  # no pyplot: no global backend state, nothing left open

    fig = Figure(figsize=(5, 4), dpi=120)
    ax = fig.subplots()
    for name, errors in curves.items():
        grid, ced = metrics.ced_curve(errors, threshold)
        s = metrics.summarize(errors, threshold)
        ax.plot(grid, ced, label=f"{name} (NME {s['nme']:.2f}%, FR {s['fr']:.2f}%, AUC {s['auc']:.3f})")
    ax.set_xlim(0, threshold)
    ax.set_ylim(0, 1)
    ax.set_xlabel("normalised point-to-point error")
    ax.set_ylabel("fraction of images")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
