"""WFLW reader: the raw `list_98pt_rect_attr_{train,test}.txt` annotations (method.md §4.3).

One face per line, 207 space-separated fields: 196 landmark coordinates (x0 y0 ... x97 y97, pixels), the face
rectangle x_min y_min x_max y_max, six 0/1 flags (pose expression illumination make-up occlusion blur) and the image
path relative to the image folder. Layout as distributed (either folder may also be the root itself):

    ROOT/WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_{train,test}.txt
    ROOT/WFLW_images/<event>/<name>.jpg

Per-landmark visibility labels: real WFLW has none (its points are UNLABELLED; the per-image occlusion flag stays an
attribute). The built-in data (structalign/data/synth.py) extends the layout with a sidecar next to each annotation
file, list_98pt_rect_attr_{split}.visibility.txt: one line per annotation line, in the same order, of 98
space-separated labels 1 (visible), 0 (occluded), -1 (unlabelled). Where a sidecar exists it is read.
"""
import os

import numpy as np

from structalign.data.records import VISIBILITY_LABELS, DatasetError, FaceDataset, Problems, make_record
from structalign.landmarks import WFLW98

ATTRIBUTES = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")
SUBSET_ALIASES = {"largepose": "pose", "make-up": "makeup"}
SPLITS = ("train", "test") + ATTRIBUTES
_FIELDS = 2 * 98 + 4 + 6 + 1


def annotation_path(root: str, split: str) -> str:
    """The annotation file of split "train" or "test" under root (either the distributed layout or flat)."""
    name = f"list_98pt_rect_attr_{split}.txt"
    candidates = [
        os.path.join(root, "WFLW_annotations", "list_98pt_rect_attr_train_test", name),
        os.path.join(root, "list_98pt_rect_attr_train_test", name),
        os.path.join(root, name),
    ]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise DatasetError(f"WFLW annotation file {name} not found under {root} (looked at: {', '.join(candidates)})")


def visibility_path(annotation: str) -> str:
    """The visibility sidecar of an annotation file: list_98pt_rect_attr_{split}.visibility.txt beside it."""
    return os.path.splitext(annotation)[0] + ".visibility.txt"


def _read_lines(path: str) -> list:
    with open(path, encoding="utf-8", errors="replace") as f:  # undecodable bytes fail the line's parse
        return list(f)


def _visibility_labels(problems: Problems, sidecar: str, line_no: int, line: str):
    """The 98 labels (float32[98]) of one sidecar line, or None (reported: file:line and what is wrong)."""
    fields = line.split()
    if len(fields) != WFLW98.num_points:
        problems.report(sidecar, line_no, f"expected {WFLW98.num_points} visibility labels (1, 0 or -1), "
                                          f"got {len(fields)}")
        return None
    try:
        labels = np.array([float(v) for v in fields], np.float32)
    except ValueError as e:
        problems.report(sidecar, line_no, f"non-numeric visibility label: {e}")
        return None
    bad = ~np.isin(labels, VISIBILITY_LABELS)
    if bad.any():
        i = int(np.argmax(bad))
        problems.report(sidecar, line_no, f"visibility labels must be 1, 0 or -1, got {fields[i]} for point {i}")
        return None
    return labels


def image_root(root: str) -> str:
    images = os.path.join(root, "WFLW_images")
    return images if os.path.isdir(images) else root


def read_wflw(root: str, split: str = "train", on_error: str = "raise",
              face_box: str = "annotation") -> FaceDataset:
    """Open WFLW split "train", "test", or a test subset: pose, expression, illumination, makeup, occlusion, blur."""
    split = SUBSET_ALIASES.get(split, split)
    if split not in SPLITS:
        raise DatasetError(f"WFLW split must be one of {SPLITS}, got {split!r}")
    subset = ATTRIBUTES.index(split) if split in ATTRIBUTES else None
    path = annotation_path(root, "train" if split == "train" else "test")
    images = image_root(root)
    problems = Problems(on_error, face_box)
    records = []
    lines = _read_lines(path)
    sidecar = visibility_path(path)
    labels = _read_lines(sidecar) if os.path.isfile(sidecar) else None
    if labels is not None and len(labels) != len(lines):
        raise DatasetError(f"the visibility sidecar {sidecar} has {len(labels)} lines but the annotation file {path} "
                           f"has {len(lines)}; they must match line for line")
    for line_no, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != _FIELDS:
            problems.report(path, line_no, f"expected {_FIELDS} fields (196 coordinates, 4 box, 6 flags, image), "
                                           f"got {len(fields)}")
            continue
        try:
            numbers = np.array([float(v) for v in fields[:-1]], dtype=np.float64)
        except ValueError as e:
            problems.report(path, line_no, f"non-numeric field: {e}")
            continue
        attributes = numbers[200:206]
        if subset is not None and attributes[subset] != 1:
            continue
        visibility = None
        if labels is not None:
            visibility = _visibility_labels(problems, sidecar, line_no, labels[line_no - 1])
            if visibility is None:
                continue
        record = make_record(problems, path, line_no, os.path.join(images, fields[-1]),
                             numbers[:196].reshape(98, 2), numbers[196:200], attributes, visibility)
        if record is not None:
            records.append(record)
    return FaceDataset(records, WFLW98, f"wflw:{split}", problems.skipped)
