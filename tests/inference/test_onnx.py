"""ONNX export as one self-contained file, and OnnxPredictor: same faces, landmarks (< 0.05 px) and P(visible)
(< 1e-4) as the torch Predictor, the outputs "landmarks" and "visibility" (only "landmarks" for a model without a
visibility head), metadata checks, no torch import on the ONNX path, and the sessions' thread wait policy."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from structalign.cli import main
from structalign.engine.checkpoint import model_from_checkpoint
from structalign.errors import InputError
from structalign.inference.detector import YuNetFaceDetector
from structalign.inference.onnx_predictor import OnnxPredictor
from structalign.inference.pipeline import FlipTestError
from structalign.inference.predictor import Predictor
from structalign.inference.runtime import SPIN_MICROSECONDS
from structalign.landmarks import WFLW98

ort = pytest.importorskip("onnxruntime")


def test_export_writes_one_self_contained_file_that_loads_alone(checkpoint, tmp_path, capfd, caplog):
    path = tmp_path / "model.onnx"
    assert main(["export", checkpoint, str(path)]) == 0
    out, err = capfd.readouterr()
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]  # no model.onnx.data beside it
    assert f"wrote {path}" in out and "one self-contained file" in out
    messages = out + err + "".join(r.getMessage() for r in caplog.records)
    assert "Evaluation failed" not in messages and "torchvision" not in messages
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    shutil.copy(path, alone / "copy.onnx")
    session = ort.InferenceSession(str(alone / "copy.onnx"), providers=["CPUExecutionProvider"])
    model, _ = model_from_checkpoint(checkpoint, op_backend="reference")
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected, logits = model(images)
    assert [o.name for o in session.get_outputs()] == ["landmarks", "visibility"]
    got, visibility = session.run(None, {"images": images.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-3, rtol=1e-4)
    assert visibility.shape == (3, 98) and visibility.dtype == np.float32
    np.testing.assert_allclose(visibility, torch.sigmoid(logits).numpy(), atol=1e-5)  # P(visible): sigmoid in-graph


def test_export_with_normalisation_in_the_graph(onnx_models, checkpoint):
    graph = onnx.load(onnx_models["crops"])
    (graph_input,) = graph.graph.input
    assert graph_input.name == "crops" and graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    meta = {p.key: json.loads(p.value) for p in graph.metadata_props}
    assert meta["structalign.input"] == "crops" and meta["structalign.scheme"] == WFLW98.to_dict()
    assert meta["structalign.image_size"] == 64 and meta["structalign.crop_padding"] == 1.5
    crops = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    session = ort.InferenceSession(onnx_models["crops"], providers=["CPUExecutionProvider"])
    got, visibility = session.run(None, {"crops": crops})
    expected, expected_visibility = Predictor(checkpoint, device="cpu")._forward(crops)
    np.testing.assert_allclose(got, expected, atol=1e-3)
    np.testing.assert_allclose(visibility, expected_visibility, atol=1e-5)


@pytest.mark.parametrize("kind", ["crops", "normalised"])
@pytest.mark.parametrize("flip_test", [False, True])
def test_onnx_predictor_agrees_with_the_torch_predictor(onnx_models, checkpoint, astronaut, kind, flip_test):
    two = np.concatenate([astronaut, astronaut[:, ::-1]], axis=1)
    expected = Predictor(checkpoint, device="cpu", flip_test=flip_test).predict([astronaut, two])
    got = OnnxPredictor(onnx_models[kind], flip_test=flip_test, batch_size=2).predict([astronaut, two])
    assert [len(r.faces) for r in got] == [len(r.faces) for r in expected] == [1, 2]
    for a, b in zip(got, expected):
        for face_a, face_b in zip(a.faces, b.faces):
            np.testing.assert_array_equal(face_a.box, face_b.box)
            assert face_a.score == face_b.score
            assert np.abs(face_a.landmarks - face_b.landmarks).max() < 0.05
            assert face_a.visibility.shape == (98,) and face_a.visibility.dtype == np.float32
            assert np.abs(face_a.visibility - face_b.visibility).max() < 1e-4


def test_onnx_predictor_does_not_import_torch(onnx_models, astronaut, tmp_path):
    image = tmp_path / "astronaut.png"
    from PIL import Image

    Image.fromarray(astronaut).save(image)
    code = (
        "import sys, numpy as np\n"
        "from structalign.inference.onnx_predictor import OnnxPredictor\n"
        f"faces = OnnxPredictor({onnx_models['crops']!r}, flip_test=True).predict({str(image)!r})[0].faces\n"
        "assert len(faces) == 1 and faces[0].landmarks.shape == (98, 2) and faces[0].visibility.shape == (98,)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_detector_and_model_sessions_sleep_instead_of_spinning(onnx_models):
    """Both ONNX Runtime sessions of a predictor (the YuNet detector's and the landmark model's) run the threads asked
    for, whose idle workers spin at most SPIN_MICROSECONDS and not between runs (structalign/inference/runtime.py)."""
    predictor = OnnxPredictor(onnx_models["crops"], threads=2, detector=YuNetFaceDetector(threads=2))
    for session in (predictor.session, predictor.detector.session):
        options = session.get_session_options()
        assert options.intra_op_num_threads == 2
        assert options.get_session_config_entry("session.intra_op.spin_duration_us") == str(SPIN_MICROSECONDS)
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"


def test_onnx_predictor_refuses_foreign_graphs_and_flip_test_without_a_scheme(onnx_models, tmp_path):
    graph = onnx.load(onnx_models["crops"])
    for prop in graph.metadata_props:
        if prop.key == "structalign.scheme":
            prop.value = json.dumps("custom98")
    unknown = tmp_path / "unknown_scheme.onnx"
    onnx.save(graph, unknown)
    OnnxPredictor(str(unknown))  # fine without the flip test
    with pytest.raises(FlipTestError, match="carries no readable scheme"):
        OnnxPredictor(str(unknown), flip_test=True)
    del graph.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(graph, foreign)
    with pytest.raises(InputError, match="was not written by `structalign export`"):
        OnnxPredictor(str(foreign))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    with pytest.raises(InputError, match="cannot be loaded"):
        OnnxPredictor(str(broken))


def test_predict_command_runs_an_onnx_model_and_checks_flip_test(onnx_models, astronaut, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    graph = onnx.load(onnx_models["normalised"])
    for prop in graph.metadata_props:
        if prop.key == "structalign.scheme":
            prop.value = json.dumps("custom98")
    onnx.save(graph, tmp_path / "unknown.onnx")
    out = tmp_path / "out"
    assert main(["predict", onnx_models["normalised"], str(tmp_path / "astronaut.png"), "--out", str(out)]) == 0
    assert len(json.loads((out / "landmarks.json").read_text())["images"][0]["faces"]) == 1
    assert main(["predict", str(tmp_path / "unknown.onnx"), str(tmp_path / "astronaut.png"), "--flip-test"]) == 1
    err = capsys.readouterr().err
    assert "--flip-test needs the landmark scheme's flip permutation" in err and "Traceback" not in err
