"""structalign.Predictor on real and in-memory images: the evaluation crop, every input kind, the built-in detector on
a real photograph, several faces, a plugged-in detector, --boxes winning, the flip test, and bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from structalign.data.augment import invert_affine, sample_matrix
from structalign.data.reference_pipeline import augment_image
from structalign.data.augment import PlannedSample, IDENTITY
from structalign.errors import InputError, StructalignError
from structalign.inference.crop import crop_image, crop_images, crop_matrix, to_image_pixels
from structalign.inference.detector import YUNET_CALIBRATION, BoxCalibration, YuNetFaceDetector
from structalign.inference.pipeline import FlipTestError, flip_permutation, model_scheme
from structalign.inference.predictor import Predictor
from structalign.landmarks import WFLW98, placeholder_scheme

# Where the astronaut's face is in skimage's 512 x 512 `astronaut` (eyes to chin, measured on the picture).
ASTRONAUT_FACE = (180, 70, 265, 165)


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor(checkpoint, device="cpu")


def test_crop_is_the_evaluation_crop(astronaut):
    """inference/crop.py restates the evaluation crop without torch: same pixels, same way back; also for faces at
    and beyond the picture's edges, wholly outside it, tiny, or larger than the picture (the crop reads only the
    window of the picture it needs)."""
    for box, padding, size in (((180.0, 70.0, 265.0, 165.0), 1.5, 64), ((-20.0, 400.0, 60.3, 530.0), 1.25, 96),
                               ((-300.0, -250.0, -200.0, -150.0), 1.5, 64), ((450.0, 0.0, 512.0, 62.0), 1.5, 64),
                               ((250.2, 250.7, 254.1, 253.9), 1.25, 128), ((-100.0, -60.0, 700.0, 650.0), 1.5, 64)):
        matrix = crop_matrix(box, size, padding)
        np.testing.assert_allclose(matrix, sample_matrix(box, size, IDENTITY, padding), atol=1e-12)
        planned = PlannedSample(matrix, np.zeros((98, 2), np.float32), np.ones(98, np.float32), IDENTITY)
        expected = augment_image(Image.fromarray(astronaut), planned, size)
        mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
        got = ((crop_image(astronaut, matrix, size).astype(np.float32) - mean) / std).transpose(2, 0, 1)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        points = np.random.default_rng(0).uniform(0, size, (1, 5, 2))
        inverse = invert_affine(matrix)
        np.testing.assert_allclose(to_image_pixels(points, matrix[None]), points @ inverse[:, :2].T + inverse[:, 2],
                                   atol=1e-9)


def test_crops_of_several_faces_are_each_face_cropped_alone(astronaut):
    """crop_images gives each face the crop crop_image gives it, a face partly outside the picture included, and no
    crop for no face."""
    boxes = [ASTRONAUT_FACE, (-20.0, 400.0, 60.3, 530.0), (300.5, 10.25, 480.0, 200.0)]
    matrices = np.array([crop_matrix(box, 64, 1.5) for box in boxes])
    crops = crop_images(astronaut, matrices, 64)
    assert crops.shape == (3, 64, 64, 3) and crops.dtype == np.uint8
    for crop, matrix in zip(crops, matrices):
        np.testing.assert_array_equal(crop, crop_image(astronaut, matrix, 64))
    assert crop_images(astronaut, np.zeros((0, 2, 3)), 64).shape == (0, 64, 64, 3)


def test_detector_finds_the_astronauts_face_and_the_crop_holds_it(astronaut):
    boxes, scores = YuNetFaceDetector()(astronaut)
    assert boxes.shape == (1, 4) and scores.shape == (1,) and np.isfinite(scores).all()
    x0, y0, x1, y1 = boxes[0]
    fx0, fy0, fx1, fy1 = ASTRONAUT_FACE
    assert x0 < fx0 + 10 and y0 < fy0 + 10 and x1 > fx1 - 10 and y1 > fy1 - 10  # the face, not a corner of it
    assert (x1 - x0) < 2 * (fx1 - fx0)  # and not the whole torso
    crop_box = YUNET_CALIBRATION(boxes)[0]
    side = 1.5 * max(crop_box[2] - crop_box[0], crop_box[3] - crop_box[1])
    centre = (crop_box[:2] + crop_box[2:]) / 2
    assert np.all(centre - side / 2 <= [fx0, fy0]) and np.all(centre + side / 2 >= [fx1, fy1])


def test_every_input_kind_gives_the_same_landmarks(predictor, astronaut, tmp_path):
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    path = tmp_path / "nested" / "deeper" / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    inputs = [str(path), str(tmp_path), astronaut, Image.fromarray(astronaut),
              torch.from_numpy(astronaut).permute(2, 0, 1), torch.from_numpy(astronaut).permute(2, 0, 1) / 255.0]
    results = predictor.predict(inputs)
    assert [r.source for r in results][:2] == [str(path), str(path)]  # the folder is searched recursively
    assert len(results) == len(inputs)
    reference = results[0]
    assert reference.size == (512, 512) and reference.error is None and len(reference.faces) == 1
    face = reference.faces[0]
    assert face.box.shape == (4,) and isinstance(face.score, float)
    assert face.landmarks.shape == (98, 2) and face.landmarks.dtype == np.float32
    for result in results[1:]:
        np.testing.assert_allclose(result.faces[0].landmarks, face.landmarks, atol=1e-4)
        np.testing.assert_allclose(result.faces[0].box, face.box)


def test_several_faces_in_one_image(predictor, astronaut):
    two = np.concatenate([astronaut, astronaut[:, ::-1]], axis=1)
    faces = predictor.predict(two)[0].faces
    assert len(faces) == 2
    lefts = sorted(f.box[0] for f in faces)
    assert lefts[0] < 512 <= lefts[1]
    for face in faces:  # each face's landmarks come from its own crop, in the whole image's pixels
        centre = (face.box[:2] + face.box[2:]) / 2
        assert np.all(np.abs(np.median(face.landmarks, axis=0) - centre) < (face.box[2] - face.box[0]))


def test_plugged_in_detector_and_given_boxes_win(checkpoint, astronaut):
    calls = []

    def detector(rgb):
        calls.append(rgb.shape)
        return [[180.0, 70.0, 265.0, 165.0], [10.0, 10.0, 90.0, 90.0]], [0.9, 0.2]

    plugged = Predictor(checkpoint, device="cpu", detector=detector)
    result = plugged.predict(astronaut)[0]
    assert calls == [(512, 512, 3)] and [f.score for f in result.faces] == [0.9, 0.2]
    # No calibration attribute on the callable: its boxes are the crop boxes, as given boxes are.
    given = plugged.predict([astronaut], boxes=[[[180.0, 70.0, 265.0, 165.0], [10.0, 10.0, 90.0, 90.0]]])[0]
    assert len(calls) == 1  # boxes win: the detector did not run
    assert [f.score for f in given.faces] == [None, None]
    for a, b in zip(result.faces, given.faces):
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-5)
    calibrated = Predictor(checkpoint, device="cpu", detector=detector, calibration=BoxCalibration(1.2, 0.0, 0.1))
    moved = calibrated.predict(astronaut)[0].faces[0]
    np.testing.assert_allclose(moved.box, [180.0, 70.0, 265.0, 165.0])  # the detector's box is reported
    assert np.abs(moved.landmarks - result.faces[0].landmarks).max() > 0.5  # but the crop followed the calibration


def test_flip_test_averages_with_the_mirrored_image(checkpoint, astronaut):
    box = [180.0, 70.0, 265.0, 165.0]
    width = astronaut.shape[1]
    mirrored_box = [width - 1 - box[2], box[1], width - 1 - box[0], box[3]]
    plain = Predictor(checkpoint, device="cpu", detector=None)
    direct = plain.predict([astronaut], boxes=[box])[0].faces[0].landmarks.astype(np.float64)
    mirrored = plain.predict([astronaut[:, ::-1].copy()], boxes=[mirrored_box])[0].faces[0].landmarks
    back = mirrored[WFLW98.flip_array()].astype(np.float64)
    back[:, 0] = width - 1 - back[:, 0]
    flipped = Predictor(checkpoint, device="cpu", detector=None, flip_test=True)
    got = flipped.predict([astronaut], boxes=[box])[0].faces[0].landmarks
    np.testing.assert_allclose(got, (direct + back) / 2, atol=1e-3)
    assert np.abs(direct - back).max() > 0.1  # the two halves differ: the test can tell a wrong re-indexing


def test_flip_permutation_needs_a_matching_scheme():
    assert flip_permutation(WFLW98, 98).tolist() == list(WFLW98.flip)
    assert flip_permutation(model_scheme(WFLW98.to_dict()), 98).tolist() == list(WFLW98.flip)  # as checkpoints store it
    assert model_scheme("wflw98") is WFLW98 and model_scheme("custom12") is None and model_scheme(None) is None
    with pytest.raises(FlipTestError, match="carries no readable scheme"):
        flip_permutation(None, 12)
    with pytest.raises(FlipTestError, match="predicts 68 points but its scheme wflw98 has 98"):
        flip_permutation(WFLW98, 68)
    with pytest.raises(FlipTestError, match="pairs no left and right points"):
        flip_permutation(placeholder_scheme(5), 5)


def test_bad_input_is_named(predictor, astronaut, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match=r"broken.jpg: cannot read image"):
        predictor.predict(str(broken))
    with pytest.raises(InputError, match=r"lies outside the 512x512 image"):
        predictor.predict([astronaut], boxes=[[600, 10, 700, 100]])
    with pytest.raises(InputError, match=r"x1 > x0"):
        predictor.predict([astronaut], boxes=[[10, 10, 5, 20]])
    with pytest.raises(InputError, match="uint8"):
        predictor.predict(astronaut.astype(np.float32))
    with pytest.raises(StructalignError, match="no such file or folder"):
        predictor.predict(str(tmp_path / "missing.png"))
    blank = np.full((200, 200, 3), 128, np.uint8)  # no face is a result, not an error
    results = predictor.predict([str(broken), blank, astronaut], on_error="skip")  # a batch goes on past a bad image
    assert "cannot read image" in results[0].error
    assert results[1].error is None and results[1].faces == [] and results[1].size == (200, 200)
    assert results[2].error is None and len(results[2].faces) == 1
    assert predictor.predict(blank)[0].faces == [] and predictor.predict_image(blank).faces == []
