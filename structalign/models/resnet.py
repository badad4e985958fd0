"""ResNet-18/34/50 backbones (He et al. 2016) returning the stride-4/8/16/32 maps, and loading of local weights.

Module and state_dict key names are torchvision's (conv1, bn1, layer1..layer4, downsample.0/.1; no classifier), so a
torchvision ResNet state_dict loads as is (its fc.* entries are dropped). Nothing is downloaded.
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from structalign.errors import InputError, MissingFileError

# name -> (block kind, blocks per stage)
ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


def _downsample(cin: int, cout: int, stride: int, bn_momentum: float) -> nn.Sequential:
    """1x1 strided conv + BN projection on the identity path where shape changes (torchvision's `downsample`)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, momentum=bn_momentum))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, bn_momentum: float):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.downsample = _downsample(cin, cout, stride, bn_momentum) if stride != 1 or cin != cout else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, bn_momentum: float):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, momentum=bn_momentum)
        # Stride on the 3x3 conv (torchvision's "ResNet v1.5"), so torchvision weights mean the same thing here.
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width, momentum=bn_momentum)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride, bn_momentum) if stride != 1 or cin != cout else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """ResNet trunk without the classifier, in torchvision's layout.

    forward(x (Tensor[B, 3, H, W])) -> {"out1".."out4"}: maps at strides 4, 8, 16, 32 with `channels[k]` channels.
    width: channels of layer1 (64 for the standard nets; smaller for tests and tiny demos).
    """

    def __init__(self, arch: str = "resnet34", width: int = 64, bn_momentum: float = 0.1):
        super().__init__()
        if arch not in ARCHS:
            raise InputError(f"backbone must be one of {sorted(ARCHS)}, got {arch!r}")
        if not isinstance(width, int) or width < 1:
            raise InputError(f"backbone width must be a positive int, got {width!r}")
        kind, depths = ARCHS[arch]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.arch, self.width = arch, width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, channels = width, []
        for k, depth in enumerate(depths):
            stage_width = width * 2 ** k
            blocks = []
            for b in range(depth):
                blocks.append(block(cin, stage_width, 2 if (b == 0 and k > 0) else 1, bn_momentum))
                cin = stage_width * block.expansion
            setattr(self, f"layer{k + 1}", nn.Sequential(*blocks))
            channels.append(cin)
        self.channels = tuple(channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> dict:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out1 = self.layer1(x)
        out2 = self.layer2(out1)
        out3 = self.layer3(out2)
        return {"out1": out1, "out2": out2, "out3": out3, "out4": self.layer4(out3)}

    def extra_repr(self) -> str:
        return f"arch={self.arch}, width={self.width}, channels={self.channels}"


# Backbone keys of structalign's stem / stage1..4 / shortcut layout, and their torchvision names.
_OLD_NAMES = (
    (re.compile(r"^(backbone\.)?stem\.conv\."), r"\1conv1."),
    (re.compile(r"^(backbone\.)?stem\.bn\."), r"\1bn1."),
    (re.compile(r"^(backbone\.)?stage(\d)\.(\d+)\.shortcut\.conv\."), r"\1stage\2.\3.downsample.0."),
    (re.compile(r"^(backbone\.)?stage(\d)\.(\d+)\.shortcut\.bn\."), r"\1stage\2.\3.downsample.1."),
    (re.compile(r"^(backbone\.)?stage(\d)\."), r"\1layer\2."),
)


def from_old_backbone_keys(state_dict: dict) -> dict:
    """The state_dict (of a model: "backbone.*" keys, or of a backbone) with the backbone keys of structalign's
    stem / stage layout renamed to torchvision's; other keys and the order unchanged."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _OLD_NAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def _strip_prefixes(state_dict: dict) -> dict:
    """Drop wrappers' prefixes (DDP "module.", torch.compile "_orig_mod.") and a torchvision classifier (fc.*); of a
    whole model keep "backbone.*"."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith("fc."):
            out[key] = value
    if any(k.startswith("backbone.") for k in out):
        out = {k[len("backbone."):]: v for k, v in out.items() if k.startswith("backbone.")}
    return out


def read_state_dict(source) -> dict:
    """A state_dict from a path (torch.save file, loaded with weights_only=True) or a mapping."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise MissingFileError(f"backbone_weights file {path!r} does not exist")
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"backbone_weights file {path!r} is not a readable torch state_dict: {exc}") from exc
        # Training checkpoints wrap the weights: ours under "model", many other codebases under "state_dict".
        for key in ("model", "state_dict"):
            if isinstance(source, dict) and isinstance(source.get(key), dict):
                source = source[key]
                break
    if not isinstance(source, dict) or not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise InputError("backbone_weights must be a path or a mapping of parameter names to tensors")
    return dict(source)


def load_backbone_weights(backbone: ResNet, source) -> None:
    """Load a local state_dict (a torchvision ResNet's, or a structalign model's; path or mapping) into `backbone`,
    strictly.

    Raises ValueError naming missing / unexpected keys or the first shape mismatch (e.g. resnet18 weights offered to
    a resnet50).
    """
    state = from_old_backbone_keys(_strip_prefixes(read_state_dict(source)))
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise InputError(f"backbone_weights do not fit {backbone.arch} (width {backbone.width}): "
                         f"{len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:3]}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise InputError(f"backbone_weights[{key!r}] has shape {list(value.shape)}, "
                             f"the {backbone.arch} expects {list(own[key].shape)}")
    backbone.load_state_dict(state)
