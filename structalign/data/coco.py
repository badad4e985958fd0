"""COCO-keypoints JSON reader, as MMPose ships its face annotations (method.md §4.3).

Layout: ROOT/annotations/<name>_<split>.json (e.g. face_landmarks_wflw_train.json) and ROOT/images/<file_name>
(or file_name relative to ROOT). Each annotation gives `keypoints` (K x [x, y, v]), `bbox` [x, y, w, h] and
`image_id`; K picks the shipped scheme (98, 68, 29) unless a scheme is given (any K). The COCO flag v gives the
visibility label: v = 2 VISIBLE, v = 1 OCCLUDED (labelled, not visible), v = 0 UNLABELLED (its x, y are kept as
written, like every other point's).
"""
import glob
import os

import numpy as np

from structalign.data.records import (OCCLUDED, UNLABELLED, VISIBLE, DatasetError, FaceDataset, Problems,
                                      make_record, read_json)

_LABELS = {0: UNLABELLED, 1: OCCLUDED, 2: VISIBLE}  # COCO keypoint flag v -> visibility label


def annotation_path(root: str, split: str) -> str:
    if os.path.isfile(split):
        return split
    matches = sorted(glob.glob(os.path.join(root, "annotations", f"*_{split}.json")) +
                     glob.glob(os.path.join(root, f"*_{split}.json")))
    if len(matches) != 1:
        raise DatasetError(f"expected one COCO annotation file *_{split}.json under {root} or {root}/annotations, "
                           f"found {len(matches)}: {matches}")
    return matches[0]


def _image_path(root: str, file_name: str) -> str:
    in_images = os.path.join(root, "images", file_name)
    return in_images if os.path.isfile(in_images) else os.path.join(root, file_name)


def read_coco(root: str, split: str = "train", on_error: str = "raise",
              face_box: str = "annotation", scheme=None) -> FaceDataset:
    """Open the COCO-keypoints split whose file ends in _<split>.json (or split = a .json path); scheme: see
    Problems (a LandmarkScheme takes any point count)."""
    path = annotation_path(root, split)
    data = read_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DatasetError(f"{path}: a COCO file needs top-level 'images' and 'annotations' lists")
    files = {im.get("id"): im.get("file_name") for im in data["images"]}
    sizes = {im.get("id"): (im["width"], im["height"]) for im in data["images"]
             if isinstance(im.get("width"), int) and isinstance(im.get("height"), int)}
    problems = Problems(on_error, face_box, scheme)
    records, found = [], None
    for entry, ann in enumerate(data["annotations"], start=1):
        source = f"{path} annotation"
        try:
            keypoints = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
            x, y, w, h = (float(v) for v in ann["bbox"])
            file_name = files[ann["image_id"]]
        except KeyError as e:
            problems.report(source, entry, f"missing key {e} (or image_id without an image entry)")
            continue
        except (TypeError, ValueError) as e:
            problems.report(source, entry, f"malformed keypoints or bbox: {e}")
            continue
        if not isinstance(file_name, str):
            problems.report(source, entry, f"image {ann['image_id']} has no file_name")
            continue
        bad_flags = sorted({v for v in keypoints[:, 2].tolist() if v not in _LABELS})
        if bad_flags:
            problems.report(source, entry, f"keypoint flags v must be 0, 1 or 2, got {bad_flags}")
            continue
        entry_scheme = problems.entry_scheme(found, len(keypoints), source, entry, "keypoints")
        if entry_scheme is None:
            continue
        found = entry_scheme
        record = make_record(problems, source, entry, _image_path(root, file_name), keypoints[:, :2],
                             [x, y, x + w, y + h], visibility=[_LABELS[v] for v in keypoints[:, 2].tolist()],
                             declared_size=sizes.get(ann["image_id"]))
        if record is not None:
            records.append(record)
    if found is None:
        raise DatasetError(f"{path}: no usable annotations")
    return FaceDataset(records, found, f"coco:{os.path.basename(path)}", problems.skipped)
