"""Plain list reader (format "list"): any landmark set, as a CSV or a JSON list, for data in no standard format.

    ROOT/<split>.csv    one face a row: image, x0, y0, x1, y1 (face box), then x, y of each landmark; an optional
                        header row (its second field is not a number)
    ROOT/<split>.json   [{"image": "a.jpg", "box": [x0, y0, x1, y1], "landmarks": [[x, y], ...],
                          "visibility": [1, 0, -1, ...] (optional), "tags": ["occlusion", ...] (optional)}, ...]

Image paths are relative to the list file's folder. The landmark count picks the shipped scheme (98, 68, 29)
unless a scheme is given (`data.scheme`, any count); `tags` name evaluation subsets (`structalign eval` reports each).
`visibility` labels each landmark 1 (visible), 0 (occluded) or -1 (unlabelled); without it, and in a CSV (which has
no column for it), every point is unlabelled.
"""
import csv
import os

import numpy as np

from structalign.data.records import DatasetError, FaceDataset, Problems, make_record, read_json


def annotation_path(root: str, split: str) -> str:
    if os.path.isfile(split) and split.endswith((".csv", ".json")):
        return split
    matches = [p for p in (os.path.join(root, f"{split}.csv"), os.path.join(root, f"{split}.json"))
               if os.path.isfile(p)]
    if len(matches) != 1:
        raise DatasetError(f"expected one list file {split}.csv or {split}.json under {root}, found {len(matches)}")
    return matches[0]


def _csv_entries(path: str):
    """(line, image, box, landmarks, visibility, tags) per CSV row; a row that does not parse yields a message."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or not any(v.strip() for v in row):
                continue
            try:
                numbers = [float(v) for v in row[1:]]
            except ValueError as e:
                if line == 1:
                    continue  # the header row
                yield line, f"non-numeric field: {e}"
                continue
            if len(numbers) < 8 or len(numbers) % 2:
                yield line, (f"expected image, 4 box values and an x, y pair per landmark, got {len(row)} fields")
                continue
            yield line, (row[0].strip(), numbers[:4], np.reshape(numbers[4:], (-1, 2)), None, ())


def _json_entries(path: str):
    data = read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of faces, got {type(data).__name__}")
    for entry, face in enumerate(data, start=1):
        try:
            landmarks = np.asarray(face["landmarks"], dtype=np.float64)
            box = [float(v) for v in face["box"]]
            image = face["image"]
            tags = tuple(face.get("tags", ()))
            visibility = None if face.get("visibility") is None else np.asarray(face["visibility"], np.float32)
        except (KeyError, TypeError, ValueError) as e:
            yield entry, f"each face needs image, box and landmarks: {type(e).__name__} {e}"
            continue
        if not isinstance(image, str) or landmarks.ndim != 2 or landmarks.shape[1] != 2:
            yield entry, f"image must be a path and landmarks a list of [x, y], got {list(landmarks.shape)}"
            continue
        yield entry, (image, box, landmarks, visibility, tags)


def read_list(root: str, split: str = "train", on_error: str = "raise", face_box: str = "annotation",
              scheme=None) -> FaceDataset:
    """Open ROOT/<split>.csv or ROOT/<split>.json (or split = such a path); scheme: see Problems."""
    path = annotation_path(root, split)
    base = os.path.dirname(os.path.abspath(path))
    problems = Problems(on_error, face_box, scheme)
    records, found = [], None
    source = "line" if path.endswith(".csv") else "entry"
    for where, item in (_csv_entries(path) if path.endswith(".csv") else _json_entries(path)):
        if isinstance(item, str):
            problems.report(path, where, item)
            continue
        image, box, landmarks, visibility, tags = item
        entry_scheme = problems.entry_scheme(found, len(landmarks), path, where, "landmarks")
        if entry_scheme is None:
            continue
        found = entry_scheme
        record = make_record(problems, path, where, os.path.join(base, image), landmarks, box,
                             visibility=visibility, tags=tags)
        if record is not None:
            records.append(record)
    if found is None:
        raise DatasetError(f"{path}: no usable {source}")
    return FaceDataset(records, found, f"list:{os.path.basename(path)}", problems.skipped)
