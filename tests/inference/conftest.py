"""Shared fixtures of the inference tests: a small untrained checkpoint (its shape prior set to a real face layout,
so that points are distinct and the flip test is not trivially symmetric), a real photograph (scikit-image's
`astronaut`, one face), and the checkpoint exported to ONNX. No trained real-face weights exist here: these tests
check the machinery (detection, crops, mapping back, outputs), not accuracy."""
import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    from structalign.data.synth import TEMPLATE
    from structalign.landmarks import WFLW98
    from structalign.models import build_model

    size = 64
    args = {"arch": "lgrn", "backbone": "resnet18", "scheme": WFLW98.to_dict(), "image_size": size, "head_width": 16,
            "num_blocks": 1, "backbone_width": 8}
    torch.manual_seed(0)
    # The built-in face template (half face width 1) laid over the crop as the dataset crops lay faces over it.
    mean_shape = (size - 1) / 2 + TEMPLATE[:, :2] * size / 3.2
    model = build_model(**args, mean_shape=mean_shape)
    path = str(tmp_path_factory.mktemp("ckpt") / "small.pt")
    # The keys model_from_checkpoint reads, as training writes them (the scheme's content in model_args).
    torch.save({"model": model.state_dict(), "ema": None, "model_args": args,
                "config": {"data": {"image_size": size, "crop_padding": 1.5}, "train": {"precision": "fp32"}}}, path)
    return path


@pytest.fixture(scope="session")
def astronaut():
    data = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(data.astronaut())


@pytest.fixture(scope="session")
def onnx_models(checkpoint, tmp_path_factory):
    """{"crops": path, "normalised": path}: the checkpoint exported with each graph input."""
    from structalign.export import export_onnx

    folder = tmp_path_factory.mktemp("onnx")
    return {kind: export_onnx(checkpoint, str(folder / f"{kind}.onnx"), input_kind=kind)[0]
            for kind in ("crops", "normalised")}
