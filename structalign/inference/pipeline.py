"""What both predictors do around their model: inputs -> faces (detector or given boxes) -> crops -> model ->
optional flip test -> landmarks in original-image pixels (and per-point visibility). A predictor only supplies
`_forward(crops)`.

Results: one `ImageLandmarks` per input image, each with its faces (`FaceLandmarks`: box, detector score,
landmarks float32[N, 2] in image pixels, pixel centres at integers, and visibility float32[N], P(landmark visible),
from the model's visibility head, or None for a model without one) or the error that stopped it.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from structalign.errors import InputError, StructalignError
from structalign.inference.crop import crop_images, crop_matrix, mirror_points, to_image_pixels
from structalign.inference.detector import BoxCalibration, detect, make_detector
from structalign.inference.sources import image_sources
from structalign.landmarks import LandmarkScheme, resolve_scheme


class FlipTestError(InputError):
    """--flip-test asked of a model whose landmark scheme has no usable flip permutation."""


@dataclass
class FaceLandmarks:
    """One face: box (float[4] x0 y0 x1 y1, the detector's or the given box), score (the detector's, None for a
    given box), landmarks (float32[N, 2], image pixels), visibility (float32[N] in [0, 1]: P(landmark visible), the
    sigmoid of the model's visibility head, trained on the per-point occlusion labels; None for a model without a
    visibility head, e.g. a checkpoint from before it existed)."""

    box: np.ndarray
    score: Optional[float]
    landmarks: np.ndarray
    visibility: Optional[np.ndarray] = None


@dataclass(frozen=True)
class _Prepared:
    """One image's faces before the model: boxes (float[K, 4]) as reported, scores, crop affines (float64[K, 2, 3])
    and crops (uint8[K, S, S, 3])."""

    name: str
    size: tuple
    face_boxes: np.ndarray
    scores: list
    matrices: np.ndarray
    crops: np.ndarray


@dataclass
class ImageLandmarks:
    """The faces of one image (source: its path or e.g. "array[0]"; size: (width, height)), or the error (one line)
    that stopped it; frame: the frame index for video frames."""

    source: str
    size: tuple = (0, 0)
    faces: list = field(default_factory=list)
    error: Optional[str] = None
    frame: Optional[int] = None


def model_scheme(scheme) -> Optional[LandmarkScheme]:
    """A model's LandmarkScheme from what a checkpoint or an exported graph stores (the scheme's content, a shipped
    name or a point count); None where that is missing or unreadable."""
    if scheme is None:
        return None
    try:
        return resolve_scheme(scheme)
    except (StructalignError, ValueError, TypeError, KeyError):
        return None


def flip_permutation(scheme: Optional[LandmarkScheme], num_points: int) -> np.ndarray:
    """The flip table (int64[N]) of a model's scheme; FlipTestError if there is no usable one for its N points."""
    if scheme is None:
        raise FlipTestError("--flip-test needs the landmark scheme's flip permutation, but the model carries no "
                            "readable scheme")
    if scheme.num_points != num_points:
        raise FlipTestError(f"--flip-test: the model predicts {num_points} points but its scheme {scheme.name} has "
                            f"{scheme.num_points}; the flip permutation does not apply")
    flip = scheme.flip_array()
    if np.array_equal(flip, np.arange(num_points)):
        raise FlipTestError(f"--flip-test: the scheme {scheme.name} pairs no left and right points (its flip "
                            "permutation is the identity), so a mirrored prediction cannot be re-indexed")
    return flip


class LandmarkPipeline(ABC):
    """The shared inference steps. Subclasses set scheme (LandmarkScheme or None), num_points, image_size, padding,
    has_visibility (whether the model predicts P(visible)) and implement _forward (below), then call _setup."""

    scheme: Optional[LandmarkScheme]
    num_points: int
    image_size: int
    padding: float
    has_visibility: bool

    def _setup(self, detector, flip_test: bool, batch_size: int, calibration: Optional[BoxCalibration]):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.detector = make_detector(detector)
        if calibration is None:
            calibration = getattr(self.detector, "calibration", None) or BoxCalibration()
        self.calibration = calibration
        self.flip = flip_permutation(self.scheme, self.num_points) if flip_test else None

    @property
    def scheme_name(self) -> Optional[str]:
        return None if self.scheme is None else self.scheme.name

    @abstractmethod
    def _forward(self, crops: np.ndarray) -> tuple:
        """The model on crops (uint8[B, S, S, 3]): (landmarks float32[B, N, 2] in crop pixels, P(visible)
        float32[B, N], or None without a visibility head)."""

    def predict(self, images, boxes=None, on_error: str = "raise") -> list:
        """ImageLandmarks per image of `images` (a path, folder, numpy uint8 [H, W, 3] array, PIL image, torch
        tensor [3, H, W], or a list of these; see structalign/inference/sources.py).

        boxes: None (detect faces; without a detector the whole image is the face box) or one entry per image: a box
        x0 y0 x1 y1 or a list of boxes, in image pixels, in the training data's face-box convention. on_error:
        "raise" stops at the first bad image, "skip" records the error in its ImageLandmarks and goes on.
        """
        if on_error not in ("raise", "skip"):
            raise InputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        entries = []  # an ImageSource per image, or the ImageLandmarks of an input that could not be opened
        for item in images if isinstance(images, (list, tuple)) else [images]:
            try:
                entries += image_sources(item)
            except StructalignError as exc:
                if on_error == "raise":
                    raise
                entries.append(ImageLandmarks(str(item), error=str(exc)))
        if boxes is not None and len(boxes) != len(entries):
            raise InputError(f"boxes: {len(boxes)} entries for {len(entries)} images")
        results, pending = [None] * len(entries), []
        for i, entry in enumerate(entries):
            if isinstance(entry, ImageLandmarks):
                results[i] = entry
                continue
            try:
                pending.append((i, self._prepare(entry.load(), None if boxes is None else boxes[i], entry.name)))
            except StructalignError as exc:
                if on_error == "raise":
                    raise
                results[i] = ImageLandmarks(entry.name, error=str(exc))
            # Faces of several images share a forward pass: run once batch_size crops are waiting (and at the end).
            if sum(len(p.crops) for _, p in pending) >= self.batch_size:
                self._finish_into(results, pending)
                pending = []
        self._finish_into(results, pending)
        return results

    def _finish_into(self, results: list, pending: list) -> None:
        """results[k] = the ImageLandmarks of each (k, prepared image) of pending."""
        if pending:
            for (k, _), found in zip(pending, self._finish([p for _, p in pending])):
                results[k] = found

    def predict_image(self, rgb: np.ndarray, boxes=None, name: str = "image") -> ImageLandmarks:
        """The faces of one RGB image (uint8[H, W, 3]); boxes as in predict (None: detect)."""
        return self._finish([self._prepare(rgb, boxes, name)])[0]

    def _prepare(self, rgb: np.ndarray, boxes, name: str) -> "_Prepared":
        """Faces (given, detected or the whole image) of one image and their crops, before the model runs."""
        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
            raise InputError(f"{name}: expected an RGB image uint8[H, W, 3], got {type(rgb).__name__} "
                             f"{getattr(rgb, 'dtype', '')} {list(getattr(rgb, 'shape', []))}")
        height, width = rgb.shape[:2]
        if boxes is not None:
            face_boxes = given_boxes(boxes, width, height, name)
            crop_boxes, scores = face_boxes, [None] * len(face_boxes)
        elif self.detector is None:  # pixel centres at integers: the image spans [-0.5, size - 0.5]
            face_boxes = crop_boxes = np.array([[-0.5, -0.5, width - 0.5, height - 0.5]])
            scores = [None]
        else:  # no face found is a result: the image's ImageLandmarks lists no faces
            face_boxes, scores = detect(self.detector, rgb, name)
            crop_boxes, scores = self.calibration(face_boxes), [float(s) for s in scores]
        size = self.image_size
        matrices = np.array([crop_matrix(box, size, self.padding) for box in crop_boxes]).reshape(-1, 2, 3)
        crops = crop_images(rgb, matrices, size)
        return _Prepared(name, (width, height), face_boxes, scores, matrices, crops)

    def _finish(self, prepared: list) -> list:
        """Run the model on the crops of prepared images (with the flip test if set) -> ImageLandmarks each. The flip
        test averages the landmarks and P(visible) with those of the mirrored crop, both re-indexed by the scheme's
        flip permutation (mirrored point flip[i] is point i)."""
        crops = np.concatenate([p.crops for p in prepared])
        points, visibility = self._batched(crops)
        points = points.astype(np.float64)
        if self.flip is not None:
            mirrored, mirrored_visibility = self._batched(np.ascontiguousarray(crops[:, :, ::-1]))
            points = (points + mirror_points(mirrored, self.flip, self.image_size)) / 2
            if visibility is not None:
                visibility = (visibility + mirrored_visibility[:, self.flip]) / 2
        matrices = np.concatenate([p.matrices for p in prepared])
        points = to_image_pixels(points, matrices).astype(np.float32)
        visibility = [None] * len(points) if visibility is None else visibility.astype(np.float32)
        out, start = [], 0
        for p in prepared:
            end = start + len(p.crops)
            faces = [FaceLandmarks(np.asarray(b, np.float64), s, pts, vis) for b, s, pts, vis
                     in zip(p.face_boxes, p.scores, points[start:end], visibility[start:end])]
            out.append(ImageLandmarks(p.name, p.size, faces))
            start = end
        return out

    def _batched(self, crops: np.ndarray) -> tuple:
        """_forward over crops in chunks of batch_size: (landmarks float32[B, N, 2], P(visible) float32[B, N] or
        None)."""
        chunks = [self._forward(crops[i:i + self.batch_size]) for i in range(0, len(crops), self.batch_size)]
        if not chunks:  # images without faces only
            return np.zeros((0, self.num_points, 2), np.float32), None
        points = np.concatenate([c[0] for c in chunks])
        visibility = None if chunks[0][1] is None else np.concatenate([c[1] for c in chunks])
        return points, visibility


def given_boxes(boxes, width: int, height: int, name: str) -> np.ndarray:
    """User boxes (one x0 y0 x1 y1 or several) as float64[K, 4]; InputError for a malformed box or one that lies
    wholly outside the width x height image."""
    array = np.asarray(boxes, np.float64)
    if array.size == 0 or array.size % 4 or (array.ndim == 2 and array.shape[1] != 4) or array.ndim > 2:
        raise InputError(f"{name}: boxes must be x0 y0 x1 y1 or a list of such boxes, got {np.asarray(boxes).tolist()}")
    array = array.reshape(-1, 4)
    for box in array:
        if not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
            raise InputError(f"{name}: box {box.tolist()}: expected x0, y0, x1, y1 with x1 > x0 and y1 > y0")
        if box[2] <= -0.5 or box[3] <= -0.5 or box[0] >= width - 0.5 or box[1] >= height - 0.5:
            raise InputError(f"{name}: box {box.tolist()} lies outside the {width}x{height} image")
    return array
