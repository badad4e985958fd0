"""The common sample record every reader produces, the dataset that holds them, and how readers report bad input.

Coordinates are original-image pixels with pixel centres at integers (x = 0 is the centre of the first column);
readers of 1-based formats (300W .pts, COFW .mat) subtract 1.

Every record is checked when a dataset is opened (make_record), without decoding its image (only the header is read
for the size): landmarks finite and at most IMAGE_MARGIN x max(width, height) outside the image, at least half of the
face box inside the image, at least half of the landmarks inside the face box (grown by BOX_SLACK of its side per
edge), the image size the annotation declares (where it declares one), and no second annotation of the same image
with the same landmarks. A problem is a `Problem` kind plus a message naming file and line.
"""
import enum
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from structalign.errors import StructalignError
from structalign.landmarks import LandmarkScheme, placeholder_scheme, scheme_for

ON_ERROR = ("raise", "skip")
FACE_BOXES = ("annotation", "landmarks")
ANY_COUNT = "any"  # a reader's scheme argument that accepts any point count (for `structalign data scheme`)
IMAGE_MARGIN = 0.25  # how far (x the image's larger side) a landmark may lie outside the image
BOX_SLACK = 0.1  # a landmark counts as inside the face box within this fraction of the box side per edge
VISIBLE, OCCLUDED, UNLABELLED = 1.0, 0.0, -1.0  # per-landmark visibility labels (FaceRecord.visibility)
VISIBILITY_LABELS = (VISIBLE, OCCLUDED, UNLABELLED)


class Problem(enum.Enum):
    """What is wrong with one annotation (or its image); `structalign data check` counts problems per kind."""

    BAD_ANNOTATION = "bad annotation"  # cannot be parsed, wrong count, non-finite or invalid values
    MISSING_IMAGE = "missing image"
    CORRUPT_IMAGE = "corrupt image"  # header or pixels cannot be read
    SIZE_MISMATCH = "image size differs from the annotation"
    LANDMARKS_OFF_IMAGE = "landmarks off the image"
    BOX_OFF_IMAGE = "box outside the image"
    BOX_MISSES_LANDMARKS = "box misses the landmarks"
    DUPLICATE = "duplicate annotation"
    IGNORED = "marked ignore"  # left out on the annotator's request (imglab ignore='1'); not a problem


class DatasetError(StructalignError):
    """A dataset file is missing, malformed, or points at a missing or corrupt image; the message names file and
    line; `kind` is the Problem (None for a problem with the dataset as a whole, e.g. a missing annotation file)."""

    def __init__(self, message: str, kind: Optional[Problem] = None):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class FaceRecord:
    """One annotated face.

    image_path: absolute path of the image file; landmarks (float32[N, 2]) in original-image pixels; box
    (float32[4]) x0, y0, x1, y1; attributes (int64[6] pose, expression, illumination, make-up, occlusion, blur flags)
    or None where the format has none; visibility (float32[N]) per landmark VISIBLE (1), OCCLUDED (0: something
    in front of it) or UNLABELLED (-1: the format or the annotation does not say);
    source / line: the annotation it was read from (line None where the format has none); image_size: (width,
    height) from the image header, None where not read; tags: names of the evaluation subsets the face belongs to
    (formats that carry them, e.g. the list reader's JSON), reported per subset by `structalign eval`.
    """

    image_path: str
    landmarks: np.ndarray
    box: np.ndarray
    attributes: Optional[np.ndarray]
    visibility: np.ndarray
    source: str = ""
    line: Optional[int] = None
    image_size: Optional[tuple] = None
    tags: tuple = ()

    @property
    def where(self) -> str:
        """file:line of the annotation (the image path where the record was not read from a file)."""
        if not self.source:
            return self.image_path
        return self.source if self.line is None else f"{self.source}:{self.line}"


@dataclass(frozen=True)
class Skipped:
    """An annotation left out under on_error="skip": where (file, 1-based line or entry number), why, and the kind."""

    source: str
    line: Optional[int]
    reason: str
    kind: Problem = Problem.BAD_ANNOTATION

    @property
    def where(self) -> str:
        return self.source if self.line is None else f"{self.source}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def write_skipped(path: str, skipped) -> str:
    """Write skipped annotations (iterable of Skipped) to path, one `kind<TAB>file:line<TAB>reason` line each, after
    a `#` line of counts per kind; returns path."""
    skipped = list(skipped)
    counts = {}
    for s in skipped:
        counts[s.kind.value] = counts.get(s.kind.value, 0) + 1
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "none"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"# {len(skipped)} skipped: {summary}\n")
        f.writelines(f"{s.kind.value}\t{s.where}\t{s.reason}\n" for s in skipped)
    os.replace(tmp, path)
    return path


class Problems:
    """Collects bad annotations: raises DatasetError at once under on_error="raise", records a Skipped otherwise.

    face_box: which box make_record gives the records, "annotation" (the format's) or "landmarks" (the tight box of
    the landmarks). Also remembers, for one read, the image sizes looked up and the (image, landmarks) pairs seen.
    """

    def __init__(self, on_error: str, face_box: str = "annotation", scheme=None):
        if on_error not in ON_ERROR:
            raise DatasetError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if face_box not in FACE_BOXES:
            raise DatasetError(f"face_box must be one of {FACE_BOXES}, got {face_box!r}")
        self.on_error, self.face_box, self.scheme = on_error, face_box, scheme
        self.skipped = []
        self.sizes = {}
        self.seen = {}

    def report(self, source: str, line: Optional[int], reason: str, kind: Problem = Problem.BAD_ANNOTATION) -> None:
        item = Skipped(str(source), line, reason, kind)
        if self.on_error == "raise":
            raise DatasetError(f"{item} (data.on_error=skip in a config, on_error='skip' in Python, skips and "
                               f"lists such entries)", kind)
        self.skipped.append(item)

    def entry_scheme(self, current: Optional[LandmarkScheme], count: int, source: str, line: Optional[int],
                     what: str) -> Optional[LandmarkScheme]:
        """The scheme of an entry with `count` points, or None (reported) when it does not fit: the reader's given
        scheme (a LandmarkScheme; ANY_COUNT takes any count, see placeholder_scheme), else the shipped scheme with
        that many points; every entry must have the count of the entries before it (`current`)."""
        if isinstance(self.scheme, LandmarkScheme):
            if count != self.scheme.num_points:
                self.report(source, line, f"{count} {what}; the scheme {self.scheme.name} has {self.scheme.num_points}")
                return None
            return self.scheme
        if current is not None and count != current.num_points:
            self.report(source, line, f"{count} {what}; earlier entries have {current.num_points}")
            return None
        if current is not None:
            return current
        if self.scheme == ANY_COUNT:
            return placeholder_scheme(count)
        try:
            return scheme_for(count)
        except ValueError as e:
            self.report(source, line, f"{e} (data.scheme gives a scheme file for other landmark sets)")
            return None

    def image_size(self, path: str):
        """((width, height), None) from the header of the image at path (cached), or (None, (Problem, message))."""
        if path not in self.sizes:
            try:
                with Image.open(path) as im:
                    self.sizes[path] = im.size, None
            except FileNotFoundError:
                self.sizes[path] = None, (Problem.MISSING_IMAGE, f"image not found: {path}")
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                self.sizes[path] = None, (Problem.CORRUPT_IMAGE, f"cannot read image {path}: {e}")
        return self.sizes[path]


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

    @property
    def has_visibility_labels(self) -> bool:
        """Whether any record labels any landmark visible or occluded (False: every label is UNLABELLED)."""
        return any(np.any(r.visibility >= 0) for r in self.records)

    def landmarks(self) -> np.ndarray:
        """All landmarks (float32[len, N, 2])."""
        if not self.records:
            return np.zeros((0, self.scheme.num_points, 2), np.float32)
        return np.stack([r.landmarks for r in self.records])

    def mean_shape(self) -> np.ndarray:
        """The mean of the landmarks (float64[N, 2]), each face centred on its box and scaled by the box's larger
        side: the frame the crops share, up to one scale and shift."""
        shapes = [(r.landmarks - (r.box[:2] + r.box[2:]) / 2) / max(r.box[2] - r.box[0], r.box[3] - r.box[1])
                  for r in self.records]
        if not shapes:
            raise DatasetError(f"{self.name}: no faces to average")
        return np.mean(np.asarray(shapes, dtype=np.float64), axis=0)

    def tag_flags(self):
        """(names, int64[len, K] 0/1 flags) of the subset tags the records carry, or None when none has any."""
        names = sorted({t for r in self.records for t in r.tags})
        if not names:
            return None
        return tuple(names), np.array([[int(n in r.tags) for n in names] for r in self.records], np.int64)

    def with_scheme(self, scheme: LandmarkScheme) -> "FaceDataset":
        """The same faces under another scheme with the same point count."""
        if scheme.num_points != self.scheme.num_points:
            raise DatasetError(f"{self.name} has {self.scheme.num_points} landmarks per face but the scheme "
                               f"{scheme.name} has {scheme.num_points}")
        return FaceDataset(self.records, scheme, self.name, self.skipped)

    def subset(self, indices, name: str) -> "FaceDataset":
        return FaceDataset([self.records[int(i)] for i in indices], self.scheme, name)

    def write_skipped(self, path: str) -> str:
        """List the annotations skipped when this dataset was opened in path (see write_skipped); returns path."""
        return write_skipped(path, self.skipped)


def _geometry_problem(landmarks: np.ndarray, box: np.ndarray, size):
    """(Problem, message) for landmarks / box that do not fit an image of size (width, height), or None."""
    width, height = size
    margin = IMAGE_MARGIN * max(width, height)
    lo, hi = np.array([-margin, -margin]), np.array([width - 1 + margin, height - 1 + margin])
    off = np.any((landmarks < lo) | (landmarks > hi), axis=1)
    if off.any():
        i = int(np.argmax(off))
        return Problem.LANDMARKS_OFF_IMAGE, (
            f"{int(off.sum())} landmark(s) more than {margin:.0f} px outside the {width} x {height} image, e.g. "
            f"point {i} at ({landmarks[i, 0]:.1f}, {landmarks[i, 1]:.1f})")
    x0, y0, x1, y1 = (float(v) for v in box)
    inside_w = max(0.0, min(x1, width - 0.5) - max(x0, -0.5))
    inside_h = max(0.0, min(y1, height - 0.5) - max(y0, -0.5))
    if inside_w * inside_h < 0.5 * (x1 - x0) * (y1 - y0):
        return Problem.BOX_OFF_IMAGE, (f"face box {[round(v, 1) for v in (x0, y0, x1, y1)]} lies mostly outside the "
                                       f"{width} x {height} image")
    slack = BOX_SLACK * max(x1 - x0, y1 - y0)
    inside = np.all((landmarks >= [x0 - slack, y0 - slack]) & (landmarks <= [x1 + slack, y1 + slack]), axis=1)
    if inside.mean() < 0.5:
        return Problem.BOX_MISSES_LANDMARKS, (f"face box {[round(v, 1) for v in (x0, y0, x1, y1)]} holds only "
                                              f"{int(inside.sum())} of {len(landmarks)} landmarks")
    return None


def make_record(problems: Problems, source: str, line: Optional[int], image_path: str, landmarks, box,
                attributes=None, visibility=None, image_size=None, declared_size=None,
                tags=()) -> Optional[FaceRecord]:
    """Validate one annotation and build its FaceRecord; a problem goes to `problems` (raise or skip) -> None.

    image_size: (width, height) where the reader knows it (else read from the image header); declared_size: the
    (width, height) the annotation states, checked against the image.
    """
    landmarks = np.asarray(landmarks, dtype=np.float32)
    if landmarks.ndim != 2 or landmarks.shape[1] != 2:
        problems.report(source, line, f"landmarks must have shape [N, 2], got {list(landmarks.shape)}")
        return None
    if not np.all(np.isfinite(landmarks)):
        problems.report(source, line, "landmark coordinates are not all finite")
        return None
    box = np.asarray(landmark_box(landmarks) if problems.face_box == "landmarks" else box, dtype=np.float32)
    if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
        problems.report(source, line, f"face box must be x0 y0 x1 y1 with x1 > x0 and y1 > y0, got {box.tolist()}")
        return None
    if attributes is not None:
        attributes = np.asarray(attributes, dtype=np.int64)
        if attributes.shape != (6,) or not np.all((attributes == 0) | (attributes == 1)):
            problems.report(source, line, f"attribute flags must be six 0/1 values, got {attributes.tolist()}")
            return None
    if visibility is None:
        visibility = np.full(len(landmarks), UNLABELLED, np.float32)
    visibility = np.asarray(visibility, dtype=np.float32)
    if visibility.shape != (len(landmarks),):
        problems.report(source, line, f"{visibility.size} visibility labels (shape {list(visibility.shape)}) for "
                                      f"{len(landmarks)} landmarks")
        return None
    bad = ~np.isin(visibility, VISIBILITY_LABELS)
    if bad.any():
        i = int(np.argmax(bad))
        problems.report(source, line, f"visibility labels must be 1 (visible), 0 (occluded) or -1 (unlabelled), "
                                      f"got {visibility[i]} for point {i}")
        return None
    size, unreadable = (tuple(image_size), None) if image_size is not None else problems.image_size(image_path)
    if unreadable is not None:
        problems.report(source, line, unreadable[1], unreadable[0])
        return None
    if declared_size is not None and tuple(int(v) for v in declared_size) != size:
        problems.report(source, line, f"the annotation says {declared_size[0]} x {declared_size[1]}, the image "
                                      f"{image_path} is {size[0]} x {size[1]}", Problem.SIZE_MISMATCH)
        return None
    found = _geometry_problem(landmarks, box, size)
    if found is not None:
        problems.report(source, line, found[1], found[0])
        return None
    key = (image_path, landmarks.tobytes())
    if key in problems.seen:
        problems.report(source, line, f"same image and landmarks as {problems.seen[key]}", Problem.DUPLICATE)
        return None
    if not all(isinstance(t, str) and t for t in tags):
        problems.report(source, line, f"tags must be non-empty strings, got {list(tags)}")
        return None
    record = FaceRecord(image_path, landmarks, box, attributes, visibility, str(source), line, size, tuple(tags))
    problems.seen[key] = record.where
    return record


def landmark_box(landmarks: np.ndarray) -> np.ndarray:
    """The tight box (float32[4] x0, y0, x1, y1) around landmarks (float[N, 2]), for formats without a face box."""
    lo, hi = landmarks.min(axis=0), landmarks.max(axis=0)
    return np.array([lo[0], lo[1], hi[0], hi[1]], np.float32)


def read_json(path: str):
    """The JSON document at path; DatasetError naming file and line where it does not parse."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON (not UTF-8 text: {e})") from e


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise DatasetError(f"{what} not found: {path}")
    return path
