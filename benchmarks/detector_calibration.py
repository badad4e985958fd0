"""Measure the detector box -> face box calibration (structalign/inference/detector.py YUNET_CALIBRATION).

For each annotated face of the given datasets (and, by default, of their mirror images), the built-in YuNet detector
runs on the whole image; the detection overlapping the face's box most (IoU >= 0.3) is matched to it. The face box is
the tight box of the landmarks (the 300W convention of structalign/data/ibug300w.py; --face-box annotation: the
dataset's own boxes). Printed: detection recall and unmatched detections with their scores, the fitted calibration
(median ratio of the larger sides, median centre offset in detector box widths and heights) with its spread, the
box errors left with no and with the calibration in use, and how many faces keep all their landmarks inside the crop
through it.
Measured figures and the faces used: benchmarks/RESULTS.md, "2026-12-05 — face detector".

    .venv/bin/python benchmarks/detector_calibration.py --faces FACES [--data ROOT:FORMAT:SPLIT ...] [--synth 200]

--faces: the folder benchmarks/real_faces.py writes (its 52 annotated faces, real_faces.ANNOTATED).
"""
import argparse
import os
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from real_faces import ANNOTATED  # noqa: E402

from structalign.data import open_dataset  # noqa: E402
from structalign.data.records import landmark_box  # noqa: E402
from structalign.inference.crop import crop_matrix  # noqa: E402
from structalign.inference.detector import BoxCalibration, YuNetFaceDetector, box_iou  # noqa: E402
from structalign.inference.sources import read_image  # noqa: E402


def images_and_faces(datasets, mirror: bool, face_box: str):
    """(RGB image, [(landmarks, target box)]) per annotated image; with mirror, each image again mirrored."""
    by_image = defaultdict(list)
    for ds in datasets:
        for r in ds.records:
            target = landmark_box(r.landmarks) if face_box == "landmarks" else r.box
            by_image[r.image_path].append((r.landmarks, target))
    for path, faces in sorted(by_image.items()):
        rgb = read_image(path)
        yield rgb, faces
        if mirror:
            right = rgb.shape[1] - 1
            yield rgb[:, ::-1].copy(), [(np.stack([right - p[:, 0], p[:, 1]], axis=1),
                                         np.array([right - b[2], b[1], right - b[0], b[3]])) for p, b in faces]


def match_faces(datasets, detector, mirror: bool = False, face_box: str = "landmarks") -> dict:
    """Per matched face: detector box, face box and landmarks; plus counts of faces, matches, spare detections."""
    out = {"detected": [], "target": [], "landmarks": [], "faces": 0, "spare": 0, "scores": [], "spare_scores": []}
    for rgb, faces in images_and_faces(datasets, mirror, face_box):
        boxes, scores = detector(rgb)
        targets = np.stack([box for _, box in faces])
        iou = box_iou(targets, boxes) if len(boxes) else np.zeros((len(targets), 0))
        used = set()
        for i in range(len(targets)):
            j = int(np.argmax(iou[i])) if iou.shape[1] else -1
            if j >= 0 and iou[i, j] >= 0.3 and j not in used:
                used.add(j)
                out["detected"].append(boxes[j])
                out["target"].append(targets[i])
                out["landmarks"].append(faces[i][0])
                out["scores"].append(scores[j])
        out["spare_scores"] += [scores[j] for j in range(len(boxes)) if j not in used]
        out["faces"] += len(faces)
        out["spare"] += len(boxes) - len(used)
    return out


def fit(detected: np.ndarray, target: np.ndarray) -> dict:
    """Side ratio (larger side of the face box / larger side of the detector box: the crop's scale) and centre offset
    (x in detector box widths, y in heights, as BoxCalibration applies it) per face, with the medians as a
    BoxCalibration."""
    size = detected[:, 2:] - detected[:, :2]
    ratio = np.max(target[:, 2:] - target[:, :2], axis=1) / np.max(size, axis=1)
    offset = ((target[:, :2] + target[:, 2:]) - (detected[:, :2] + detected[:, 2:])) / 2 / size
    calibration = BoxCalibration(float(np.median(ratio)), float(np.median(offset[:, 0])),
                                 float(np.median(offset[:, 1])))
    return {"ratio": ratio, "offset": offset, "calibration": calibration}


def inside_crop_share(detected, landmarks, calibration: BoxCalibration, padding: float, size: int = 256) -> float:
    """Share of faces whose landmarks all fall inside the crop taken around the calibrated detector box."""
    inside = 0
    for box, points in zip(calibration(np.asarray(detected)), landmarks):
        m = crop_matrix(box, size, padding)
        crop_points = points @ m[:, :2].T + m[:, 2]
        inside += bool(np.all((crop_points > -0.5) & (crop_points < size - 0.5)))
    return inside / max(1, len(landmarks))


def box_errors(detected, target, calibration: BoxCalibration) -> tuple:
    """Median |side error| and median centre error of the calibrated boxes, as fractions of the face box side."""
    boxes = calibration(np.asarray(detected))
    side = np.maximum(target[:, 2] - target[:, 0], target[:, 3] - target[:, 1])
    side_error = np.abs(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / side - 1)
    centre_error = np.linalg.norm(((boxes[:, :2] + boxes[:, 2:]) - (target[:, :2] + target[:, 2:])) / 2, axis=1) / side
    return float(np.median(side_error)), float(np.median(centre_error))


def quartiles(x) -> str:
    q1, q2, q3 = np.percentile(x, [25, 50, 75])
    return f"median {q2:.3f} (IQR {q1:.3f} .. {q3:.3f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", help="the folder benchmarks/real_faces.py wrote: measure on its 52 annotated faces")
    parser.add_argument("--data", action="append", default=[], metavar="ROOT:FORMAT:SPLIT",
                        help="an annotated dataset (structalign.data.open_dataset); repeat for several")
    parser.add_argument("--synth", type=int, default=0, help="also count detections on N built-in renders")
    parser.add_argument("--face-box", default="landmarks", choices=("landmarks", "annotation"),
                        help="the face box to calibrate to: the tight landmark box (300W; data.face_box=landmarks) "
                        "or the dataset's own box (e.g. WFLW's; data.face_box=annotation)")
    parser.add_argument("--no-mirror", action="store_true", help="do not add the mirrored images (by default each "
                        "image is measured as it is and mirrored, so that the fit is left-right symmetric)")
    args = parser.parse_args(argv)
    detector = YuNetFaceDetector()
    datasets = []
    faces = [os.path.join(args.faces, spec) for spec in ANNOTATED] if args.faces else []
    for spec in faces + args.data:
        root, fmt, split = spec.rsplit(":", 2)
        datasets.append(open_dataset(root, fmt=fmt, split=split, on_error="skip"))
        print(f"{spec}: {len(datasets[-1])} faces ({len(datasets[-1].skipped)} bad annotations left out)")
    if datasets:
        found = match_faces(datasets, detector, mirror=not args.no_mirror, face_box=args.face_box)
        detected, target = np.array(found["detected"]), np.array(found["target"])
        print(f"detections matched {len(detected)} of {found['faces']} faces; {found['spare']} detections "
              "matched no annotated face")
        print(f"scores of matched detections {quartiles(found['scores'])}, min {min(found['scores']):.2f}; "
              f"of the others: {np.round(sorted(found['spare_scores']), 2).tolist()}")
        result = fit(detected, target)
        print(f"face-box side / detector side:     {quartiles(result['ratio'])}")
        print(f"centre offset x / detector width:  {quartiles(result['offset'][:, 0])}")
        print(f"centre offset y / detector height: {quartiles(result['offset'][:, 1])}")
        print(f"fitted: {result['calibration']}  (in use: {YuNetFaceDetector.calibration})")
        for name, calibration in (("identity", BoxCalibration()), ("in use", YuNetFaceDetector.calibration)):
            side_error, centre_error = box_errors(detected, target, calibration)
            print(f"{name} calibration: median |side error| {100 * side_error:.1f} %, median centre error "
                  f"{100 * centre_error:.1f} % of the face box side")
        for padding in (1.25, 1.5):
            for name, calibration in (("identity", BoxCalibration()), ("in use", YuNetFaceDetector.calibration)):
                share = inside_crop_share(detected, found["landmarks"], calibration, padding)
                print(f"crop padding {padding}: all landmarks inside the crop for {100 * share:.1f} % of faces "
                      f"({name} calibration)")
    if args.synth:
        import tempfile

        from structalign.data.synth import render_dataset

        with tempfile.TemporaryDirectory() as root:
            render_dataset(root, 1, args.synth, seed=0)
            test = open_dataset(root, fmt="wflw", split="test")
            found = match_faces([test], detector)
            print(f"built-in renders: detections matched {len(found['detected'])} of {found['faces']} faces, "
                  f"{found['spare']} detections matched no face")
    return 0


if __name__ == "__main__":
    sys.exit(main())
