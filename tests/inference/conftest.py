"""Shared fixtures of the inference tests: small untrained checkpoints (their shape prior set to a real face layout,
so that points are distinct and the flip test is not trivially symmetric), a real photograph (scikit-image's
`astronaut`, one face), and the checkpoint exported to ONNX. No trained real-face weights exist here: these tests
check the machinery (detection, crops, mapping back, outputs), not accuracy."""
import numpy as np
import pytest
import torch

# Visibility logits' bias per point: -3 to 3 in a shuffled order, so a point and its mirror partner (flip
# permutation) differ and a flip test that forgot to re-index P(visible) is caught.
VISIBILITY_BIAS = torch.linspace(-3.0, 3.0, 98)[torch.randperm(98, generator=torch.Generator().manual_seed(0))]


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(visibility) -> path of a small untrained WFLW-98 checkpoint, saved with the keys
    model_from_checkpoint reads, as training writes them. visibility: "varied" (the visibility head's logits depend on
    the image and on the point: random output weights, VISIBILITY_BIAS), "fixed" (zero output weights: the logits are
    VISIBILITY_BIAS whatever the image) or None (no visibility head, and model_args without the key, as in a
    checkpoint from before the head). The landmark weights are the same in all three."""
    from structalign.data.synth import TEMPLATE
    from structalign.landmarks import WFLW98
    from model_helpers import make_model

    def make(visibility="varied") -> str:
        size = 64
        args = {"arch": "lgrn", "backbone": "resnet18", "scheme": WFLW98.to_dict(), "image_size": size,
                "head_width": 16, "num_blocks": 1, "backbone_width": 8}
        if visibility is not None:
            args["visibility_head"] = True
        torch.manual_seed(0)
        # The built-in face template (half face width 1) laid over the crop as the dataset crops lay faces over it.
        mean_shape = (size - 1) / 2 + TEMPLATE[:, :2] * size / 3.2
        model = make_model(**{**args, "visibility_head": visibility is not None}, mean_shape=mean_shape)
        if visibility is not None:
            with torch.no_grad():
                model.visibility.output.bias.copy_(VISIBILITY_BIAS)
                if visibility == "varied":
                    model.visibility.output.weight.normal_(0.0, 0.5)
        path = str(tmp_path_factory.mktemp("ckpt") / f"small_{visibility}.pt")
        torch.save({"model": model.state_dict(), "ema": None, "model_args": args,
                    "config": {"data": {"image_size": size, "crop_padding": 1.5}, "train": {"precision": "fp32"}}},
                   path)
        return path

    return make


@pytest.fixture(scope="session")
def checkpoint(make_checkpoint):
    return make_checkpoint("varied")


@pytest.fixture(scope="session")
def checkpoint_without_visibility(make_checkpoint):
    return make_checkpoint(None)


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
