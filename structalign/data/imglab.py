"""dlib / imglab XML reader (e.g. dlib's labels_ibug_300W_{train,test}.xml).

    <dataset><images>
      <image file='path.jpg'>
        <box top='..' left='..' width='..' height='..'> <part name='00' x='..' y='..'/> ... </box>
      </image>
    </images></dataset>

One record per <box>; parts are ordered by their numeric name, and their count picks the shipped scheme (98, 68,
29) unless a scheme is given (any count).
Boxes marked ignore='1' are left out and listed in `skipped`. Image paths are relative to the XML file.
"""
import glob
import os
import xml.etree.ElementTree as ET

import numpy as np

from structalign.data.records import DatasetError, FaceDataset, Problem, Problems, Skipped, make_record


def annotation_path(root: str, split: str) -> str:
    if os.path.isfile(split):
        return split
    if os.path.isfile(root) and root.endswith(".xml"):
        return root
    matches = sorted(glob.glob(os.path.join(root, f"*{split}*.xml")))
    if len(matches) != 1:
        raise DatasetError(f"expected one imglab XML file *{split}*.xml under {root}, found {len(matches)}: {matches}")
    return matches[0]


def _parts(box, source, line, problems):
    parts = []
    for part in box.findall("part"):
        try:
            parts.append((int(part.get("name")), float(part.get("x")), float(part.get("y"))))
        except (TypeError, ValueError):
            problems.report(source, line, f"malformed <part> {ET.tostring(part, encoding='unicode').strip()!r}")
            return None
    names = sorted(p[0] for p in parts)
    if names != list(range(len(parts))):
        problems.report(source, line, f"part names must be 0..{len(parts) - 1}, got {names[:5]}...")
        return None
    return np.array([p[1:] for p in sorted(parts)], np.float64)


def read_imglab(root: str, split: str = "train", on_error: str = "raise",
                face_box: str = "annotation", scheme=None) -> FaceDataset:
    """Open the imglab XML whose name contains split (or split / root = an .xml path)."""
    path = annotation_path(root, split)
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise DatasetError(f"{path}:{e.position[0]}: not valid XML ({e})") from e
    base = os.path.dirname(os.path.abspath(path))
    problems = Problems(on_error, face_box, scheme)
    records, skipped, found = [], [], None
    for entry, image in enumerate(tree.getroot().iter("image"), start=1):
        file_name = image.get("file")
        for box in image.findall("box"):
            where = f"{path} image {entry} ({file_name})"
            if box.get("ignore") == "1":
                skipped.append(Skipped(where, None, "box marked ignore='1'", Problem.IGNORED))
                continue
            try:
                top, left, width, height = (float(box.get(k)) for k in ("top", "left", "width", "height"))
            except (TypeError, ValueError):
                problems.report(where, None, "box needs numeric top, left, width and height")
                continue
            points = _parts(box, where, None, problems)
            if points is None:
                continue
            box_scheme = problems.entry_scheme(found, len(points), where, None, "parts")
            if box_scheme is None:
                continue
            found = box_scheme
            record = make_record(problems, where, None, os.path.join(base, file_name or ""), points,
                                 [left, top, left + width, top + height])
            if record is not None:
                records.append(record)
    if found is None:
        raise DatasetError(f"{path}: no usable <box> with landmarks")
    return FaceDataset(records, found, f"xml:{os.path.basename(path)}", skipped + problems.skipped)
