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


def test_eval_reports_occluded_and_visible_points_and_the_visibility_auroc(checkpoint, tmp_path, capsys):
    """On data with per-point labels (the built-in faces, every one with occluders) eval adds the occlusion table."""
    from structalign.data.synth import render_dataset

    data = str(tmp_path / "occluded")
    render_dataset(data, 0, 6, seed=3, width=128, height=128, workers=1, occlusion=1.0)
    assert main(["eval", checkpoint, "--data", data, "--out", str(tmp_path / "eval")]) == 0
    assert "occluded points NME" in capsys.readouterr().out
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())["summary"]
    labels = np.stack([r.visibility for r in open_dataset(data, fmt="wflw", split="test").records])
    assert summary["nme_occluded"] > 0 and summary["nme_visible"] > 0 and 0 <= summary["visibility_auroc"] <= 1
    assert summary["heavy_occlusion"]["count"] == int(((labels == 0).sum(1) >= 0.2 * (labels >= 0).sum(1)).sum())
    assert "visibility AUROC" in (tmp_path / "eval" / "report.md").read_text()


def test_predictor_matches_evaluation(checkpoint, synth_root):
    test = open_dataset(synth_root, fmt="wflw", split="test")
    model, _ = model_from_checkpoint(checkpoint)
    env = DistEnv(0, 1, 0, torch.device("cpu"), owns_group=False)
    loader = make_loader(test, 4, train=False, device="cpu", image_size=64, backend="reference", num_threads=0)
    expected = evaluate(model, loader, test, env, nullcontext).predictions
    predictor = structalign.Predictor(checkpoint, device="cpu", batch_size=3)
    results = predictor.predict([r.image_path for r in test.records], boxes=[r.box for r in test.records])
    points = np.stack([r.faces[0].landmarks for r in results])
    assert points.shape == (8, 98, 2) and all(len(r.faces) == 1 for r in results)
    np.testing.assert_allclose(points, expected, atol=1e-3)
    with pytest.raises(ValueError, match=r"box \[10.0, 10.0, 5.0, 20.0\]: expected x0, y0, x1, y1"):
        predictor.predict([test[0].image_path], boxes=[[10, 10, 5, 20]])
    with pytest.raises(ValueError, match=r"test_cli.py: cannot read image"):
        predictor.predict([__file__])


def test_predict_command_writes_landmarks_and_overlays(checkpoint, synth_root, tmp_path):
    test = open_dataset(synth_root, fmt="wflw", split="test")
    images = [test[0].image_path, test[1].image_path]
    boxes = tmp_path / "boxes.txt"
    boxes.write_text("".join(" ".join(f"{v:.1f}" for v in test[i].box) + "\n" for i in range(2)))
    out = tmp_path / "pred"
    assert main(["predict", checkpoint, *images, "--boxes", str(boxes), "--out", str(out)]) == 0
    written = json.loads((out / "landmarks.json").read_text())
    assert written["scheme"] == "wflw98" and [i["source"] for i in written["images"]] == images
    faces = [i["faces"] for i in written["images"]]
    assert [len(f) for f in faces] == [1, 1] and np.asarray(faces[1][0]["landmarks"]).shape == (98, 2)
    np.testing.assert_allclose(faces[0][0]["box"], test[0].box, atol=0.05)
    assert faces[0][0]["score"] is None  # a given box has no detector score
    assert len((out / "landmarks.csv").read_text().splitlines()) == 1 + 2
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:04d}_{os.path.splitext(os.path.basename(p))[0]}.png"
                                                         for i, p in enumerate(images)]
    assert main(["predict", checkpoint, images[0], "--out", str(out), "--detector", "none"]) == 0  # whole image


def test_export_matches_pytorch_in_onnxruntime(checkpoint, tmp_path, caplog):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    assert main(["export", checkpoint, str(path)]) == 0
    assert os.listdir(tmp_path) == ["model.onnx"]  # weights inline: the file is the whole model
    assert not [r for r in caplog.records if "Evaluation failed" in r.getMessage()]  # no spurious export messages
    model, _ = model_from_checkpoint(checkpoint, op_backend="reference")
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)[0].numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["landmarks"], {"images": images.numpy()})  # "visibility" is tests/inference/test_onnx.py's
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(synth_root, tmp_path, capsys):
    assert main(["train", "demo", f"data.root={synth_root}", f"train.out_dir={tmp_path}", "train.device=cuda"]) == 1
    err = capsys.readouterr().err
    assert "train.device=cuda but no CUDA device is available" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "config.yaml")


@pytest.mark.parametrize("override, message", [
    ("data.image_size=100", "model: image_size must be a multiple of 32"),
    ("model.backbone_weights=/nonexistent/r18.pt", "model: backbone_weights file '/nonexistent/r18.pt' does not exist"),
])
def test_model_mistakes_are_one_line_and_write_nothing(synth_root, tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert main(["train", "demo", f"data.root={synth_root}", f"train.out_dir={out}", "train.batch_size=8",
                 override]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_out_dir_that_is_a_file_is_one_line(synth_root, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert main(["train", "demo", f"data.root={synth_root}", f"train.out_dir={taken}"]) == 1
    err = capsys.readouterr().err
    assert f"train.out_dir: '{taken}' exists and is not a directory" in err and "Traceback" not in err


def test_malformed_boxes_file_names_the_line(checkpoint, synth_root, tmp_path, capsys):
    image = open_dataset(synth_root, fmt="wflw", split="test")[0].image_path
    boxes = tmp_path / "boxes.txt"
    boxes.write_text("1 2 three 4\n")
    assert main(["predict", checkpoint, image, "--boxes", str(boxes), "--out", str(tmp_path)]) == 1
    assert f"{boxes}, line 1: expected `x0 y0 x1 y1`" in capsys.readouterr().err
