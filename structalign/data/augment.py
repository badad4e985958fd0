"""Augmentation parameters and geometry shared by the DALI and the reference pipelines.

Every random draw of a sample is a pure function of (seed, epoch, position in the epoch order): `draw_sample`.
From the draws and the face box, `sample_matrix` builds the one affine that moves both the image and the landmarks;
`colour_gain_offset` gives the brightness / contrast map. Both pipelines apply exactly these, so they can
be compared under identical draws and an epoch can be resumed at any batch.

Coordinates: pixel centres at integers in the original image and in the S x S crop (crop centre (S - 1) / 2).
Crop: a square of side padding x max(box width, box height) around the box centre, resized to S x S
(padding: data.crop_padding, default CROP_PADDING, chosen so that under the default augmentation at most 5 % of
samples have a landmark outside the crop; benchmarks/RESULTS.md "crop padding from measurement", `structalign data
check --augment`).
Colour: saturation blends each pixel with its grey level (luma 0.299 R + 0.587 G + 0.114 B, rounded), then contrast
about 128 and brightness scale it: gain * (s * rgb + (1 - s) * grey) + offset, in float, without clipping.
Normalisation: (rgb - NORM_MEAN) / NORM_STD per channel on 0..255 values (ImageNet statistics).
"""
from dataclasses import dataclass

import numpy as np

from structalign.data.records import OCCLUDED, UNLABELLED

NORM_MEAN = (123.675, 116.28, 103.53)
NORM_STD = (58.395, 57.12, 57.375)
LUMA = np.array([0.299, 0.587, 0.114])
CONTRAST_CENTER = 128.0
_SAMPLE_STREAM = 0x5EED
CROP_PADDING = 1.5


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; defaults follow the paper's released recipe (method.md §1.6).

    rotation: max |angle| in degrees; scale: (lo, hi) of a uniform zoom factor; translation: max shift as a fraction
    of the crop side; flip: probability of a horizontal mirror (landmarks re-indexed by the scheme's flip table);
    occlusion: probability of one rectangle of occlusion_area x crop area, aspect in occlusion_aspect, uniform random
    colour; brightness / contrast / saturation: max relative change (factor in [1 - v, 1 + v]); fill: grey level
    outside the source image.
    """

    rotation: float = 40.0
    scale: tuple = (0.9314, 1.0686)
    translation: float = 0.1
    flip: float = 0.5
    occlusion: float = 0.5
    occlusion_area: float = 0.2
    occlusion_aspect: tuple = (0.4, 2.5)
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.25
    fill: float = 127.0

    def __post_init__(self):
        for name in ("rotation", "translation", "brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("flip", "occlusion", "occlusion_area"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("scale", "occlusion_aspect"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # YAML configs give lists
            if len(getattr(self, name)) != 2:
                raise ValueError(f"AugmentConfig.{name} must be (lo, hi), got {getattr(self, name)}")
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"AugmentConfig.{name} must be (lo, hi) with 0 < lo <= hi, got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) >= 1:
                raise ValueError(f"AugmentConfig.{name} must be < 1 (factor 1 - v must stay positive)")


@dataclass(frozen=True)
class SampleDraw:
    """The random draws of one sample. occlusion: integer pixel rectangle (x0, y0, x1, y1) of the crop, half-open,
    or None; occlusion_colour: RGB 0..255."""

    angle: float = 0.0
    scale: float = 1.0
    shift: tuple = (0.0, 0.0)
    flip: bool = False
    occlusion: tuple = None
    occlusion_colour: tuple = (0.0, 0.0, 0.0)
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0


IDENTITY = SampleDraw()


def draw_sample(cfg: AugmentConfig, size: int, seed: int, epoch: int, position: int) -> SampleDraw:
    """The draws of the sample at `position` of epoch `epoch`'s order, for an S = size crop."""
    rng = np.random.default_rng([_SAMPLE_STREAM, seed, epoch, position])
    u = rng.random(12)
    angle = (2 * u[0] - 1) * cfg.rotation
    scale = cfg.scale[0] + u[1] * (cfg.scale[1] - cfg.scale[0])
    shift = ((2 * u[2] - 1) * cfg.translation * size, (2 * u[3] - 1) * cfg.translation * size)
    flip = bool(u[4] < cfg.flip)
    occlusion = None
    if u[5] < cfg.occlusion:
        area = cfg.occlusion_area * size * size
        aspect = cfg.occlusion_aspect[0] + u[6] * (cfg.occlusion_aspect[1] - cfg.occlusion_aspect[0])
        w, h = min(size, np.sqrt(area * aspect)), min(size, np.sqrt(area / aspect))
        cx, cy = u[7] * size, u[8] * size
        x0, y0 = int(round(max(0.0, cx - w / 2))), int(round(max(0.0, cy - h / 2)))
        x1, y1 = int(round(min(size, cx + w / 2))), int(round(min(size, cy + h / 2)))
        if x1 > x0 and y1 > y0:
            occlusion = (x0, y0, x1, y1)
    colour = tuple(float(c) for c in rng.integers(0, 256, size=3))

    def factor(v, r):
        return 1.0 + (2 * r - 1) * v

    return SampleDraw(angle, scale, shift, flip, occlusion, colour,
                      factor(cfg.brightness, u[9]), factor(cfg.contrast, u[10]), factor(cfg.saturation, u[11]))


def sample_matrix(box, size: int, draw: SampleDraw = IDENTITY, padding: float = CROP_PADDING) -> np.ndarray:
    """The affine (float64[2, 3]) from original-image pixels to crop pixels: crop around box, then the draw's
    rotation, zoom, shift and mirror about the crop centre."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = padding * max(x1 - x0, y1 - y0)
    zoom = draw.scale * size / side
    a = np.deg2rad(draw.angle)
    linear = zoom * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    if draw.flip:
        linear = np.diag([-1.0, 1.0]) @ linear
    centre_in = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    centre_out = np.full(2, (size - 1) / 2) + np.asarray(draw.shift)
    return np.concatenate([linear, (centre_out - linear @ centre_in)[:, None]], axis=1)


def to_pixel_corner(matrix: np.ndarray) -> np.ndarray:
    """The same affine in the pixel-corner convention (pixel i spans [i, i + 1)) that DALI's warp_affine uses."""
    out = np.array(matrix, dtype=np.float64)
    out[:, 2] += 0.5 - 0.5 * out[:, :2].sum(axis=1)
    return out


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """points (float[N, 2]) moved by matrix (float[2, 3])."""
    return points @ matrix[:, :2].T + matrix[:, 2]


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """The inverse (float64[2, 3]) of an affine (float[2, 3]), e.g. to map crop predictions back to the image."""
    linear = np.linalg.inv(np.asarray(matrix, np.float64)[:, :2])
    return np.concatenate([linear, -(linear @ np.asarray(matrix, np.float64)[:, 2])[:, None]], axis=1)


def colour_gain_offset(draw: SampleDraw):
    """(gain, offset): contrast about 128 then brightness, rgb -> gain * rgb + offset, after the saturation blend."""
    return draw.brightness * draw.contrast, draw.brightness * (1 - draw.contrast) * CONTRAST_CENTER


def flip_order(scheme, draw: SampleDraw) -> np.ndarray:
    """Landmark order after the draw's mirror: new point i is old point flip[i] (identity without a mirror)."""
    return scheme.flip_array() if draw.flip else np.arange(scheme.num_points)


def inside_crop(points: np.ndarray, size: int) -> np.ndarray:
    """Whether (bool[..., N]) crop points (float[..., N, 2]) lie inside the S x S crop."""
    return np.all((points > -0.5) & (points < size - 0.5), axis=-1)


def crop_visibility(points: np.ndarray, visibility: np.ndarray, size: int, occlusion) -> np.ndarray:
    """Visibility labels (float32[N]) of crop points (float[N, 2]) given the record's (float32[N], same order):
    UNLABELLED outside the crop (neither visible nor occluded: not in the picture, yet not hidden by anything),
    OCCLUDED inside the crop under the occlusion rectangle (x0, y0, x1, y1, half-open pixels, or None; exact, so
    even where the record has no label), otherwise the record's label."""
    labels = np.where(inside_crop(points, size), visibility, UNLABELLED).astype(np.float32)
    if occlusion is not None:
        x0, y0, x1, y1 = occlusion
        under = ((points[:, 0] >= x0 - 0.5) & (points[:, 0] < x1 - 0.5) &
                 (points[:, 1] >= y0 - 0.5) & (points[:, 1] < y1 - 0.5))
        labels[under] = OCCLUDED
    return labels


@dataclass(frozen=True)
class PlannedSample:
    """What both pipelines do to one record: matrix (float64[2, 3], original -> crop pixels), landmarks and
    visibility already in the mirrored order (float32[N, 2], float32[N]), and the draw for occlusion and colour."""

    matrix: np.ndarray
    landmarks: np.ndarray
    visibility: np.ndarray
    draw: SampleDraw


def plan_sample(record, scheme, size: int, draw: SampleDraw = IDENTITY, padding: float = CROP_PADDING) -> PlannedSample:
    order = flip_order(scheme, draw)
    return PlannedSample(sample_matrix(record.box, size, draw, padding), record.landmarks[order],
                         record.visibility[order], draw)


def out_of_crop_rate(ds, augment: AugmentConfig, padding: float = CROP_PADDING, size: int = 256, draws: int = 2000,
                     seed: int = 0):
    """(share of samples with at least one landmark outside the crop, share of landmarks outside) over
    max(draws, len(ds)) augmented samples of ds (sample k: record k % len, epoch k // len), as training draws them."""
    total = max(draws, len(ds))
    lost_samples, lost_points = 0, 0
    for k in range(total):
        index, epoch = k % len(ds), k // len(ds)
        planned = plan_sample(ds[index], ds.scheme, size, draw_sample(augment, size, seed, epoch, index), padding)
        points = transform_points(planned.landmarks.astype(np.float64), planned.matrix)
        outside = ~inside_crop(points, size)
        lost_samples += bool(outside.any())
        lost_points += int(outside.sum())
    return lost_samples / total, lost_points / (total * ds.scheme.num_points)
