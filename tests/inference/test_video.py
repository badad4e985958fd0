"""Video: the One-Euro filter, faces followed across frames, detection every k frames with the faces followed from
their landmarks in between, and `structalign predict clip.mp4 --out out.mp4` on a short video written here (overlay
video + per-frame JSON/CSV), two videos of one name, and unreadable and zero-frame videos."""
import csv
import json

import numpy as np
import pytest

from structalign.cli import main
from structalign.errors import InputError
from structalign.inference.pipeline import FaceLandmarks
from structalign.inference.predictor import Predictor
from structalign.inference.video import FaceTracks, FollowedFaces, OneEuroFilter, predict_video

cv2 = pytest.importorskip("cv2")
FRAMES, FPS, SIDE = 8, 10, 256


@pytest.fixture(scope="module")
def clip(astronaut, tmp_path_factory):
    """A short video of the astronaut's face panning right (4 px a frame), written with OpenCV."""
    path = str(tmp_path_factory.mktemp("video") / "clip.mp4")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), FPS, (SIDE, SIDE))
    for t in range(FRAMES):
        x = 60 + 4 * t
        writer.write(cv2.cvtColor(np.ascontiguousarray(astronaut[20:20 + SIDE, x:x + SIDE]), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_one_euro_filter_smooths_rest_and_follows_motion():
    rng = np.random.default_rng(0)
    dt = 1 / 30
    still = OneEuroFilter(min_cutoff=1.0, beta=0.0)
    noisy = 100 + rng.normal(0, 1, (300, 5, 2))
    out = np.stack([still(x, dt) for x in noisy])
    assert out[0].tolist() == noisy[0].tolist()  # the first sample passes unchanged
    assert out[100:].std() < noisy[100:].std() / 3
    ramp = np.arange(300)[:, None, None] * np.ones((1, 5, 2)) * 10.0  # 300 px/s
    lags = {}
    for beta in (0.0, 0.1):
        moving = OneEuroFilter(min_cutoff=1.0, beta=beta)
        lags[beta] = float((ramp[-1] - [moving(x, dt) for x in ramp][-1]).mean())
    assert lags[0.1] < lags[0.0] / 5  # beta raises the cutoff with speed: less lag on fast moves
    with pytest.raises(InputError, match="min_cutoff must be > 0"):
        OneEuroFilter(min_cutoff=0)


def test_tracks_follow_faces_and_filter_each_on_its_own():
    tracks = FaceTracks(min_cutoff=1.0, beta=0.0, d_cutoff=1.0)

    def face(x, value):
        return FaceLandmarks(np.array([x, 0.0, x + 50, 50]), 1.0, np.full((3, 2), value, np.float32))

    first = tracks.update([face(0, 10.0), face(200, 20.0)], 0.1)
    second = tracks.update([face(205, 30.0), face(4, 0.0)], 0.1)  # listed in the other order, both moved a little
    assert [f.track for f in first] == [0, 1] and [f.track for f in second] == [1, 0]
    assert 20.0 < second[0].landmarks[0, 0] < 30.0 and 0.0 < second[1].landmarks[0, 0] < 10.0
    third = tracks.update([face(400, 5.0)], 0.1)  # a face elsewhere: a new track, unfiltered
    assert third[0].track == 2 and third[0].landmarks[0, 0] == 5.0


def test_followed_faces_move_with_their_landmarks():
    followed = FollowedFaces()
    points = np.array([[10, 20], [30, 20], [20, 40]], np.float32)  # landmark box 10..30 x 20..40
    followed.start([FaceLandmarks(np.array([0.0, 10.0, 40.0, 60.0]), 0.9, points)])  # its detector box
    np.testing.assert_allclose(followed.boxes(100, 100), [[0, 10, 40, 60]])
    followed.moved([FaceLandmarks(np.zeros(4), None, (points - 20) * 1.5 + [60, 50])])  # moved, 1.5 x larger
    # The detector box keeps its place and size relative to the landmark box (centre 5 px below it, 2 x its width).
    np.testing.assert_allclose(followed.boxes(100, 100), [[30, 35, 90, 110]])
    followed.moved([FaceLandmarks(np.zeros(4), None, points + [200, 0])])
    assert followed.boxes(100, 100).shape == (0, 4)  # a face that left the frame is dropped


def test_detection_every_k_frames_follows_faces_in_between(checkpoint, clip):
    calls = []

    def detector(rgb):
        calls.append(len(calls))
        return [[100.0, 60.0, 190.0, 170.0]], [0.9]

    predictor = Predictor(checkpoint, device="cpu", detector=detector)
    frames = predict_video(predictor, clip, detect_every=3)
    assert len(calls) == 3  # frames 0, 3 and 6 of 8
    assert [f.faces[0].score for f in frames] == [0.9, None, None] * 2 + [0.9, None]
    assert {f.faces[0].track for f in frames} == {0} and all(len(f.faces) == 1 for f in frames)
    predict_video(predictor, clip, detect_every=1)
    assert len(calls) == 3 + FRAMES
    with pytest.raises(InputError, match="detect_every must be a positive int"):
        predict_video(predictor, clip, detect_every=0)


def test_predict_command_on_a_video(checkpoint, clip, tmp_path, capsys):
    out = tmp_path / "result" / "out.mp4"
    assert main(["predict", checkpoint, clip, "--out", str(out), "--filter-min-cutoff", "2",
                 "--filter-beta", "0.1"]) == 0
    assert f"{FRAMES} image(s) or frame(s)" in capsys.readouterr().out
    capture = cv2.VideoCapture(str(out))
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames == FRAMES
    assert (capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (SIDE, SIDE)
    data = json.loads((tmp_path / "result" / "out.json").read_text())
    assert [image["frame"] for image in data["images"]] == list(range(FRAMES))
    faces = [image["faces"] for image in data["images"]]
    assert all(len(f) == 1 for f in faces) and {f[0]["track"] for f in faces} == {0}
    lefts = [f[0]["box"][0] for f in faces]
    assert lefts[-1] < lefts[0] - 15  # the face moves left in the picture as the camera pans right
    with open(tmp_path / "result" / "out.csv") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 1 + FRAMES and len(rows[0]) == 9 + 3 * 98 and rows[0][-1] == "visibility97"
    assert [int(r[1]) for r in rows[1:]] == list(range(FRAMES))


def test_two_videos_of_one_name_keep_their_own_outputs(checkpoint, clip, tmp_path):
    import shutil

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(clip, tmp_path / folder / "clip.mp4")
    out = tmp_path / "out"
    assert main(["predict", checkpoint, str(tmp_path / "a" / "clip.mp4"), str(tmp_path / "b" / "clip.mp4"), "--out",
                 str(out)]) == 0
    sources = {json.loads((out / f"{stem}.json").read_text())["images"][0]["source"]
               for stem in ("clip_landmarks", "clip_landmarks_2")}
    assert sources == {str(tmp_path / "a" / "clip.mp4"), str(tmp_path / "b" / "clip.mp4")}
    assert (out / "clip_landmarks.mp4").is_file() and (out / "clip_landmarks_2.mp4").is_file()


def test_bad_videos_are_reported_and_the_run_goes_on(checkpoint, clip, tmp_path, capsys):
    empty = tmp_path / "empty.mp4"
    writer = cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (64, 64))
    writer.release()  # a video file with no frame
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"\x00" * 1000)
    out = tmp_path / "out"
    assert main(["predict", checkpoint, str(empty), str(garbage), clip, "--out", str(out)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[-3] == "2 input(s) skipped:"
    assert lines[-2].startswith(f"  {empty}: ") and lines[-1].startswith(f"  {garbage}: ")
    assert "Traceback" not in captured.err
    assert (out / "clip_landmarks.mp4").is_file() and (out / "clip_landmarks.json").is_file()
