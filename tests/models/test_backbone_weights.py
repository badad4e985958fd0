"""Local backbone weights: torchvision's own ResNet layout and forward features (fixtures written by torchvision
itself), structalign whole-model and old-layout checkpoints, and the errors for files that do not fit.

    .venv/bin/python -m pytest -q tests/models/test_backbone_weights.py
"""
import json
import os
import zlib

import pytest
import torch

from structalign.engine.checkpoint import model_from_checkpoint
from structalign.engine.finetune import init_from_checkpoint
from structalign.models import ResNet, load_backbone_weights

from model_helpers import make_model

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ARCHS = ("resnet18", "resnet50")


def filled(key: str, shape, dtype=torch.float32) -> torch.Tensor:
    """A state-dict entry of a torchvision ResNet with seeded values (from the key) that keep activations O(1)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if not dtype.is_floating_point:  # num_batches_tracked
        return torch.zeros(shape, dtype=dtype)
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    if key.endswith("weight") and len(shape) == 4:  # conv: He-scaled
        return torch.randn(shape, generator=g) * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
    if key.endswith("weight") and len(shape) == 1:  # BN scale
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return 0.1 * torch.randn(shape, generator=g)


def probe_image() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def projection(numel: int) -> torch.Tensor:
    """A fixed random [64, numel] matrix reducing a feature map to 64 numbers."""
    return torch.randn(64, numel, generator=torch.Generator().manual_seed(1)) / numel ** 0.5


def torchvision_reference(arch: str) -> tuple[dict, list]:
    """A torchvision `arch` state_dict (its exact keys and shapes, fc included) with filled() values, and
    torchvision's own layer1..4 outputs for probe_image() under it (projected)."""
    with open(os.path.join(FIXTURES, "torchvision_resnet.json")) as f:
        ref = json.load(f)[arch]
    state = {k: filled(k, shape, torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
             for k, shape in ref["state_dict"]}
    return state, ref["features"]


def randomised(net: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for key, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(filled(key, t.shape))
    return net


@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_state_dict_loads_as_is_and_computes_torchvision_features(tmp_path, arch):
    state, features = torchvision_reference(arch)
    assert "fc.weight" in state and "layer2.0.downsample.0.weight" in state
    path = tmp_path / f"{arch}_torchvision.pth"
    torch.save(state, path)
    model = make_model(backbone=arch, image_size=64, head_width=8, num_blocks=0, backbone_weights=str(path),
                        op_backend="reference").eval()
    with torch.no_grad():
        out = model.backbone(probe_image())
    for k, expected in enumerate(map(torch.tensor, features)):
        got = projection(out[f"out{k + 1}"].numel()) @ out[f"out{k + 1}"].flatten()
        # float32 sums in another order (threads, conv algorithm): ~1e-6 of the map's scale
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5 * expected.abs().max().item(),
                                   msg=lambda m, k=k: f"out{k + 1}: {m}")


@pytest.mark.parametrize("arch", ARCHS)
def test_stem_stage_layout_checkpoint_loads_under_torchvision_names(tmp_path, arch):
    """A structalign checkpoint with the stem / stage backbone names (backbone.stem.conv, stage1, shortcut) loads for
    predict/export (model_from_checkpoint) and fine-tuning (init_from); --resume reads it the same way."""
    with open(os.path.join(FIXTURES, "old_backbone_keys.json")) as f:
        old_backbone = json.load(f)[arch]
    args = dict(arch="lgrn", backbone=arch, scheme="wflw98", image_size=64, head_width=8, num_blocks=0,
                backbone_width=8)
    # Such checkpoints have no visibility head either (their model_args lack visibility_head).
    rest = {k: v for k, v in make_model(**args, op_backend="reference", visibility_head=False).state_dict().items()
            if not k.startswith("backbone.")}
    old = {k: filled(k, shape, torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
           for k, shape in old_backbone}
    path = tmp_path / "old.pt"
    torch.save({"model": {**old, **rest}, "ema": {"module": {**old, **rest}, "decay": 0.9, "updates": 1},
                "model_args": args, "config": {}}, path)
    for weights in ("ema", "model"):
        model, _ = model_from_checkpoint(str(path), weights=weights)
        new = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
        assert len(new) == len(old)
        for (old_key, value), (new_key, loaded) in zip(old.items(), new.items()):  # both in module order
            torch.testing.assert_close(loaded, value, msg=f"{old_key} -> {new_key}")
    transfer = init_from_checkpoint(make_model(**args, op_backend="reference"), str(path))  # model.init_from
    assert not [key for key, _ in transfer.skipped if key.startswith("backbone.")]


def test_own_layout_with_ddp_and_compile_prefixes():
    source = randomised(ResNet("resnet18", width=8))
    for prefix in ("module.", "_orig_mod."):
        target = ResNet("resnet18", width=8)
        load_backbone_weights(target, {f"{prefix}{k}": v for k, v in source.state_dict().items()})
        for key, value in source.state_dict().items():
            torch.testing.assert_close(target.state_dict()[key], value)


def test_weights_of_another_depth_or_width_are_refused():
    with pytest.raises(ValueError, match="missing keys"):
        load_backbone_weights(ResNet("resnet34", width=8), ResNet("resnet18", width=8).state_dict())
    with pytest.raises(ValueError, match=r"backbone_weights\['conv1.weight'\] has shape"):
        load_backbone_weights(ResNet("resnet18", width=8), ResNet("resnet18", width=16).state_dict())


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_model(backbone_weights=str(tmp_path / "nope.pth"))
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch state_dict"):
        load_backbone_weights(ResNet("resnet18", width=8), str(bad))
    with pytest.raises(ValueError, match="mapping of parameter names"):
        load_backbone_weights(ResNet("resnet18", width=8), {"conv1.weight": [1, 2]})


@pytest.mark.parametrize("wrapped", [False, True])
def test_backbone_taken_from_a_whole_model_state_dict(tmp_path, wrapped):
    source = make_model(backbone="resnet18", backbone_width=8, image_size=64, head_width=8, num_blocks=0,
                         op_backend="reference")
    randomised(source.backbone)
    target = ResNet("resnet18", width=8)
    if wrapped:  # a training checkpoint: weights under "model" next to other entries
        path = tmp_path / "last.pt"
        torch.save({"model": source.state_dict(), "step": 3}, path)
        load_backbone_weights(target, path)
    else:
        load_backbone_weights(target, source.state_dict())
    for key, value in source.backbone.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)
