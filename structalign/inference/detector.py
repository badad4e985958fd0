"""Face detection for the predictors: the built-in OpenCV Haar cascade, a plug-in interface, and the calibration
that turns a detector's box into the face box a model was trained on.

A detector is any callable `detector(rgb uint8[H, W, 3]) -> (boxes float[K, 4] x0 y0 x1 y1 in image pixels,
scores float[K])`. Its boxes are not dataset boxes (a Haar box is a square around eyes, nose and mouth, a dataset box
spans the landmarks), so the predictors map each detected box through a `BoxCalibration` first: the built-in
detector carries the one measured for it (benchmarks/detector_calibration.py, benchmarks/RESULTS.md "Issue 11"); a
plugged-in callable may carry its own as a `calibration` attribute, else its boxes are taken as they are.

Why OpenCV's cascade: opencv-python-headless < 5 ships the cascade files inside its wheel (5.x wheels no longer do),
so nothing is fetched at run time; the same package reads and writes videos (VideoCapture / VideoWriter). dlib's HOG
detector is similar in quality but would add a second native package for no other use.
"""
import os
from dataclasses import dataclass

import cv2
import numpy as np

from structalign.errors import InputError


@dataclass(frozen=True)
class BoxCalibration:
    """Detector box -> dataset face box: centre moved by (shift_x x width, shift_y x height), sides scaled by scale.
    The identity calibration is BoxCalibration()."""

    scale: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0

    def __call__(self, boxes: np.ndarray) -> np.ndarray:
        """boxes (float[K, 4]) -> calibrated boxes (float64[K, 4])."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        size = boxes[:, 2:] - boxes[:, :2]
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + size * [self.shift_x, self.shift_y]
        half = self.scale * size / 2
        return np.concatenate([centre - half, centre + half], axis=1)


# Measured on 52 real faces and their mirror images (88 matched detections; benchmarks/detector_calibration.py,
# benchmarks/RESULTS.md "Issue 11"): the median ratio of the tight landmark box side to the Haar box side, and the
# median offset of the landmark box centre from the Haar box centre, in Haar box sides. For the landmark-box
# convention (300W, data.face_box=landmarks); WFLW's own annotation boxes measured about 1.2 x larger (3 faces).
HAAR_CALIBRATION = BoxCalibration(scale=0.84, shift_x=0.0, shift_y=0.14)


class HaarFaceDetector:
    """OpenCV's frontal-face Haar cascade (haarcascade_frontalface_default.xml, shipped in the opencv wheel).

    Runs on the grey, histogram-equalised image; scale_factor, min_neighbors: OpenCV's detectMultiScale3 arguments;
    min_size: smallest face side in pixels; scores: the cascade's last-stage sums (higher = more face-like), faces
    below min_score dropped (1.0 kept 79 of the 80 detections of annotated faces and dropped 2 of the 12 others in
    the calibration measurement). Returns faces by decreasing score.
    """

    calibration = HAAR_CALIBRATION

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 20,
                 min_score: float = 1.0, cascade: str = "haarcascade_frontalface_default.xml"):
        path = cascade if os.path.isfile(cascade) else os.path.join(cv2.data.haarcascades, cascade)
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise InputError(f"cannot load the Haar cascade {path!r}")
        self.scale_factor, self.min_neighbors, self.min_size, self.min_score = (scale_factor, min_neighbors,
                                                                               min_size, min_score)

    def __call__(self, rgb: np.ndarray):
        """rgb (uint8[H, W, 3]) -> (boxes float32[K, 4] x0 y0 x1 y1, scores float32[K])."""
        grey = cv2.equalizeHist(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY))
        rects, _, weights = self._cascade.detectMultiScale3(
            grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size), outputRejectLevels=True)
        rects = np.asarray(rects, np.float32).reshape(-1, 4)
        scores = np.asarray(weights, np.float32).reshape(-1)
        # Rectangles span whole pixels [x, x + w): in pixel-centre coordinates that is [x - 0.5, x + w - 0.5].
        boxes = np.concatenate([rects[:, :2] - 0.5, rects[:, :2] + rects[:, 2:] - 0.5], axis=1)
        keep = scores >= self.min_score
        order = np.argsort(-scores[keep], kind="stable")
        return boxes[keep][order], scores[keep][order]


def make_detector(detector):
    """detector: "haar" (the built-in), None (no detection: the whole image is the face box), or a callable."""
    if detector is None or callable(detector):
        return detector
    if detector == "haar":
        return HaarFaceDetector()
    raise InputError(f"detector must be 'haar', None or a callable rgb -> (boxes, scores), got {detector!r}")


def detect(detector, rgb: np.ndarray, name: str):
    """Run a detector and check what it returned: (boxes float64[K, 4], scores float64[K])."""
    result = detector(rgb)
    try:
        boxes, scores = result
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{name}: the detector must return (boxes [K, 4], scores [K]), got {result!r}") from None
    if len(scores) != len(boxes) or not np.all(np.isfinite(boxes)):
        raise InputError(f"{name}: the detector returned {len(boxes)} boxes and {len(scores)} scores "
                         "(or non-finite boxes)")
    return boxes, scores
