"""Built-in default data: face-like drawings with WFLW's 98-point topology, written in the WFLW raw layout.

    structalign data synth data/synth --num-train 1500 --num-test 300
    .venv/bin/python -m pytest -q tests/data/test_synth.py

Each face is a 3-D template of the 98 WFLW points (contour 0-32, brows 33-50, nose 51-59, eyes 60-75, mouth 76-95,
pupils 96-97) deformed by an expression (open mouth, smile, raised brows, gaze), rotated in depth (yaw, pitch) and in
the plane (roll), projected, scaled and placed on a cluttered background; the drawing follows the points, so every
landmark sits on visible structure (a corner, an edge, a lip line, a pupil). Illumination (gradients, dark/bright),
make-up (lip colour, eyeliner), occlusion (patches over parts) and blur vary too, and the six WFLW attribute flags
record the strong cases. Deterministic for a seed: image i depends only on (seed, split, i).

Each landmark also gets an exact visibility label from the rendering: every occluder is drawn onto a mask too, and a
landmark is OCCLUDED where the mask covers its nearest pixel centre, VISIBLE elsewhere (UNLABELLED off the image).
The labels go to a sidecar next to each annotation file, list_98pt_rect_attr_{split}.visibility.txt (one line of 98
labels 1 / 0 / -1 per annotation line; structalign/data/wflw.py reads it).
"""
import os
from functools import partial
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from structalign.data.records import OCCLUDED, UNLABELLED, VISIBLE
from structalign.data.wflw import visibility_path
from structalign.errors import InputError

_SPLIT_STREAM = {"train": 1, "test": 2}
FLAG_RATE = 0.2  # probability of each attribute flag (pose, expression, illumination, make-up, occlusion, blur)


def _template() -> np.ndarray:
    """The neutral 3-D face (float64[98, 3]): x right, y down, z towards the camera; half face width = 1."""
    p = np.zeros((98, 3))
    a = np.deg2rad(np.linspace(-12, 192, 33))
    p[0:33, 0], p[0:33, 1] = -np.cos(a), 0.05 + 1.1 * np.sin(a)
    upper = lambda x: -0.56 - 0.13 * np.sin(np.pi * (x + 0.88) / 0.7)  # noqa: E731
    xs = np.linspace(-0.88, -0.18, 5)
    p[33:38, 0], p[33:38, 1] = xs, upper(xs)
    xs = np.array([-0.24, -0.40, -0.57, -0.74])
    p[38:42, 0], p[38:42, 1] = xs, upper(xs) + 0.09
    brow_mirror = [37, 36, 35, 34, 33, 41, 40, 39, 38]
    p[42:51] = p[brow_mirror] * [-1, 1, 1]
    p[51:55, 1] = np.linspace(-0.38, 0.12, 4)
    p[55:60, 0], p[55:60, 1] = [-0.22, -0.11, 0, 0.11, 0.22], [0.22, 0.27, 0.29, 0.27, 0.22]
    beta = np.deg2rad([180, 135, 90, 45, 0, -45, -90, -135])
    for start, cx in ((60, -0.45), (68, 0.45)):
        p[start:start + 8, 0] = cx + 0.22 * np.cos(beta)
        p[start:start + 8, 1] = -0.3 - np.where(np.sin(beta) > 0, 0.10, 0.07) * np.sin(beta)
    p[96, :2], p[97, :2] = (-0.45, -0.3), (0.45, -0.3)
    p[76:88, 0] = [-0.38, -0.25, -0.12, 0, 0.12, 0.25, 0.38, 0.25, 0.12, 0, -0.12, -0.25]
    p[76:88, 1] = 0.62 + np.array([0, -0.07, -0.12, -0.09, -0.12, -0.07, 0, 0.10, 0.15, 0.16, 0.15, 0.10])
    p[88:96, 0] = [-0.30, -0.13, 0, 0.13, 0.30, 0.13, 0, -0.13]
    p[88:96, 1] = 0.62 + np.array([0, -0.02, -0.02, -0.02, 0, 0.02, 0.02, 0.02])
    p[:, 2] = 0.8 * np.sqrt(np.clip(1.05 - p[:, 0] ** 2, 0, None))
    p[51:55, 2] += np.linspace(0.1, 0.4, 4)
    p[55:60, 2] += [0.1, 0.2, 0.25, 0.2, 0.1]
    return p


TEMPLATE = _template()
MOUTH_LOWER = [83, 84, 85, 86, 87, 93, 94, 95]


def _face_points(rng, strong_pose: bool, strong_expression: bool):
    """(landmarks float64[98, 2] in face units, forehead outline float64[k, 2]) of one randomly posed face."""
    p = TEMPLATE.copy()
    mouth_open = rng.uniform(0.15, 0.4) if strong_expression and rng.random() < 0.6 else rng.uniform(0, 0.08)
    p[MOUTH_LOWER, 1] += mouth_open * np.array([0.6, 0.9, 1, 0.9, 0.6, 1, 1.1, 1])
    p[88:96, 1] += np.where(np.arange(88, 96) >= 93, mouth_open * 0.85, 0)
    p[10:23, 1] += mouth_open * 0.5 * np.sin(np.linspace(0, np.pi, 13))
    smile = rng.uniform(-0.05, 0.12) if not strong_expression else rng.uniform(0.08, 0.2)
    p[[76, 82, 88, 92], 1] -= smile
    p[[76, 82], 0] *= 1 + smile
    raise_brows = rng.uniform(0.1, 0.22) if strong_expression and rng.random() < 0.5 else rng.uniform(0, 0.05)
    p[33:51, 1] -= raise_brows
    p[96:98, :2] += rng.uniform([-0.08, -0.03], [0.08, 0.03])
    p[:, 0] *= rng.uniform(0.9, 1.1)
    arc = np.linspace(0.1, np.pi - 0.1, 9)
    forehead = np.stack([np.cos(arc), -0.2 - 0.95 * np.sin(arc), 0.5 * np.ones(9)], axis=1)
    yaw = np.deg2rad(rng.uniform(35, 65) * rng.choice([-1, 1]) if strong_pose else rng.uniform(-25, 25))
    pitch = np.deg2rad(rng.uniform(-25, 25) if strong_pose else rng.uniform(-10, 10))
    ry = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    rx = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    rot = rx @ ry
    return (p @ rot.T)[:, :2], (forehead @ rot.T)[:, :2]


def _colour(rng, lo=0, hi=255):
    return tuple(int(v) for v in rng.integers(lo, hi + 1, 3))


def _background(rng, width: int, height: int) -> Image.Image:
    ramp = np.linspace(0, 1, width)[None, :, None] * rng.uniform(-80, 80, 3) + \
        np.linspace(0, 1, height)[:, None, None] * rng.uniform(-80, 80, 3)
    base = np.clip(rng.uniform(40, 215, 3) + ramp, 0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(10, 30))):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(0.03, 0.3) * width, rng.uniform(0.03, 0.3) * height
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle([x, y, x + w, y + h], fill=_colour(rng))
        elif kind == 1:
            draw.ellipse([x, y, x + w, y + h], fill=_colour(rng))
        else:
            draw.line([x, y, x + w * rng.choice([-1, 1]), y + h], fill=_colour(rng), width=int(rng.integers(1, 6)))
    return image


def mask_visibility(mask: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Visibility labels (float32[N]) of landmarks (float[N, 2] pixels) under an occluder mask (bool or uint8[H, W],
    nonzero = covered): OCCLUDED where the mask is set at the nearest pixel centre, VISIBLE where it is not,
    UNLABELLED where that pixel lies off the image."""
    height, width = mask.shape
    col, row = np.rint(landmarks[:, 0]).astype(np.int64), np.rint(landmarks[:, 1]).astype(np.int64)
    on_image = (col >= 0) & (col < width) & (row >= 0) & (row < height)
    covered = np.zeros(len(landmarks), bool)
    covered[on_image] = mask[row[on_image], col[on_image]] != 0
    return np.where(on_image, np.where(covered, OCCLUDED, VISIBLE), UNLABELLED).astype(np.float32)


def render_face(rng, width: int = 320, height: int = 320, face_scale=(0.2, 0.3), occlusion: float = FLAG_RATE):
    """One synthetic face: (PIL RGB image, landmarks float32[98, 2] pixels, box float32[4], attributes int64[6],
    visibility float32[98] labels from the drawn occluders, see mask_visibility).

    face_scale: range of the half face width as a fraction of min(width, height); occlusion: probability of the
    occlusion flag (occluders drawn over the face). The random draws do not depend on occlusion beyond that flag.
    """
    thresholds = np.full(6, FLAG_RATE)
    thresholds[4] = occlusion
    flags = (rng.random(6) < thresholds).astype(np.int64)
    pose, expression, illumination, makeup, occluded, blur = flags
    points, forehead = _face_points(rng, bool(pose), bool(expression))
    roll = np.deg2rad(rng.uniform(30, 50) * rng.choice([-1, 1]) if pose and rng.random() < 0.4 else
                      rng.uniform(-15, 15))
    unit = rng.uniform(*face_scale) * min(width, height)
    rot = unit * np.array([[np.cos(roll), -np.sin(roll)], [np.sin(roll), np.cos(roll)]])
    extent = np.vstack([points, forehead]) @ rot.T
    spread_lo, spread_hi = extent.min(0), extent.max(0)
    size = np.array([width, height])
    centre = rng.uniform(-spread_lo + 2, np.maximum(size - spread_hi - 2, -spread_lo + 3))
    landmarks, outline = points @ rot.T + centre, forehead @ rot.T + centre

    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    hair = _colour(rng, 10, 90)
    skin = tuple(int(v) for v in np.array([rng.uniform(120, 240)] * 3) * [1.0, rng.uniform(0.75, 0.9),
                                                                        rng.uniform(0.6, 0.8)])
    head = [tuple(q) for q in landmarks[:33]] + [tuple(q) for q in outline]
    hair_line = centre + (outline[::-1] - centre) * 1.15
    draw.polygon([tuple(q) for q in hair_line] + [tuple(q) for q in landmarks[:33:4]], fill=hair)
    draw.polygon(head, fill=skin)
    line = max(1, int(round(unit / 45)))
    shade = tuple(int(c * 0.7) for c in skin)
    draw.line([tuple(q) for q in landmarks[:33]], fill=shade, width=line + 1)
    for brow in (range(33, 42), range(42, 51)):
        draw.polygon([tuple(landmarks[i]) for i in brow], fill=hair)
    liner = _colour(rng, 0, 120) if makeup else tuple(int(c * 0.4) for c in skin)
    iris = _colour(rng, 20, 160)
    for eye, pupil in ((range(60, 68), 96), (range(68, 76), 97)):
        polygon = [tuple(landmarks[i]) for i in eye]
        if makeup:
            draw.line(polygon[:5], fill=_colour(rng), width=line * 4)
        draw.polygon(polygon, fill=(235, 235, 230))
        r = 0.065 * unit
        cx, cy = landmarks[pupil]
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=iris)
        draw.ellipse([cx - r / 2.5, cy - r / 2.5, cx + r / 2.5, cy + r / 2.5], fill=(10, 10, 10))
        draw.line(polygon + [polygon[0]], fill=liner, width=line + (2 if makeup else 0))
    draw.line([tuple(landmarks[i]) for i in range(51, 55)], fill=shade, width=line)
    draw.line([tuple(landmarks[i]) for i in range(55, 60)], fill=shade, width=line + 1)
    for i in (56, 58):
        x, y = landmarks[i]
        draw.ellipse([x - unit * 0.035, y - unit * 0.06, x + unit * 0.035, y], fill=tuple(int(c * 0.35) for c in skin))
    lips = (_colour(rng, 120, 255) if makeup else
            tuple(int(v) for v in np.array(skin) * [0.85, rng.uniform(0.45, 0.6), rng.uniform(0.45, 0.6)]))
    draw.polygon([tuple(landmarks[i]) for i in range(76, 88)], fill=lips)
    draw.polygon([tuple(landmarks[i]) for i in range(88, 96)], fill=(60, 15, 20))
    draw.line([tuple(landmarks[i]) for i in range(88, 93)], fill=(40, 10, 10), width=line)

    occluders = Image.new("L", (width, height), 0)
    mask = ImageDraw.Draw(occluders)
    if occluded:
        for _ in range(int(rng.integers(1, 3))):
            x, y = landmarks[rng.integers(98)]
            w, h = rng.uniform(0.2, 0.6, 2) * unit
            rectangle = rng.random() < 0.5
            corners = [x - w, y - h, x + w, y + h]
            (draw.rectangle if rectangle else draw.ellipse)(corners, fill=_colour(rng))
            (mask.rectangle if rectangle else mask.ellipse)(corners, fill=255)
    visibility = mask_visibility(np.asarray(occluders), landmarks)
    pixels = np.asarray(image, dtype=np.float32)
    if illumination:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width]
        ramp = ((xx - centre[0]) * np.cos(angle) + (yy - centre[1]) * np.sin(angle)) / (2.5 * unit)
        gain = np.clip(rng.uniform(0.5, 1.6) + rng.uniform(0.3, 0.7) * ramp, 0.15, 2.0)[..., None]
        pixels = pixels * gain
    else:
        pixels = pixels * rng.uniform(0.85, 1.15)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    radius = rng.uniform(0.02, 0.05) * unit if blur else rng.uniform(0, 0.008) * unit
    if radius > 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    lo, hi = landmarks.min(0), landmarks.max(0)
    margin = (hi - lo) * rng.uniform(0.0, 0.08, 4).reshape(2, 2)
    box = np.concatenate([lo - margin[0], hi + margin[1]])
    return image, landmarks.astype(np.float32), box.astype(np.float32), flags, visibility


def _render_one(i: int, out_dir: str, split: str, seed: int, width: int, height: int, quality: int,
                face_scale, occlusion: float):
    """(annotation line, visibility sidecar line) of face i of split, after writing its image."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], i])
    image, landmarks, box, flags, visibility = render_face(rng, width, height, face_scale, occlusion)
    name = f"synth/{split}_{i:05d}.jpg"
    image.save(os.path.join(out_dir, "WFLW_images", name), quality=quality)
    fields = [f"{v:.3f}" for v in landmarks.ravel()] + [f"{v:.0f}" for v in box] + [str(f) for f in flags] + [name]
    return " ".join(fields), " ".join(str(int(v)) for v in visibility)


def _write_lines(path: str, lines) -> None:
    with open(path + ".tmp", "w") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(path + ".tmp", path)


def render_dataset(out_dir: str, num_train: int, num_test: int, seed: int = 0, width: int = 320, height: int = 320,
                   quality: int = 92, face_scale=(0.2, 0.3), workers: int = None,
                   occlusion: float = FLAG_RATE) -> dict:
    """Write num_train + num_test synthetic faces as a WFLW raw dataset under out_dir, with the visibility sidecar
    of each annotation file (see the module docstring); returns the annotation paths.

    Readable by open_dataset(out_dir, fmt="wflw"). face_scale: range of the half face width as a fraction of
    min(width, height); workers: processes (default: all cores); occlusion: probability of a face with occluders.
    """
    lo, hi = face_scale
    if not 0.05 <= lo <= hi <= 0.4:
        raise InputError(f"face_scale must be (lo, hi) with 0.05 <= lo <= hi <= 0.4, got {face_scale}")
    if num_train < 0 or num_test < 0 or width < 64 or height < 64:
        raise InputError(f"need num_train, num_test >= 0 and an image of at least 64 x 64, got "
                         f"{num_train}, {num_test}, {width} x {height}")
    if not 0.0 <= occlusion <= 1.0:
        raise InputError(f"occlusion must be a probability, 0 <= occlusion <= 1, got {occlusion}")
    os.makedirs(os.path.join(out_dir, "WFLW_images", "synth"), exist_ok=True)
    annotations = os.path.join(out_dir, "WFLW_annotations", "list_98pt_rect_attr_train_test")
    os.makedirs(annotations, exist_ok=True)
    paths = {}
    with Pool(workers or os.cpu_count()) as pool:
        for split, count in (("train", num_train), ("test", num_test)):
            render = partial(_render_one, out_dir=out_dir, split=split, seed=seed, width=width, height=height,
                             quality=quality, face_scale=tuple(face_scale), occlusion=float(occlusion))
            lines = pool.map(render, range(count), chunksize=16)
            paths[split] = os.path.join(annotations, f"list_98pt_rect_attr_{split}.txt")
            _write_lines(visibility_path(paths[split]), [labels for _, labels in lines])
            _write_lines(paths[split], [annotation for annotation, _ in lines])
    return paths
