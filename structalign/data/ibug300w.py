"""300W reader: 68-point `.pts` files beside the images (1-based coordinates), as ibug distributes them.

Layout: ROOT/{lfpw,helen}/{trainset,testset}/, ROOT/afw/, ROOT/ibug/, each with <name>.jpg|png + <name>.pts.
Splits: train = lfpw/trainset + helen/trainset + afw (3148 faces); common = lfpw/testset + helen/testset (554);
challenging = ibug (135); full (= test) = common + challenging (689). The face box is the tight box of the 68 points
(300W's detector boxes are a separate download; the crop padding of the pipeline adds the context).
"""
import glob
import os

import numpy as np

from structalign.data.records import DatasetError, FaceDataset, Problem, Problems, landmark_box, make_record
from structalign.landmarks import IBUG68

SPLIT_FOLDERS = {
    "train": ("lfpw/trainset", "helen/trainset", "afw"),
    "common": ("lfpw/testset", "helen/testset"),
    "challenging": ("ibug",),
    "full": ("lfpw/testset", "helen/testset", "ibug"),
}
SPLIT_FOLDERS["test"] = SPLIT_FOLDERS["full"]
SPLITS = tuple(SPLIT_FOLDERS)
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


def parse_pts(path: str, problems: Problems):
    """The points of one .pts file as float[N, 2] (still 1-based), or None after reporting the problem."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [ln.strip() for ln in f]
    try:
        start, end = lines.index("{"), lines.index("}")
    except ValueError:
        problems.report(path, None, "no '{' ... '}' block of points")
        return None
    declared = None
    for line_no, line in enumerate(lines[:start], start=1):
        if line.startswith("n_points"):
            try:
                declared = int(line.split(":")[1])
            except (IndexError, ValueError):
                problems.report(path, line_no, f"malformed n_points line {line!r}")
                return None
    points = []
    for i in range(start + 1, end):
        parts = lines[i].split()
        try:
            if len(parts) != 2:
                raise ValueError(f"expected 'x y', got {lines[i]!r}")
            points.append((float(parts[0]), float(parts[1])))
        except ValueError as e:
            problems.report(path, i + 1, str(e))
            return None
    if declared is not None and declared != len(points):
        problems.report(path, None, f"n_points says {declared}, the file holds {len(points)} points")
        return None
    if len(points) != IBUG68.num_points:
        problems.report(path, None, f"expected {IBUG68.num_points} points, got {len(points)}")
        return None
    return np.array(points, np.float64)


def _image_for(pts_path: str):
    stem = os.path.splitext(pts_path)[0]
    for ext in IMAGE_EXTENSIONS:
        if os.path.isfile(stem + ext):
            return stem + ext
    return None


def read_300w(root: str, split: str = "train", on_error: str = "raise",
              face_box: str = "annotation") -> FaceDataset:
    """Open 300W split "train", "common", "challenging", "full" or "test" (= full)."""
    if split not in SPLIT_FOLDERS:
        raise DatasetError(f"300W split must be one of {SPLITS}, got {split!r}")
    problems = Problems(on_error, face_box)
    records = []
    for folder in SPLIT_FOLDERS[split]:
        directory = os.path.join(root, folder)
        if not os.path.isdir(directory):
            raise DatasetError(f"300W folder {folder!r} of split {split!r} not found under {root}: is data.root "
                               f"(--data) a 300W root (lfpw/, helen/, afw/, ibug/), and data.format (--format) the "
                               f"format of the data there?")
        for pts in sorted(glob.glob(os.path.join(directory, "*.pts"))):
            points = parse_pts(pts, problems)
            if points is None:
                continue
            image = _image_for(pts)
            if image is None:
                problems.report(pts, None, f"no image beside it (looked for {', '.join(IMAGE_EXTENSIONS)})",
                                Problem.MISSING_IMAGE)
                continue
            landmarks = points - 1.0
            record = make_record(problems, pts, None, image, landmarks, landmark_box(landmarks))
            if record is not None:
                records.append(record)
    return FaceDataset(records, IBUG68, f"300w:{split}", problems.skipped)
