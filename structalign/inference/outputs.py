"""What `structalign predict` writes: landmarks as JSON and CSV (one row per face), and overlay pictures.

JSON: {"scheme", "convention", "images": [{"source", "frame", "width", "height", "error", "faces": [{"box",
"score", "landmarks", "visibility"?, "track"?}]}]}. CSV: source, frame, face, track, box_x0, box_y0, box_x1, box_y1,
score, then x<i>, y<i> per point, then visibility<i> per point; an image with no face or an error has no row (the
JSON lists it). Coordinates: image pixels, pixel centres at integers. visibility: P(landmark visible) per point (the
model's visibility head); a model without one writes no visibility field or columns (no made-up scores). Overlays
draw points with P(visible) < OCCLUDED_BELOW as rings instead of dots.
"""
import csv
import json

import numpy as np

from structalign.render import draw_landmarks

CONVENTION = "image pixels, pixel centres at integers; box x0 y0 x1 y1; visibility P(landmark visible)"
OCCLUDED_BELOW = 0.5  # overlays: a point with P(visible) under this is drawn as predicted occluded


def result_dict(result) -> dict:
    """One ImageLandmarks as JSON-ready values."""
    faces = []
    for face in result.faces:
        entry = {"box": np.round(face.box, 3).tolist(), "score": face.score,
                 "landmarks": np.round(face.landmarks.astype(np.float64), 3).tolist()}
        if face.visibility is not None:
            entry["visibility"] = np.round(face.visibility.astype(np.float64), 4).tolist()
        if getattr(face, "track", None) is not None:
            entry["track"] = face.track
        faces.append(entry)
    return {"source": result.source, "frame": result.frame, "width": result.size[0], "height": result.size[1],
            "error": result.error, "faces": faces}


def write_json(path: str, results, scheme_name: str) -> str:
    with open(path, "w") as f:
        json.dump({"scheme": scheme_name, "convention": CONVENTION,
                   "images": [result_dict(r) for r in results]}, f)
    return path


def write_csv(path: str, results, num_points: int, visibility: bool = False) -> str:
    """One row per face; visibility: add the visibility<i> columns (the predictor's has_visibility)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "frame", "face", "track", "box_x0", "box_y0", "box_x1", "box_y1", "score"]
                        + [f"{axis}{i}" for i in range(num_points) for axis in ("x", "y")]
                        + ([f"visibility{i}" for i in range(num_points)] if visibility else []))
        for result in results:
            for k, face in enumerate(result.faces):
                writer.writerow([result.source, "" if result.frame is None else result.frame, k,
                                 "" if getattr(face, "track", None) is None else face.track]
                                + [f"{v:.3f}" for v in face.box] + ["" if face.score is None else f"{face.score:.4f}"]
                                + [f"{v:.3f}" for v in face.landmarks.ravel()]
                                + ([f"{v:.4f}" for v in face.visibility] if visibility else []))
    return path


def draw_faces(rgb: np.ndarray, faces) -> np.ndarray:
    """A copy of rgb (uint8[H, W, 3]) with each face's box in yellow and landmarks in red (render.draw_landmarks),
    points predicted occluded (P(visible) < OCCLUDED_BELOW) as rings."""
    return draw_landmarks(rgb, [face.landmarks for face in faces], boxes=[face.box for face in faces],
                          occluded=[None if face.visibility is None else face.visibility < OCCLUDED_BELOW
                                    for face in faces])
