"""The built-in data: WFLW layout and semantics, attribute flags, determinism, and the `data` subcommands."""
import argparse
import filecmp
import hashlib
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from structalign.data import OCCLUDED, UNLABELLED, VISIBLE, open_dataset
from structalign.data.commands import register
from structalign.data.synth import mask_visibility, render_dataset, render_face
from structalign.errors import InputError


def _cli(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.run(args)


def test_synth_is_read_by_the_wflw_reader(synth_root):
    train, test = open_dataset(synth_root, "wflw", "train"), open_dataset(synth_root, "wflw", "test")
    assert len(train) == 16 and len(test) == 8 and not train.skipped
    for r in train.records:
        image = Image.open(r.image_path)
        assert image.format == "JPEG" and image.size == (160, 160)
        # the box is written in whole pixels, as WFLW's is
        assert np.all(r.landmarks >= r.box[:2] - 0.51) and np.all(r.landmarks <= r.box[2:] + 0.51)
        assert np.all(r.landmarks > -1) and np.all(r.landmarks < 161)
    subsets = sum(len(open_dataset(synth_root, "wflw", s)) for s in ("pose", "expression", "illumination",
                                                                     "makeup", "occlusion", "blur"))
    assert subsets > 0


def test_synth_is_deterministic_for_a_seed(tmp_path, synth_root):
    render_dataset(str(tmp_path), 16, 8, seed=1, width=160, height=160, workers=2)
    rel = os.path.join("WFLW_annotations", "list_98pt_rect_attr_train_test", "list_98pt_rect_attr_train.txt")
    assert filecmp.cmp(os.path.join(synth_root, rel), str(tmp_path / rel), shallow=False)
    image = os.path.join("WFLW_images", "synth", "test_00003.jpg")
    assert filecmp.cmp(os.path.join(synth_root, image), str(tmp_path / image), shallow=False)
    other = render_face(np.random.default_rng([2, 1, 0]), 160, 160)[1]
    assert not np.allclose(other, open_dataset(synth_root, "wflw", "train")[0].landmarks, atol=0.01)


def test_synth_landmarks_keep_wflw_semantics():
    frontal = 0
    for i in range(40):
        _, lm, _, flags, _ = render_face(np.random.default_rng([0, 9, i]), 200, 200)
        if flags[0]:  # large pose: left/right order may legitimately swap under strong yaw and roll
            continue
        frontal += 1
        left_eye, right_eye = lm[60:68].mean(0), lm[68:76].mean(0)
        assert lm[60, 0] < lm[64, 0] < lm[68, 0] < lm[72, 0]  # eye corners, image left to right
        assert lm[0, 0] < lm[16, 0] < lm[32, 0] and lm[76, 0] < lm[82, 0]
        assert np.linalg.norm(lm[96] - left_eye) < np.linalg.norm(lm[96] - right_eye)  # pupils inside their eyes
        assert lm[38:42, 1].mean() < lm[60:68, 1].mean() < lm[54, 1] < lm[85, 1] < lm[16, 1]  # brow, eye, nose,
    assert frontal > 20                                                                         # mouth, chin


def test_synth_draws_the_face_where_the_landmarks_are():
    image, lm, _, flags, _ = render_face(np.random.default_rng([0, 9, 3]), 200, 200)
    assert not flags[4] and not flags[5]
    pixels = np.asarray(image, dtype=float)
    pupils = [pixels[int(round(y)), int(round(x))].mean() for x, y in lm[96:98]]
    cheeks = [pixels[int(round(y)), int(round(x))].mean() for x, y in (lm[4] * 0.7 + lm[54] * 0.3,
                                                                        lm[28] * 0.7 + lm[54] * 0.3)]
    assert max(pupils) < 60 and min(cheeks) > max(pupils) + 40


def test_synth_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="at least 64 x 64"):
        render_dataset(str(tmp_path), 1, 1, width=32)
    with pytest.raises(ValueError, match="face_scale"):
        render_dataset(str(tmp_path), 1, 1, face_scale=(0.3, 0.9))


def test_data_commands(tmp_path, capsys):
    out = tmp_path / "synth"
    assert _cli(["data", "synth", str(out), "--num-train", "3", "--num-test", "2", "--width", "96",
                 "--height", "96", "--workers", "1"]) == 0
    assert "wrote 3 train and 2 test faces" in capsys.readouterr().out
    assert _cli(["data", "check", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wflw train: 3 faces (wflw98), 0 problems" in printed
    os.remove(out / "WFLW_images" / "synth" / "train_00001.jpg")
    assert _cli(["data", "check", str(out), "--format", "wflw"]) == 1
    assert "image not found" in capsys.readouterr().out
    assert _cli(["data", "check", str(tmp_path)]) == 1
    for bad in ("1.5", "-0.1", "nan"):
        with pytest.raises(InputError, match=rf"occlusion must be a probability, 0 <= occlusion <= 1, got {bad}"):
            _cli(["data", "synth", str(tmp_path / "bad"), "--num-train", "1", "--num-test", "1", "--occlusion", bad])
    assert not (tmp_path / "bad").exists()
    assert _cli(["data", "synth", str(out), "--num-train", "4", "--num-test", "0", "--width", "96", "--height", "96",
                 "--workers", "1", "--occlusion", "1"]) == 0
    train = open_dataset(str(out), "wflw", "train")
    assert all(r.attributes[4] == 1 for r in train.records) and train.has_visibility_labels


# sha256 of render_face(np.random.default_rng([0, 2, i])).tobytes() (320 x 320) before visibility labels existed:
# the occluder mask must not change a single draw (faces 0, 3 and 6 have occluders).
IMAGES_BEFORE_LABELS = {
    0: "0a9b9e081cdd22e7306c0c5fd4bf9f4111272de3b077a32db41bc1536e71fec0",
    1: "14cc05ceca49b9cff14481d144733e728e5c4050eff300fd67149c4bb5edf84e",
    3: "030fc69def6335c56245c058cf96ccd029428c516aed7795cb0c6fd7b9205bf0",
    6: "95500b360b502edbca356b2bf73509efc82fe7b1512fee862f3c989ff90a4fb1",
}


def test_visibility_labels_leave_the_images_unchanged():
    for i, digest in IMAGES_BEFORE_LABELS.items():
        image, _, _, flags, visibility = render_face(np.random.default_rng([0, 2, i]))
        assert hashlib.sha256(image.tobytes()).hexdigest() == digest
        assert (visibility == OCCLUDED).any() == bool(flags[4])  # each of these faces' occluders covers a point


def test_mask_visibility_reads_the_nearest_pixel():
    mask = Image.new("L", (40, 30), 0)
    ImageDraw.Draw(mask).rectangle([10, 20, 19, 24], fill=255)  # columns 10..19, rows 20..24
    points = np.array([[15, 22], [22, 15], [19.4, 24.4], [19.6, 22], [10, 19.6], [-0.6, 5], [39.4, 29.4], [5, 30]])
    labels = mask_visibility(np.asarray(mask), points)
    np.testing.assert_array_equal(labels, [OCCLUDED, VISIBLE, OCCLUDED, VISIBLE, OCCLUDED, UNLABELLED, VISIBLE,
                                           UNLABELLED])
    assert labels.dtype == np.float32


def _recording_draw(monkeypatch):
    """Record every rectangle / ellipse PIL draws: (image mode, shape, corners, fill)."""
    calls, real = [], ImageDraw.Draw

    class Recording:
        def __init__(self, image):
            self.image, self.draw = image, real(image)

        def __getattr__(self, name):
            method = getattr(self.draw, name)
            if name not in ("rectangle", "ellipse"):
                return method

            def record(xy, **kw):
                calls.append((self.image.mode, name, [float(v) for v in xy], kw.get("fill")))
                return method(xy, **kw)
            return record

    monkeypatch.setattr(ImageDraw, "Draw", Recording)
    return calls


def _inside(shape, corners, point, grow):
    """Whether point lies inside the rectangle / ellipse with corners, grown by `grow` pixels per side (PIL draws
    whole pixels and truncates float corners: a 1.5 px margin either way)."""
    x0, y0, x1, y1 = corners
    if shape == "rectangle":
        return x0 - grow <= point[0] <= x1 + grow and y0 - grow <= point[1] <= y1 + grow
    centre, radii = np.array([x0 + x1, y0 + y1]) / 2, np.array([x1 - x0, y1 - y0]) / 2 + grow
    return bool(np.all(radii > 0)) and float(np.sum(((point - centre) / radii) ** 2)) <= 1


def test_visibility_labels_are_the_drawn_occluders(monkeypatch):
    calls = _recording_draw(monkeypatch)
    checked = {OCCLUDED: 0, VISIBLE: 0}
    for i in range(12):
        del calls[:]
        image, lm, _, flags, visibility = render_face(np.random.default_rng([4, 4, i]), 160, 160, occlusion=1.0)
        assert flags[4] == 1
        occluders = [c for c in calls if c[0] == "L"]
        drawn = [c for c in calls if c[0] == "RGB"][-len(occluders):]
        assert 1 <= len(occluders) <= 2 and [c[1:3] for c in drawn] == [c[1:3] for c in occluders]
        for point, label in zip(np.rint(lm), visibility):
            assert label != UNLABELLED  # the face lies on the image
            if any(_inside(shape, xy, point, -1.5) for _, shape, xy, _ in occluders):  # well inside one
                assert label == OCCLUDED
                checked[OCCLUDED] += 1
            elif not any(_inside(shape, xy, point, 1.5) for _, shape, xy, _ in occluders):  # well outside all
                assert label == VISIBLE
                checked[VISIBLE] += 1
    assert checked[OCCLUDED] > 50 and checked[VISIBLE] > 200


def test_occlusion_sets_the_share_of_faces_with_occluders():
    never = [render_face(np.random.default_rng([5, 5, i]), 128, 128, occlusion=0.0) for i in range(10)]
    assert all(f[3][4] == 0 and np.all(f[4] == VISIBLE) for f in never)
    always = [render_face(np.random.default_rng([5, 5, i]), 128, 128, occlusion=1.0) for i in range(10)]
    assert all(f[3][4] == 1 for f in always)
    share = np.mean([f[4] == OCCLUDED for f in always])
    assert 0.05 < share < 0.6
    for a, b in zip(never, always):  # only the occlusion flag's threshold changes
        np.testing.assert_array_equal(np.delete(a[3], 4), np.delete(b[3], 4))
