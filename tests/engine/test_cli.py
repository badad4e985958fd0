"""The `structalign` command end to end on a tiny run: train, eval, predict (and structalign.Predictor), export
(checked with ONNX Runtime against PyTorch), demo, and one-line errors for bad input."""
import json
import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import yaml

import structalign
from structalign.cli import main
from structalign.data import make_loader, open_dataset
from structalign.engine.distributed import DistEnv
from structalign.engine.evaluate import evaluate
from structalign.engine.checkpoint import model_from_checkpoint

from engine_helpers import tiny_raw_config


@pytest.fixture(scope="module")
def checkpoint(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    raw = tiny_raw_config(synth_root, str(out))
    raw["train"]["epochs"] = 1
    path = out / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "train.log_every=2"]) == 0
    return str(out / "best.pt")


def test_eval_writes_metrics_report_ced_and_csv(checkpoint, synth_root, tmp_path, capsys):
    assert main(["eval", checkpoint, "--data", synth_root, "--out", str(tmp_path)]) == 0
    assert "NME" in capsys.readouterr().out
    for name in ("metrics.json", "report.md", "per_image.csv", "ced.png"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "metrics.json").read_text())["summary"]
    assert summary["images"] == 8 and 0 < summary["nme"] < 100
    assert len((tmp_path / "per_image.csv").read_text().splitlines()) == 1 + 8
    assert list(tmp_path.glob("overlay_*.png"))


def test_predictor_matches_evaluation(checkpoint, synth_root):
    test = open_dataset(synth_root, fmt="wflw", split="test")
    model, _ = model_from_checkpoint(checkpoint)
    env = DistEnv(0, 1, 0, torch.device("cpu"), owns_group=False)
    loader = make_loader(test, 4, train=False, device="cpu", image_size=64, backend="reference", num_threads=0)
    expected = evaluate(model, loader, test, env, nullcontext).predictions
    predictor = structalign.Predictor(checkpoint, device="cpu", batch_size=3)
    points = predictor.predict([r.image_path for r in test.records], boxes=[r.box for r in test.records])
    assert points.shape == (8, 98, 2)
    np.testing.assert_allclose(points, expected, atol=1e-3)
    with pytest.raises(ValueError, match=r"boxes\[0\]: expected x0, y0, x1, y1"):
        predictor.predict([test[0].image_path], boxes=[[10, 10, 5, 20]])
    with pytest.raises(ValueError, match=r"images\[0\]: cannot read"):
        predictor.predict([synth_root])


def test_predict_command_writes_landmarks_and_overlays(checkpoint, synth_root, tmp_path):
    test = open_dataset(synth_root, fmt="wflw", split="test")
    images = [test[0].image_path, test[1].image_path]
    boxes = tmp_path / "boxes.txt"
    boxes.write_text("".join(" ".join(f"{v:.1f}" for v in test[i].box) + "\n" for i in range(2)))
    out = tmp_path / "pred"
    assert main(["predict", checkpoint, *images, "--boxes", str(boxes), "--out", str(out)]) == 0
    faces = json.loads((out / "landmarks.json").read_text())["faces"]
    assert len(faces) == 2 and np.asarray(faces[1]["landmarks"]).shape == (98, 2)
    assert all(os.path.isfile(f["overlay"]) for f in faces)
    assert main(["predict", checkpoint, images[0], "--out", str(out)]) == 0  # whole image as the face box


def test_export_matches_pytorch_in_onnxruntime(checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    assert main(["export", checkpoint, str(path)]) == 0
    model, _ = model_from_checkpoint(checkpoint, op_backend="reference")
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(images).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": images.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-4)


def test_demo_end_to_end_on_a_tiny_budget(synth_root, tmp_path, capsys):
    raw = tiny_raw_config(synth_root, str(tmp_path))
    overrides = [f"{section}.{key}={json.dumps(value)}" for section in ("model", "loss", "train")
                 for key, value in raw[section].items() if key != "out_dir"]
    overrides += ["train.epochs=1", "data.num_threads=0", "data.image_size=64", "data.val_fraction=0.25"]
    data = tmp_path / "data"
    assert main(["demo", *overrides, "--data", str(data), "--out", str(tmp_path / "demo"), "--train-images", "24",
                 "--test-images", "6"]) == 0
    assert "held-out test NME" in capsys.readouterr().out
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["test"]["images"] == 6 and os.path.isfile(report["ced"]) and report["overlays"]
    assert (tmp_path / "demo" / "report.md").is_file()


@pytest.mark.parametrize("argv, message", [
    (["train", "demo", "train.epoch=1"], "unknown key train.epoch"),
    (["train", "demo", "data.root=/nonexistent/x"], "data.root: '/nonexistent/x' is not a directory"),
    (["eval", "/nonexistent.pt", "--data", "."], "does not exist"),
    (["export", "/nonexistent.pt", "x.onnx"], "does not exist"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_malformed_boxes_file_names_the_line(checkpoint, synth_root, tmp_path, capsys):
    image = open_dataset(synth_root, fmt="wflw", split="test")[0].image_path
    boxes = tmp_path / "boxes.txt"
    boxes.write_text("1 2 three 4\n")
    assert main(["predict", checkpoint, image, "--boxes", str(boxes), "--out", str(tmp_path)]) == 1
    assert f"{boxes}, line 1: expected `x0 y0 x1 y1`" in capsys.readouterr().err
