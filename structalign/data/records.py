"""The common sample record every reader produces, the dataset that holds them, and how readers report bad input.

Coordinates are original-image pixels with pixel centres at integers (x = 0 is the centre of the first column);
readers of 1-based formats (300W .pts, COFW .mat) subtract 1.
"""
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from structalign.landmarks import LandmarkScheme, scheme_for

ON_ERROR = ("raise", "skip")


class DatasetError(ValueError):
    """A dataset file is missing, malformed, or points at a missing image; the message names file and line."""


@dataclass(frozen=True)
class FaceRecord:
    """One annotated face.

    image_path: absolute path of the image file; landmarks (float32[N, 2]) in original-image pixels; box
    (float32[4]) x0, y0, x1, y1; attributes (int64[6] pose, expression, illumination, make-up, occlusion, blur flags)
    or None where the format has none; visibility (float32[N]) 1 = visible, 0 = annotated as occluded.
    """

    image_path: str
    landmarks: np.ndarray
    box: np.ndarray
    attributes: Optional[np.ndarray]
    visibility: np.ndarray


@dataclass(frozen=True)
class Skipped:
    """An annotation left out under on_error="skip": where (file, 1-based line or entry number) and why."""

    source: str
    line: Optional[int]
    reason: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.reason}"


class Problems:
    """Collects bad annotations: raises DatasetError at once under on_error="raise", records a Skipped otherwise."""

    def __init__(self, on_error: str):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.skipped = []

    def report(self, source: str, line: Optional[int], reason: str) -> None:
        item = Skipped(str(source), line, reason)
        if self.on_error == "raise":
            raise DatasetError(f"{item} (pass on_error='skip' to skip and count such entries)")
        self.skipped.append(item)

    def entry_scheme(self, current: Optional[LandmarkScheme], count: int, source: str, line: Optional[int],
                     what: str) -> Optional[LandmarkScheme]:
        """The scheme of an entry with `count` points; None (reported) when no scheme has that many points or it
        differs from `current`, the scheme of the entries read before it."""
        try:
            found = scheme_for(count)
        except ValueError as e:
            self.report(source, line, str(e))
            return None
        if current is not None and found is not current:
            self.report(source, line, f"{count} {what}; earlier entries have {current.num_points}")
            return None
        return found


class FaceDataset:
    """An indexable list of FaceRecord with its LandmarkScheme.

    ds[i] -> FaceRecord; ds.scheme; ds.skipped (list of Skipped, empty unless opened with on_error="skip");
    ds.name (e.g. "wflw:train") for messages.
    """

    def __init__(self, records: list, scheme: LandmarkScheme, name: str, skipped: Optional[list] = None):
        for i, r in enumerate(records):
            if r.landmarks.shape != (scheme.num_points, 2):
                raise ValueError(f"{name}: record {i} has landmarks {r.landmarks.shape}, "
                                 f"scheme {scheme.name} needs ({scheme.num_points}, 2)")
        self.records = list(records)
        self.scheme = scheme
        self.name = name
        self.skipped = list(skipped or [])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> FaceRecord:
        return self.records[i]

    def __repr__(self) -> str:
        return f"FaceDataset({self.name!r}, {len(self)} faces, scheme={self.scheme.name}, skipped={len(self.skipped)})"

    def landmarks(self) -> np.ndarray:
        """All landmarks (float32[len, N, 2])."""
        if not self.records:
            return np.zeros((0, self.scheme.num_points, 2), np.float32)
        return np.stack([r.landmarks for r in self.records])

    def subset(self, indices, name: str) -> "FaceDataset":
        return FaceDataset([self.records[int(i)] for i in indices], self.scheme, name)


def make_record(problems: Problems, source: str, line: Optional[int], image_path: str, landmarks, box,
                attributes=None, visibility=None, check_image: bool = True) -> Optional[FaceRecord]:
    """Validate one annotation and build its FaceRecord; a problem goes to `problems` (raise or skip) -> None."""
    landmarks = np.asarray(landmarks, dtype=np.float32)
    box = np.asarray(box, dtype=np.float32)
    if landmarks.ndim != 2 or landmarks.shape[1] != 2:
        problems.report(source, line, f"landmarks must have shape [N, 2], got {list(landmarks.shape)}")
        return None
    if not np.all(np.isfinite(landmarks)):
        problems.report(source, line, "landmark coordinates are not all finite")
        return None
    if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
        problems.report(source, line, f"face box must be x0 y0 x1 y1 with x1 > x0 and y1 > y0, got {box.tolist()}")
        return None
    if attributes is not None:
        attributes = np.asarray(attributes, dtype=np.int64)
        if attributes.shape != (6,) or not np.all((attributes == 0) | (attributes == 1)):
            problems.report(source, line, f"attribute flags must be six 0/1 values, got {attributes.tolist()}")
            return None
    if visibility is None:
        visibility = np.ones(len(landmarks), np.float32)
    visibility = np.asarray(visibility, dtype=np.float32)
    if visibility.shape != (len(landmarks),):
        problems.report(source, line, f"visibility must have {len(landmarks)} entries, got {visibility.shape}")
        return None
    if check_image and not os.path.isfile(image_path):
        problems.report(source, line, f"image not found: {image_path}")
        return None
    return FaceRecord(image_path, landmarks, box, attributes, visibility)


def landmark_box(landmarks: np.ndarray) -> np.ndarray:
    """The tight box (float32[4] x0, y0, x1, y1) around landmarks (float[N, 2]), for formats without a face box."""
    lo, hi = landmarks.min(axis=0), landmarks.max(axis=0)
    return np.array([lo[0], lo[1], hi[0], hi[1]], np.float32)


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise DatasetError(f"{what} not found: {path}")
    return path
