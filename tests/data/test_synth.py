"""The built-in data: WFLW layout and semantics, attribute flags, determinism, and the `data` subcommands."""
import argparse
import filecmp
import os

import numpy as np
import pytest
from PIL import Image

from structalign.data import open_dataset
from structalign.data.commands import register
from structalign.data.synth import render_dataset, render_face


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
        _, lm, _, flags = render_face(np.random.default_rng([0, 9, i]), 200, 200)
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
    image, lm, _, flags = render_face(np.random.default_rng([0, 9, 3]), 200, 200)
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
