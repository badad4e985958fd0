"""Bad samples are caught before training and nothing is left behind: every record check at open time (one fault per
small real-format dataset), `data check` decoding every image and counting problems per kind, images that go bad
during training in both pipelines (one line under on_error=raise, a deterministic replacement under skip), data.*
config keys reaching training, and the CLI catching only the project's own errors."""
import json
import os
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from structalign.cli import main
from structalign.data import (CROP_PADDING, AugmentConfig, DatasetError, Problem, make_loader, open_dataset,
                              write_skipped)
from structalign.data.augment import out_of_crop_rate
from structalign.data.commands import check
from structalign.data.wflw import annotation_path, visibility_path


@pytest.fixture
def root(synth_root, tmp_path):
    """A private copy of the built-in WFLW-layout data (16 train, 8 test faces of 160 x 160) to damage, without the
    visibility sidecars (as real WFLW: these tests add and change annotation lines; test_readers covers sidecars)."""
    copy = shutil.copytree(synth_root, tmp_path / "data")
    for split in ("train", "test"):
        os.remove(visibility_path(annotation_path(str(copy), split)))
    return copy


def _lines(root):
    path = annotation_path(str(root), "train")
    return path, open(path).read().splitlines()


def _rewrite(root, edit):
    """Apply edit(list of the train annotation's field lists) and write the file back; returns its path."""
    path, lines = _lines(root)
    rows = [line.split() for line in lines]
    edit(rows)
    with open(path, "w") as f:
        f.write("".join(" ".join(r) + "\n" for r in rows))
    return path


def _shift_point(rows, dx):
    rows[1][0] = f"{float(rows[1][0]) + dx:.3f}"


def _box(rows, box):
    rows[1][196:200] = [str(v) for v in box]


def _image(root, line: int) -> str:
    _, lines = _lines(root)
    return os.path.join(str(root), "WFLW_images", lines[line - 1].split()[-1])


def _zero_bytes(root):
    open(_image(root, 2), "wb").close()


def _garbage(root):
    with open(_image(root, 2), "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


FAULTS = {
    "landmark 5000 px off": (lambda r: _rewrite(r, lambda rows: _shift_point(rows, 5000)), 2,
                             Problem.LANDMARKS_OFF_IMAGE, "outside the 160 x 160 image"),
    "landmark -3000 px off": (lambda r: _rewrite(r, lambda rows: _shift_point(rows, -3000)), 2,
                              Problem.LANDMARKS_OFF_IMAGE, "outside the 160 x 160 image"),
    "box outside the image": (lambda r: _rewrite(r, lambda rows: _box(rows, [5000, 5000, 5100, 5100])), 2,
                              Problem.BOX_OFF_IMAGE, "lies mostly outside"),
    "box beside the face": (lambda r: _rewrite(r, lambda rows: _box(rows, [0, 0, 6, 6])), 2,
                            Problem.BOX_MISSES_LANDMARKS, "holds only"),
    "duplicated line": (lambda r: _rewrite(r, lambda rows: rows.append(list(rows[0]))), 17,
                        Problem.DUPLICATE, "same image and landmarks as .*:1"),
    "non-finite landmark": (lambda r: _rewrite(r, lambda rows: rows[1].__setitem__(5, "nan")), 2,
                            Problem.BAD_ANNOTATION, "not all finite"),
    "zero-byte image": (_zero_bytes, 2, Problem.CORRUPT_IMAGE, "cannot read image"),
    "garbage image": (_garbage, 2, Problem.CORRUPT_IMAGE, "cannot read image"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_opening_a_dataset_catches_each_fault(root, fault):
    damage, line, kind, message = FAULTS[fault]
    damage(root)
    path, lines = _lines(root)
    with pytest.raises(DatasetError, match=rf"{path}:{line}: .*{message}") as caught:
        open_dataset(str(root), "wflw", "train")
    assert caught.value.kind is kind
    ds = open_dataset(str(root), "wflw", "train", on_error="skip")
    assert len(ds) == len(lines) - 1 and [(s.line, s.kind) for s in ds.skipped] == [(line, kind)]
    listed = ds.write_skipped(str(root / "skipped.txt"))
    assert open(listed).read().splitlines() == [f"# 1 skipped: 1 {kind.value}",
                                                f"{kind.value}\t{path}:{line}\t{ds.skipped[0].reason}"]


def _pts(path, points):
    body = "\n".join(f"{x + 1:.3f} {y + 1:.3f}" for x, y in points)
    path.write_text(f"version: 1\nn_points:  {len(points)}\n{{\n{body}\n}}\n")


def test_300w_far_point_and_missing_image_are_told_apart(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "ibug"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 48), (90, 120, 150)).save(folder / f"img{i}.jpg")
        _pts(folder / f"img{i}.pts", rng.uniform(8, 40, (68, 2)))
    points = rng.uniform(8, 40, (68, 2))
    points[30, 0] = -3000
    _pts(folder / "img1.pts", points)
    os.remove(folder / "img2.jpg")
    ds = open_dataset(str(tmp_path), "300w", "challenging", on_error="skip")
    assert len(ds) == 1
    assert {s.kind for s in ds.skipped} == {Problem.LANDMARKS_OFF_IMAGE, Problem.MISSING_IMAGE}
    lines = []
    assert check(str(tmp_path), out=lines.append) == 2
    assert "    missing image: 1" in lines and "    landmarks off the image: 1" in lines
    assert not any("bad annotation" in line for line in lines)


def test_coco_image_size_must_match_the_annotation(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "a.jpg")
    keypoints = np.concatenate([np.random.default_rng(2).uniform(5, 25, (68, 2)), np.ones((68, 1))], 1)
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 400, "height": 300}],
            "annotations": [{"image_id": 1, "keypoints": keypoints.ravel().tolist(), "bbox": [4, 4, 22, 22]}]}
    (tmp_path / "annotations" / "faces_train.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="says 400 x 300, the image .*a.jpg is 40 x 30") as caught:
        open_dataset(str(tmp_path), "coco", "train")
    assert caught.value.kind is Problem.SIZE_MISMATCH


def test_data_check_decodes_every_image_and_counts_per_kind(root, capsys):
    assert main(["data", "check", str(root), "--workers", "2"]) == 0
    assert "wflw train: 16 faces (wflw98), 0 problems" in capsys.readouterr().out
    _truncate(_image(root, 3))  # the header still reads: only decoding finds it
    _rewrite(root, lambda rows: rows.append(list(rows[4])))
    assert len(open_dataset(str(root), "wflw", "train", on_error="skip")) == 16
    assert main(["data", "check", str(root), "--workers", "2"]) == 1
    out = capsys.readouterr().out.splitlines()
    path, _ = _lines(root)
    at = out.index("wflw train: 15 faces (wflw98), 2 problems")
    assert out[at + 1:at + 5] == [
        "    duplicate annotation: 1", f"        {path}:17: same image and landmarks as {path}:5",
        "    corrupt image: 1", out[at + 4]]
    assert out[at + 4].startswith(f"        {path}:3: cannot read image {_image(root, 3)}")


def test_data_check_augment_reports_the_out_of_crop_rate(root, capsys):
    assert main(["data", "check", str(root), "--augment", "--face-box", "landmarks", "--padding", "1.25", "3",
                 "--draws", "400"]) == 0
    out = capsys.readouterr().out.splitlines()
    train = out.index("wflw train: 16 faces (wflw98), 0 problems")
    rates = out[train + 1:train + 3]
    assert rates[0].startswith("    crop padding 1.25 (landmarks box), default augmentation: ")
    assert float(rates[0].split(": ")[1].split(" %")[0]) > 5 and " 0.0 % of 400 samples" in rates[1]


def test_default_crop_keeps_landmarks_in_at_least_95_percent_of_samples(synth_root):
    """The measurement behind CROP_PADDING (benchmarks/RESULTS.md, crop padding) on tight landmark boxes."""
    ds = open_dataset(synth_root, "wflw", "train", face_box="landmarks")
    assert out_of_crop_rate(ds, AugmentConfig(), CROP_PADDING, draws=1000)[0] <= 0.05
    assert out_of_crop_rate(ds, AugmentConfig(), 1.25, draws=1000)[0] > 0.1


def _epoch(loader, epoch=0, start=0):
    return [(b.index.clone(), b.images.clone(), b.landmarks.clone()) for b in loader.epoch(epoch, start)]


@pytest.mark.parametrize("backend", ["reference", "dali"])
def test_image_broken_after_opening_is_one_line_or_replaced_deterministically(root, backend, tmp_path):
    ds = open_dataset(str(root), "wflw", "train")
    kw = dict(batch_size=4, train=True, device="cpu", image_size=64, backend=backend, augment=AugmentConfig(),
              seed=3, num_threads=2 if backend == "reference" else 1)
    clean = _epoch(make_loader(ds, **kw))
    bad = 5
    _truncate(ds[bad].image_path)
    with pytest.raises(DatasetError) as caught:
        _epoch(make_loader(ds, **kw))
    message = str(caught.value)
    assert ds[bad].image_path in message and "\n" not in message and caught.value.kind is Problem.CORRUPT_IMAGE

    log = str(tmp_path / "skipped.txt")
    got = _epoch(make_loader(ds, on_error="skip", skip_log=log, **kw))
    for (index, images, points), (clean_index, clean_images, clean_points) in zip(got, clean):
        replaced = clean_index == bad
        assert not (index == bad).any() and (index[replaced] == bad + 1).all()
        assert (index[~replaced] == clean_index[~replaced]).all()
        assert np.allclose(images[~replaced], clean_images[~replaced], atol=1e-5)
    assert sum(int((i == bad).sum()) for i, _, _ in clean) == 1
    lines = open(log).read().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"corrupt image\t{ds[bad].where}\tcannot read image")
    batch = next(b for b, (index, _, _) in enumerate(got) if (index == bad + 1).any())
    resumed = _epoch(make_loader(ds, on_error="skip", **kw), start=batch)  # a fresh loader, as after a restart
    for (index, images, points), (want_index, want_images, want_points) in zip(resumed, got[batch:]):
        assert (index == want_index).all() and (images == want_images).all() and (points == want_points).all()


def _config(root, out_dir, **data):
    return {"data": {"root": str(root), "format": "wflw", "val_fraction": 0.25, "image_size": 64,
                     "loader": "reference", "num_threads": 0, "augment": {}, **data},
            "model": {"arch": "lgrn", "backbone": "resnet18", "backbone_width": 8, "head_width": 16, "num_blocks": 1},
            "loss": {"params": {"omega1": 0.5, "omega2": 5.0, "epsilon": 0.125}},
            "optim": {"name": "adamw", "lr": 2e-3, "base_batch_size": 4, "schedule": "constant"},
            "train": {"out_dir": str(out_dir), "epochs": 1, "batch_size": 4, "eval_every": 1, "eval_batch_size": 8,
                      "log_every": 1, "tensorboard": False}}


def _write_config(tmp_path, raw, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_train_stops_on_a_bad_annotation_or_skips_and_lists_it(root, tmp_path, capsys):
    path = _rewrite(root, lambda rows: (_shift_point(rows, 5000), rows.append(list(rows[3]))))
    config = _write_config(tmp_path, _config(root, tmp_path / "run"))
    assert main(["train", config]) == 1
    err = capsys.readouterr().err
    assert f"{path}:2: 1 landmark(s) more than" in err and "data.on_error=skip" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert main(["train", config, "data.on_error=skip", "train.epochs=1"]) == 0
    listed = (tmp_path / "run" / "skipped.txt").read_text().splitlines()
    assert listed[0] == "# 2 skipped: 1 landmarks off the image, 1 duplicate annotation"
    assert listed[1].startswith(f"landmarks off the image\t{path}:2\t")
    assert listed[2].startswith(f"duplicate annotation\t{path}:17\t")


def test_a_resumed_run_keeps_the_images_its_loaders_found_bad(root, tmp_path):
    from structalign.engine.config import config_from_dict
    from structalign.engine.train import train

    _truncate(_image(root, 3))  # its header still reads: found only when training decodes it
    raw = _config(root, tmp_path / "run", on_error="skip", val_fraction=0.0)
    first = train(config_from_dict(raw))
    listed = (tmp_path / "run" / "skipped.txt").read_text().splitlines()
    assert listed[0] == "# 0 skipped: none" and listed[1].startswith("corrupt image\t")
    train(config_from_dict(raw), resume=first.last_checkpoint)  # nothing left to train: the list must stay
    assert (tmp_path / "run" / "skipped.txt").read_text().splitlines() == listed


def test_crop_padding_and_out_of_crop_reach_the_loss(root, tmp_path):
    from structalign.engine.config import config_from_dict
    from structalign.engine.train import train

    first = {}
    for padding, out_of_crop in ((0.7, "supervise"), (0.7, "ignore"), (CROP_PADDING, "supervise")):
        raw = _config(root, tmp_path / f"{padding}-{out_of_crop}", crop_padding=padding, out_of_crop=out_of_crop)
        raw["train"].update(epochs=1, eval_every=5)
        first[padding, out_of_crop] = train(config_from_dict(raw)).losses[0]
    assert len(set(first.values())) == 3

    ds = open_dataset(str(root), "wflw", "train")
    batch = next(make_loader(ds, 16, False, "cpu", image_size=64, backend="reference", num_threads=0,
                             padding=0.7).epoch(0))
    points = batch.landmarks.numpy()
    np.testing.assert_array_equal(batch.in_crop.numpy(), np.all((points > -0.5) & (points < 63.5), axis=-1))
    assert 0 < batch.in_crop.mean() < 1


def test_cli_reports_project_errors_in_one_line_and_keeps_tracebacks_of_bugs(tmp_path, monkeypatch, capsys):
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in capsys.readouterr().err

    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr("structalign.data.commands.check", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["data", "check", str(tmp_path)])


def test_write_skipped_lists_nothing_as_none(tmp_path):
    path = write_skipped(str(tmp_path / "skipped.txt"), [])
    assert open(path).read() == "# 0 skipped: none\n"


def test_evaluation_crops_as_the_checkpoint_was_trained(root, tmp_path):
    from contextlib import nullcontext

    import torch

    from structalign.engine.checkpoint import model_from_checkpoint
    from structalign.engine.config import config_from_dict
    from structalign.engine.distributed import DistEnv
    from structalign.engine.evaluate import evaluate
    from structalign.engine.report import evaluate_checkpoint
    from structalign.engine.train import train

    raw = _config(root, tmp_path / "run", crop_padding=1.2, face_box="landmarks")
    raw["train"]["eval_every"] = 5
    checkpoint = train(config_from_dict(raw)).last_checkpoint
    got = evaluate_checkpoint(checkpoint, str(root), batch_size=8, device="cpu")["summary"]["nme"]
    model, _ = model_from_checkpoint(checkpoint)
    env = DistEnv(0, 1, 0, torch.device("cpu"), owns_group=False)
    nme = {}
    for padding, face_box in ((1.2, "landmarks"), (CROP_PADDING, "annotation")):
        test = open_dataset(str(root), "wflw", "test", face_box=face_box)
        loader = make_loader(test, 8, False, "cpu", image_size=64, backend="reference", num_threads=0,
                             padding=padding)
        nme[padding] = evaluate(model, loader, test, env, nullcontext).summary()["nme"]
    assert got == pytest.approx(nme[1.2]) and got != pytest.approx(nme[CROP_PADDING])
