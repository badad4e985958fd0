"""Landmarks on a video: face detection every k frames, each face followed in between from its own landmarks, faces
matched across frames by box overlap, a One-Euro filter per face against jitter, an overlay video and per-frame
results (OpenCV VideoCapture / VideoWriter).

    structalign predict CKPT clip.mp4 --out clip_landmarks.mp4 [--detect-every 5] [--filter-min-cutoff 1 ...]
    .venv/bin/python -m pytest -q tests/inference/test_video.py
"""
import os
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from structalign.errors import InputError, MissingFileError
from structalign.inference.detector import box_iou
from structalign.inference.outputs import draw_faces
from structalign.inference.pipeline import FaceLandmarks, ImageLandmarks


class UnreadableVideoError(InputError):
    """A video that cannot be opened or decoded, or that has no frame."""


class OneEuroFilter:
    """The One-Euro filter (Casiez, Roussel, Vogel, CHI 2012) over an array of values, each filtered on its own.

    min_cutoff (Hz): smoothing at rest (lower = smoother, more lag); beta: how fast the cutoff rises with speed
    (higher = less lag on fast moves); d_cutoff (Hz): smoothing of the speed estimate.
    """

    def __init__(self, min_cutoff: float = 1.0, beta: float = 0.05, d_cutoff: float = 1.0):
        for name, value in (("min_cutoff", min_cutoff), ("d_cutoff", d_cutoff)):
            if not value > 0:
                raise InputError(f"One-Euro filter {name} must be > 0 Hz, got {value}")
        if beta < 0:
            raise InputError(f"One-Euro filter beta must be >= 0, got {beta}")
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.value: Optional[np.ndarray] = None
        self.speed: Optional[np.ndarray] = None

    @staticmethod
    def _alpha(cutoff, dt: float):
        tau = 1.0 / (2 * np.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, value: np.ndarray, dt: float) -> np.ndarray:
        """The filtered value (float64, value's shape) of a new sample dt seconds after the previous one."""
        value = np.asarray(value, np.float64)
        if self.value is None:
            self.value, self.speed = value.copy(), np.zeros_like(value)
            return self.value.copy()
        speed = (value - self.value) / dt
        a = self._alpha(self.d_cutoff, dt)
        self.speed = a * speed + (1 - a) * self.speed
        a = self._alpha(self.min_cutoff + self.beta * np.abs(self.speed), dt)
        self.value = a * value + (1 - a) * self.value
        return self.value.copy()


@dataclass
class TrackedFace(FaceLandmarks):
    """A face of a video frame with the id of its track (the same face in consecutive frames). landmarks are
    One-Euro filtered along the track; visibility (P(visible) per point, or None) is the frame's own, unsmoothed:
    the filter's cutoffs are tuned to pixel motion, and an occlusion that starts should show in that frame."""

    track: int = 0


class FaceTracks:
    """Faces followed across frames by box overlap (greedy, IoU >= min_iou), each track with its own filter;
    a track not seen in a frame ends (a face that comes back starts a new one)."""

    def __init__(self, min_cutoff: float, beta: float, d_cutoff: float, min_iou: float = 0.3):
        OneEuroFilter(min_cutoff, beta, d_cutoff)  # checks the parameters once, before any frame is read
        self.params, self.min_iou = (min_cutoff, beta, d_cutoff), min_iou
        self.boxes, self.ids, self.filters, self.next_id = np.zeros((0, 4)), [], [], 0

    def update(self, faces: list, dt: float) -> list:
        """TrackedFace per face of the new frame, landmarks filtered along their track (visibility unfiltered)."""
        boxes = np.array([f.box for f in faces], np.float64).reshape(-1, 4)
        iou = box_iou(boxes, self.boxes) if len(boxes) and len(self.boxes) else np.zeros((len(boxes), 0))
        match = {}
        for flat in np.argsort(-iou, axis=None):
            i, j = np.unravel_index(flat, iou.shape)
            if iou[i, j] < self.min_iou:
                break
            if i not in match and j not in match.values():
                match[i] = j
        ids, filters, tracked = [], [], []
        for i, face in enumerate(faces):
            if i in match:
                track, smoother = self.ids[match[i]], self.filters[match[i]]
            else:
                track, smoother = self.next_id, OneEuroFilter(*self.params)
                self.next_id += 1
            ids.append(track)
            filters.append(smoother)
            points = smoother(face.landmarks, dt).astype(np.float32)
            tracked.append(TrackedFace(face.box, face.score, points, face.visibility, track=track))
        self.boxes, self.ids, self.filters = boxes, ids, filters
        return tracked


def _centre(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, :2] + boxes[:, 2:]) / 2


class FollowedFaces:
    """Faces between two detections, each followed from its own landmarks (no detector run).

    At a detection frame each face's detector box D and the tight box L of its landmarks are kept; on a later frame
    the face's box is D under the similarity (shift and scale) that takes L to the tight box of its latest landmarks.
    The box stays in the detector's convention, so it goes through the predictor's calibration as a detection does.
    """

    def __init__(self):
        self.detected = self.reference = self.latest = np.zeros((0, 4))

    @staticmethod
    def _landmark_boxes(faces: list) -> np.ndarray:
        points = [np.asarray(f.landmarks, np.float64) for f in faces]
        return np.array([np.concatenate([p.min(axis=0), p.max(axis=0)]) for p in points]).reshape(-1, 4)

    def start(self, faces: list) -> None:
        """A detection frame's faces (FaceLandmarks, detector boxes)."""
        self.detected = np.array([f.box for f in faces], np.float64).reshape(-1, 4)
        self.reference = self.latest = self._landmark_boxes(faces)

    def boxes(self, width: int, height: int) -> np.ndarray:
        """The followed faces' boxes (float64[K, 4]) for the next frame; faces whose box has left the width x height
        frame are dropped."""
        side = lambda b: np.max(b[:, 2:] - b[:, :2], axis=1, keepdims=True)  # noqa: E731
        scale = side(self.latest) / side(self.reference)
        centre = _centre(self.latest) + scale * (_centre(self.detected) - _centre(self.reference))
        half = scale * (self.detected[:, 2:] - self.detected[:, :2]) / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        inside = ((boxes[:, 2] > -0.5) & (boxes[:, 3] > -0.5) & (boxes[:, 0] < width - 0.5)
                  & (boxes[:, 1] < height - 0.5))
        self.detected, self.reference = self.detected[inside], self.reference[inside]
        return boxes[inside]

    def moved(self, faces: list) -> None:
        """The faces of the frame just predicted from boxes(), in the same order."""
        self.latest = self._landmark_boxes(faces)


def predict_video(predictor, path: str, out_video: Optional[str] = None, min_cutoff: float = 1.0,
                  beta: float = 0.05, d_cutoff: float = 1.0, max_frames: Optional[int] = None,
                  detect_every: int = 5) -> list:
    """ImageLandmarks per frame of the video at path (frame = its index, faces = TrackedFace); writes the overlay
    video to out_video (mp4v codec for .mp4, MJPG otherwise) when given. Frames without a face have no faces.

    detect_every: the detector runs on every k-th frame, and on any frame where no face is followed; in between,
    each face is followed from its landmarks (FollowedFaces) and has score None. 1: detect on every frame. A
    predictor without a detector takes every whole frame as the face.
    """
    if not isinstance(detect_every, int) or detect_every < 1:
        raise InputError(f"detect_every must be a positive int, got {detect_every!r}")
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: no such video")
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise UnreadableVideoError(f"{path}: cannot open video (corrupt, not a video, or no frame)")
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if np.isfinite(fps) and fps > 0 else 30.0
    tracks, followed = FaceTracks(min_cutoff, beta, d_cutoff), FollowedFaces()
    follow = detect_every > 1 and predictor.detector is not None
    writer, results = None, []
    bgr = rgb = None  # each frame is decoded and converted into the previous frame's arrays
    try:
        while max_frames is None or len(results) < max_frames:
            ok, bgr = capture.read(bgr)
            if not ok:
                break
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=rgb)
            frame, name = len(results), f"{path}#{len(results)}"
            boxes = followed.boxes(rgb.shape[1], rgb.shape[0]) if follow and frame % detect_every else None
            if boxes is None or not len(boxes):
                faces = predictor.predict_image(rgb, name=name).faces
                followed.start(faces)
            else:
                found = predictor.predict_image(rgb, predictor.calibration(boxes), name=name).faces
                faces = [FaceLandmarks(box, None, f.landmarks, f.visibility) for box, f in zip(boxes, found)]
                followed.moved(faces)
            result = ImageLandmarks(path, (rgb.shape[1], rgb.shape[0]), tracks.update(faces, 1.0 / fps), None, frame)
            results.append(result)
            if out_video is not None:
                if writer is None:
                    writer = _open_writer(out_video, fps, rgb.shape[1], rgb.shape[0])
                writer.write(cv2.cvtColor(draw_faces(rgb, result.faces), cv2.COLOR_RGB2BGR))
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if not results:
        raise UnreadableVideoError(f"{path}: no frame could be decoded (empty or corrupt video)")
    return results


def _open_writer(path: str, fps: float, width: int, height: int):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    codec = "mp4v" if path.lower().endswith((".mp4", ".m4v", ".mov")) else "MJPG"
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec), fps, (width, height))
    if not writer.isOpened():
        raise InputError(f"{path}: cannot write a video there (codec {codec})")
    return writer
