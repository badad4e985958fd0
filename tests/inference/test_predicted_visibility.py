"""Predicted visibility: P(landmark visible) per point from Predictor, OnnxPredictor and `structalign
predict` (JSON, CSV, overlays, video), the flip test re-indexing it by the scheme's flip permutation, and a model
without a visibility head (as a checkpoint without one loads) giving None and no visibility output anywhere."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from structalign.cli import main
from structalign.data import NORM_MEAN, NORM_STD
from structalign.errors import InputError
from structalign.inference.crop import crop_image, crop_matrix
from structalign.inference.outputs import draw_faces
from structalign.inference.pipeline import FaceLandmarks
from structalign.inference.predictor import Predictor
from structalign.inference.video import FaceTracks
from structalign.landmarks import WFLW98
from structalign.render import PREDICTION_COLOUR

BOX = [180.0, 70.0, 265.0, 165.0]  # the astronaut's face


def test_predictor_returns_p_visible_per_point_of_each_face(checkpoint, astronaut):
    predictor = Predictor(checkpoint, device="cpu", detector=None)
    assert predictor.has_visibility
    face = predictor.predict([astronaut], boxes=[BOX])[0].faces[0]
    assert face.visibility.shape == (98,) and face.visibility.dtype == np.float32
    assert np.all((face.visibility >= 0) & (face.visibility <= 1)) and np.ptp(face.visibility) > 0.5
    crop = crop_image(astronaut, crop_matrix(BOX, 64, 1.5), 64).astype(np.float32)
    images = torch.from_numpy((crop - np.array(NORM_MEAN, np.float32)) / np.array(NORM_STD, np.float32))
    with torch.no_grad():
        _, logits = predictor.model(images.permute(2, 0, 1)[None])
    np.testing.assert_allclose(face.visibility, torch.sigmoid(logits[0]).numpy(), atol=1e-6)  # P(visible), not logits
    # Several faces, split over forwards of one face each: each face keeps its own crop's scores.
    two = np.concatenate([astronaut, astronaut[:, ::-1]], axis=1)
    boxes = [[BOX, [1023 - BOX[2], BOX[1], 1023 - BOX[0], BOX[3]]]]
    whole = Predictor(checkpoint, device="cpu", detector=None).predict([two], boxes=boxes)[0].faces
    split = Predictor(checkpoint, device="cpu", detector=None, batch_size=1).predict([two], boxes=boxes)[0].faces
    for a, b in zip(whole, split):  # float sums in another order per batch size
        np.testing.assert_allclose(a.visibility, b.visibility, atol=1e-5)
    np.testing.assert_allclose(whole[0].visibility, face.visibility, atol=1e-5)
    assert np.abs(whole[0].visibility - whole[1].visibility).max() > 1e-3  # the mirrored face has its own scores


def test_flip_test_reindexes_visibility_by_the_flip_permutation(make_checkpoint, checkpoint, astronaut):
    flip = WFLW98.flip_array()
    # Logits fixed per point whatever the image: the mirrored crop's point i is the scheme's point flip[i].
    path = make_checkpoint("fixed")
    fixed = Predictor(path, device="cpu", detector=None, flip_test=True)
    got = fixed.predict([astronaut], boxes=[BOX])[0].faces[0].visibility
    p = torch.sigmoid(torch.load(path)["model"]["visibility.output.bias"]).numpy()
    np.testing.assert_allclose(got, (p + p[flip]) / 2, atol=1e-6)
    assert np.abs(got - p).max() > 0.3  # an average without the re-indexing would give p itself
    # Scores that depend on the image: the same average as predicting on the mirrored photograph by hand.
    width = astronaut.shape[1]
    plain = Predictor(checkpoint, device="cpu", detector=None)
    direct = plain.predict([astronaut], boxes=[BOX])[0].faces[0].visibility
    mirrored = plain.predict([astronaut[:, ::-1].copy()], boxes=[[width - 1 - BOX[2], BOX[1], width - 1 - BOX[0],
                                                                  BOX[3]]])[0].faces[0].visibility
    flipped = Predictor(checkpoint, device="cpu", detector=None, flip_test=True)
    np.testing.assert_allclose(flipped.predict([astronaut], boxes=[BOX])[0].faces[0].visibility,
                               (direct + mirrored[flip]) / 2, atol=1e-5)


def test_predict_command_writes_visibility_to_json_csv_and_overlays(checkpoint, astronaut, tmp_path):
    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    out = tmp_path / "out"
    assert main(["predict", checkpoint, str(tmp_path / "astronaut.png"), "--out", str(out), "--flip-test"]) == 0
    expected = Predictor(checkpoint, device="cpu", flip_test=True).predict(astronaut)[0].faces[0].visibility
    face = json.loads((out / "landmarks.json").read_text())["images"][0]["faces"][0]
    np.testing.assert_allclose(face["visibility"], expected, atol=1e-4)
    with open(out / "landmarks.csv") as f:
        header, row = list(csv.reader(f))
    assert header[9 + 2 * 98 - 2:9 + 2 * 98] == ["x97", "y97"]
    assert header[9 + 2 * 98:] == [f"visibility{i}" for i in range(98)]
    np.testing.assert_allclose(np.array(row[9 + 2 * 98:], float), face["visibility"], atol=1e-4)


def test_a_model_without_visibility_head_gives_none_and_no_visibility_output(checkpoint_without_visibility,
                                                                            astronaut, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from structalign.export import export_onnx
    from structalign.inference.onnx_predictor import OnnxPredictor

    predictor = Predictor(checkpoint_without_visibility, device="cpu", flip_test=True)
    assert not predictor.has_visibility
    faces = predictor.predict(astronaut)[0].faces
    assert len(faces) == 1 and faces[0].visibility is None and faces[0].landmarks.shape == (98, 2)
    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    out = tmp_path / "out"
    assert main(["predict", checkpoint_without_visibility, str(tmp_path / "astronaut.png"), "--out", str(out)]) == 0
    face = json.loads((out / "landmarks.json").read_text())["images"][0]["faces"][0]
    assert set(face) == {"box", "score", "landmarks"}
    with open(out / "landmarks.csv") as f:
        header, row = list(csv.reader(f))
    assert len(header) == len(row) == 9 + 2 * 98 and not [h for h in header if h.startswith("visibility")]
    path = export_onnx(checkpoint_without_visibility, str(tmp_path / "old.onnx"), input_kind="crops")[0]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["landmarks"]
    onnx_predictor = OnnxPredictor(path, flip_test=True)
    assert not onnx_predictor.has_visibility
    (onnx_face,) = onnx_predictor.predict(astronaut)[0].faces
    assert onnx_face.visibility is None
    assert np.abs(onnx_face.landmarks - faces[0].landmarks).max() < 0.05


def test_overlay_draws_points_predicted_occluded_as_rings():
    black = np.zeros((1000, 1000, 3), np.uint8)  # dot radius 5 px, ring radius 7.5 px
    points = np.array([[200.0, 200.0], [600.0, 600.0]], np.float32)
    seen = FaceLandmarks(np.array([100.0, 100.0, 700.0, 700.0]), None, points, np.array([0.9, 0.1], np.float32))
    picture = draw_faces(black, [seen])
    assert picture[200, 200].tolist() == list(PREDICTION_COLOUR)  # visible: a filled dot
    assert picture[600, 600].tolist() == [0, 0, 0]  # predicted occluded: hollow
    assert picture[600, 597:604].max() == 0 and picture[600, 606:609, 0].max() > 200  # a ring 7.5 px around it
    unknown = FaceLandmarks(seen.box, None, points)  # no visibility head: every point a dot
    assert draw_faces(black, [unknown])[600, 600].tolist() == list(PREDICTION_COLOUR)
    with pytest.raises(InputError, match="occluded: 3 flags for a set of 2 points"):
        from structalign.render import draw_landmarks

        draw_landmarks(black, [points], occluded=[np.array([True, False, True])])


def test_video_tracks_keep_each_frames_visibility_unsmoothed():
    tracks = FaceTracks(min_cutoff=1.0, beta=0.0, d_cutoff=1.0)
    box = np.array([0.0, 0.0, 50.0, 50.0])
    tracks.update([FaceLandmarks(box, 1.0, np.zeros((3, 2), np.float32), np.array([0.9, 0.8, 0.1], np.float32))],
                  0.1)
    now = np.array([0.2, 0.7, 0.95], np.float32)
    (face,) = tracks.update([FaceLandmarks(box, 1.0, np.full((3, 2), 10.0, np.float32), now)], 0.1)
    assert face.track == 0 and 0.0 < face.landmarks[0, 0] < 10.0  # landmarks filtered along the track
    np.testing.assert_array_equal(face.visibility, now)  # visibility: this frame's own
    (old,) = tracks.update([FaceLandmarks(box, 1.0, np.zeros((3, 2), np.float32))], 0.1)
    assert old.visibility is None and old.track == 0
