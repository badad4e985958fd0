"""A batch run of `structalign predict`: images, folders and videos to JSON, CSV and overlays, going on past a bad
input and listing it at the end. An image without a face is a result (listed, with no faces), not a failure.

    structalign predict runs/demo/best.pt photos/ clip.mp4 --out predictions
"""
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from structalign.errors import InputError, MissingFileError, StructalignError
from structalign.inference.outputs import draw_faces, write_csv, write_json
from structalign.inference.sources import VIDEO_EXTENSIONS, image_sources, is_video
from structalign.inference.video import predict_video


@dataclass
class BatchReport:
    """What a run wrote and what it could not do: failures as one-line messages that start with the input;
    without_faces: the images in which no face was found."""

    images: int = 0
    faces: int = 0
    written: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    without_faces: list = field(default_factory=list)


def read_boxes(path: str, count: int) -> list:
    """Face boxes from a text file: one line per image, in the order of the images (folders expanded, sorted),
    holding `x0 y0 x1 y1` for each of its faces (4 numbers per face)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"--boxes: {path!r} does not exist")
    boxes = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                values = np.array([float(v) for v in line.split()]).reshape(-1, 4)
            except ValueError:
                values = np.zeros((0, 4))
            if not len(values) or not np.all((values[:, 2] > values[:, 0]) & (values[:, 3] > values[:, 1])):
                raise InputError(f"{path}, line {number}: expected `x0 y0 x1 y1` (per face) with x1 > x0 and "
                                 f"y1 > y0, got {line.strip()!r}")
            boxes.append(values.tolist())
    if len(boxes) != count:
        raise InputError(f"{path}: {len(boxes)} box lines for {count} images (one line per image, in order)")
    return boxes


def predict_files(predictor, inputs: list, out: str, boxes_file=None, overlays: bool = True,
                  video_filter: dict | None = None, detect_every: int = 5) -> BatchReport:
    """Run predictor over image files, folders and videos; write under out (a folder; or, for a single video input,
    out may be the overlay video's path). detect_every: video frames between two detections (predict_video).
    Returns the BatchReport."""
    report = BatchReport()
    videos = [p for p in inputs if is_video(p)]
    if out.lower().endswith(VIDEO_EXTENSIONS) and (len(videos) != 1 or len(inputs) != 1):
        raise InputError(f"--out {out}: a video path is the output of one input video; give a folder for "
                         f"{len(inputs)} inputs")
    images = []
    for item in (p for p in inputs if not is_video(p)):
        try:
            found = image_sources(item)
        except StructalignError as exc:
            report.failures.append(str(exc))
            continue
        if not found:
            report.failures.append(f"{item}: no image files in this folder")
        images += [source.name for source in found]
    single_video_out = out.lower().endswith(VIDEO_EXTENSIONS)
    out_dir = os.path.dirname(os.path.abspath(out)) if single_video_out else out
    os.makedirs(out_dir, exist_ok=True)
    if images:
        _predict_images(predictor, images, out_dir, boxes_file, overlays, report)
    stems = set()
    for video in videos:
        base = os.path.splitext(out)[0] if single_video_out else os.path.join(
            out_dir, os.path.splitext(os.path.basename(video))[0] + "_landmarks")
        stem, copy = base, 1
        while stem in stems:  # two videos of one name (from two folders) keep their own outputs
            copy += 1
            stem = f"{base}_{copy}"
        stems.add(stem)
        _predict_video(predictor, video, stem, out if single_video_out else stem + ".mp4",
                       {**(video_filter or {}), "detect_every": detect_every}, report)
    return report


def _predict_images(predictor, images: list, out_dir: str, boxes_file, overlays: bool, report: BatchReport):
    boxes = read_boxes(boxes_file, len(images)) if boxes_file else None
    results = predictor.predict(images, boxes=boxes, on_error="skip")
    for i, result in enumerate(results):
        if result.error is not None:
            report.failures.append(result.error)
            continue
        report.images += 1
        report.faces += len(result.faces)
        if not result.faces:
            report.without_faces.append(result.source)
        if overlays:
            stem = os.path.splitext(os.path.basename(result.source))[0]
            path = os.path.join(out_dir, f"{i:04d}_{stem}.png")
            Image.fromarray(draw_faces(np.asarray(Image.open(result.source).convert("RGB")), result.faces)).save(path)
    report.written += [write_json(os.path.join(out_dir, "landmarks.json"), results, predictor.scheme_name),
                       write_csv(os.path.join(out_dir, "landmarks.csv"), results, predictor.num_points,
                                 predictor.has_visibility)]


def _predict_video(predictor, video: str, stem: str, out_video: str, options: dict, report: BatchReport):
    try:
        frames = predict_video(predictor, video, out_video, **options)
    except StructalignError as exc:
        report.failures.append(str(exc))
        return
    report.images += len(frames)
    report.faces += sum(len(f.faces) for f in frames)
    report.written += [out_video, write_json(stem + ".json", frames, predictor.scheme_name),
                       write_csv(stem + ".csv", frames, predictor.num_points, predictor.has_visibility)]
