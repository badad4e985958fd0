"""Local backbone weights: our layout, torchvision's layout (keys renamed), and the errors for files that do not fit.

    .venv/bin/python -m pytest -q tests/models/test_backbone_weights.py
"""
import re

import pytest
import torch

from structalign.models import ResNet, build_model, from_torchvision_keys, load_backbone_weights

TO_TORCHVISION = ((r"^stem\.conv\.", "conv1."), (r"^stem\.bn\.", "bn1."), (r"^stage(\d)\.", r"layer\1."),
                  (r"\.shortcut\.conv\.", ".downsample.0."), (r"\.shortcut\.bn\.", ".downsample.1."))


def torchvision_state_dict(net: ResNet) -> dict:
    """Our ResNet's weights under torchvision's key names, with a classifier as torchvision files have."""
    out = {}
    for key, value in net.state_dict().items():
        for pattern, repl in TO_TORCHVISION:
            key = re.sub(pattern, repl, key)
        out[key] = value.clone()
    out["fc.weight"], out["fc.bias"] = torch.randn(1000, net.channels[-1]), torch.randn(1000)
    return out


def randomised(net: ResNet) -> ResNet:
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return net


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_layout_file_loads_into_build_model(tmp_path, arch):
    source = randomised(ResNet(arch, width=8))
    tv = torchvision_state_dict(source)
    assert "layer1.0.conv1.weight" in tv and ("layer2.0.downsample.0.weight" in tv)
    path = tmp_path / f"{arch}_torchvision.pth"
    torch.save(tv, path)
    model = build_model(backbone=arch, backbone_width=8, image_size=64, head_width=8, num_blocks=0,
                        backbone_weights=str(path), op_backend="reference")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value, msg=key)


def test_own_layout_with_ddp_prefix_and_mapping():
    source = randomised(ResNet("resnet18", width=8))
    target = ResNet("resnet18", width=8)
    load_backbone_weights(target, {f"module.{k}": v for k, v in source.state_dict().items()})
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)
    assert set(from_torchvision_keys(torchvision_state_dict(source))) == set(source.state_dict())


def test_weights_of_another_depth_or_width_are_refused():
    with pytest.raises(ValueError, match="missing keys"):
        load_backbone_weights(ResNet("resnet34", width=8), torchvision_state_dict(ResNet("resnet18", width=8)))
    with pytest.raises(ValueError, match=r"backbone_weights\['stem.conv.weight'\] has shape"):
        load_backbone_weights(ResNet("resnet18", width=8), ResNet("resnet18", width=16).state_dict())


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model(backbone_weights=str(tmp_path / "nope.pth"))
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch state_dict"):
        load_backbone_weights(ResNet("resnet18", width=8), str(bad))
    with pytest.raises(ValueError, match="mapping of parameter names"):
        load_backbone_weights(ResNet("resnet18", width=8), {"stem.conv.weight": [1, 2]})


@pytest.mark.parametrize("wrapped", [False, True])
def test_backbone_taken_from_a_whole_model_state_dict(tmp_path, wrapped):
    source = build_model(backbone="resnet18", backbone_width=8, image_size=64, head_width=8, num_blocks=0,
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
