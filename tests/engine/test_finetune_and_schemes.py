"""Your own landmarks and your own weights, end to end: a run on a scheme file, fine-tuning a trained 98-point model on
98- and 68-point data (model.init_from), checkpoints that carry their scheme and evaluate without the config or the
scheme file, --resume auto, and scheme mismatches refused before any step."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

from structalign.cli import main
from structalign.data import open_dataset
from structalign.engine.checkpoint import load_checkpoint, model_from_checkpoint
from structalign.engine.config import ConfigError
from structalign.engine.finetune import init_from_checkpoint
from structalign.engine.train import train
from structalign.inference.predictor import Predictor
from structalign.landmarks import WFLW98, resolve_scheme

from engine_helpers import tiny_config


@pytest.fixture(scope="module")
def trained98(synth_root, tmp_path_factory):
    """A 1-epoch 98-point run (its best.pt)."""
    out = tmp_path_factory.mktemp("run98")
    result = train(tiny_config(synth_root, str(out), train={"epochs": 1}))
    return result.best_checkpoint


@pytest.fixture(scope="module")
def list68(synth_root, tmp_path_factory):
    """The built-in faces as a 68-point list dataset (its first 68 landmarks: a stand-in for 300W-style data)."""
    root = tmp_path_factory.mktemp("list68")
    for split in ("train", "test"):
        ds = open_dataset(synth_root, fmt="wflw", split=split)
        faces = [{"image": r.image_path, "box": r.box.tolist(), "landmarks": r.landmarks[:68].tolist()}
                 for r in ds.records]
        (root / f"{split}.json").write_text(json.dumps(faces))
    return str(root)


def test_fine_tuning_on_98_point_data_starts_from_the_trained_model(trained98, synth_root, tmp_path, capsys,
                                                                   monkeypatch):
    import structalign.engine.train as train_module

    started = {}

    def transfer_and_record(model, path):
        transfer = init_from_checkpoint(model, path)
        started.update({k: v.clone() for k, v in model.state_dict().items()})
        return transfer

    monkeypatch.setattr(train_module, "init_from_checkpoint", transfer_and_record)
    cfg = tiny_config(synth_root, str(tmp_path), train={"epochs": 1}, model={"init_from": trained98})
    result = train(cfg)
    out = capsys.readouterr().out
    assert f"init_from {trained98} (ema weights):" in out and "0 re-initialised" in out
    source = load_checkpoint(trained98)["ema"]["module"]
    assert set(started) == set(source)
    for key, value in source.items():
        torch.testing.assert_close(started[key], value, rtol=0, atol=0, msg=key)
    assert not torch.equal(result.model.state_dict()["shape_prior"], source["shape_prior"])  # then it trained


def test_fine_tuning_a_98_point_model_on_68_point_data(trained98, list68, tmp_path, capsys):
    cfg = tiny_config(list68, str(tmp_path), data={"format": "list"}, train={"epochs": 1},
                      model={"init_from": trained98})
    result = train(cfg)
    out = capsys.readouterr().out
    assert "re-initialised (shape differs): shape_prior" in out
    source = load_checkpoint(trained98)["ema"]["module"]
    assert result.model.scheme.num_points == 68
    assert not torch.equal(result.model.state_dict()["backbone.conv1.weight"], source["backbone.conv1.weight"])
    # The checkpoint carries the 68-point scheme's content and nothing of the run's files is needed to evaluate it.
    saved = load_checkpoint(result.best_checkpoint)
    assert resolve_scheme(saved["model_args"]["scheme"]).num_points == 68
    assert isinstance(saved["model_args"]["scheme"], dict) and "backbone_weights" not in saved["model_args"]


def test_a_checkpoint_travels_without_its_config_data_or_scheme_file(synth_root, tmp_path):
    scheme_file = tmp_path / "mine98.yaml"
    scheme_file.write_text(yaml.safe_dump(dict(WFLW98.to_dict(), name="mine98")))
    run = tmp_path / "run"
    result = train(tiny_config(synth_root, str(run), train={"epochs": 1}, data={"scheme": str(scheme_file)}))
    moved = tmp_path / "elsewhere" / "best.pt"
    moved.parent.mkdir()
    shutil.copy(result.best_checkpoint, moved)
    shutil.rmtree(run)
    os.remove(scheme_file)
    model, state = model_from_checkpoint(str(moved))
    assert model.scheme.name == "mine98" and model(torch.rand(1, 3, 64, 64))[0].shape == (1, 98, 2)
    assert main(["eval", str(moved), "--data", synth_root, "--norm", "inter_pupil"]) == 0
    face = open_dataset(synth_root, fmt="wflw", split="test")[0]
    found = Predictor(str(moved), device="cpu", detector=None, flip_test=True).predict(face.image_path, [face.box])
    assert found[0].faces[0].landmarks.shape == (98, 2)  # the flip test needs the scheme's flip table
    assert main(["export", str(moved), str(tmp_path / "mine98.onnx")]) == 0


def test_resume_auto_continues_or_starts(synth_root, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    cfg = tiny_config(synth_root, str(tmp_path / "run"), train={"epochs": 1})
    config.write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))
    assert main(["train", str(config), "--resume", "auto"]) == 0
    assert "starting the run" in capsys.readouterr().out
    assert main(["train", str(config), "train.epochs=2", "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert f"continuing from {tmp_path / 'run' / 'last.pt'}" in out


def test_scheme_mismatches_are_refused_before_any_step(trained98, synth_root, list68, tmp_path, capsys):
    run = os.path.dirname(trained98)
    cfg = tiny_config(list68, run, data={"format": "list"}, train={"epochs": 2})
    with pytest.raises(ConfigError, match=r"landmark scheme wflw98 \(98 points\) differs from the data's 300w68 "
                                          r"\(68 points\); fine-tune with model.init_from"):
        train(cfg, resume=trained98)
    assert main(["eval", trained98, "--data", list68, "--format", "list"]) == 1
    assert "68 landmarks; the scheme wflw98 has 98" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="model.init_from: checkpoint .* does not exist"):
        train(tiny_config(synth_root, str(tmp_path), model={"init_from": str(tmp_path / "nope.pt")}))


def test_eval_reports_the_subsets_a_list_dataset_tags(trained98, synth_root, tmp_path):
    ds = open_dataset(synth_root, fmt="wflw", split="test")
    faces = [{"image": r.image_path, "box": r.box.tolist(), "landmarks": r.landmarks.tolist(),
              "tags": ["left"] if i % 2 else ["right", "dark"]} for i, r in enumerate(ds.records)]
    (tmp_path / "test.json").write_text(json.dumps(faces))
    assert main(["eval", trained98, "--data", str(tmp_path), "--format", "list", "--out", str(tmp_path / "r")]) == 0
    subsets = json.loads((tmp_path / "r" / "metrics.json").read_text())["subsets"]
    assert set(subsets) == {"full", "dark", "left", "right"}
    assert subsets["left"]["count"] == len(ds) // 2 and np.isfinite(subsets["dark"]["nme"])
