"""build_model: the paper's L-GRN network or the FC-regression baseline from plain config values."""
from __future__ import annotations

import numpy as np
import torch

from structalign.errors import InputError
from structalign.landmarks import resolve_scheme
from structalign.models.fc import FCHead
from structalign.models.landmark_graphs import message_graph
from structalign.models.lgrn import LGRNHead
from structalign.models.map_to_node import MapToNode, MultiScaleMapToNode
from structalign.models.regressor import LandmarkRegressor
from structalign.models.resnet import ARCHS, ResNet, load_backbone_weights
from structalign.models.visibility import VisibilityHead
from structalign.ops.backend import check_op_backend

ARCHITECTURES = ("lgrn", "fc")
CHANNELS_PER_POINT = 4


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _mean_shape(mean_shape, num_points: int, image_size: int) -> torch.Tensor:
    if mean_shape is None:
        return torch.full((num_points, 2), image_size / 2.0)
    shape = torch.as_tensor(np.asarray(mean_shape, dtype=np.float32))
    if shape.shape != (num_points, 2):
        raise InputError(f"mean_shape must have shape [{num_points}, 2] for this scheme, got {list(shape.shape)}")
    if not torch.isfinite(shape).all():
        raise InputError("mean_shape has NaN or infinite coordinates")
    return shape


def build_model(arch: str = "lgrn", backbone: str = "resnet34", scheme="wflw98", image_size: int = 256,
                head_width: int = 128, num_blocks: int = 4, adjacency: str = "static", map_to_node: str = "base",
                backbone_weights=None, op_backend: str | None = None, *, mean_shape=None, backbone_width: int = 64,
                bn_momentum: float = 0.1, fc_width: int = 256, normalize_input: bool = True,
                fused_layers: bool = True, visibility_head: bool = True,
                visibility_gate: bool = False) -> LandmarkRegressor:
    """A face-alignment model: model(images Tensor[B, 3, H, W]) -> (landmarks Tensor[B, N, 2] in pixels of the
    input, logits of P(visible) Tensor[B, N] or None without a visibility head).

    arch "lgrn" (map-to-node + L-GRN head, method.md §1.1-1.4) or "fc" (§1.6); backbone "resnet18/34/50";
    scheme: LandmarkScheme, name or point count; image_size: side the network runs at (a multiple of 32; other
    inputs are resized to it and the landmarks mapped back); adjacency "static" (learned per edge) or "dynamic"
    (per image); map_to_node "base" or "multiscale"; backbone_weights: local state_dict path or mapping (ours or
    torchvision's layout); op_backend: backend of the graph op (None = the global default).
    Keyword-only: mean_shape (array[N, 2], pixels of an image_size crop) initialises the learned shape prior
    (default: every point at the centre); backbone_width (stage-1 channels, 64 standard); bn_momentum of the
    backbone (the paper used 0.01); fc_width of the FC head; normalize_input: per-image z-score inside the model;
    fused_layers: the L-GRN head's layers as structalign.ops.graph_conv (False: the unfused modules; the same
    parameters and state dict, for A/B runs); visibility_head: predict per-point visibility (structalign.models.
    visibility); visibility_gate (L-GRN, needs the visibility head): edges from likely occluded neighbours weigh less.
    """
    if arch not in ARCHITECTURES:
        raise InputError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if backbone not in ARCHS:
        raise InputError(f"backbone must be one of {sorted(ARCHS)}, got {backbone!r}")
    image_size = _positive_int("image_size", image_size, 32)
    if image_size % 32:
        raise InputError(f"image_size must be a multiple of 32 (the backbone's stride), got {image_size}")
    head_width = _positive_int("head_width", head_width)
    num_blocks = _positive_int("num_blocks", num_blocks, 0)
    if adjacency not in ("static", "dynamic"):
        raise InputError(f"adjacency must be 'static' or 'dynamic', got {adjacency!r}")
    if map_to_node not in ("base", "multiscale"):
        raise InputError(f"map_to_node must be 'base' or 'multiscale', got {map_to_node!r}")
    check_op_backend(op_backend)
    if visibility_gate and (arch != "lgrn" or not visibility_head):
        raise InputError("visibility_gate needs arch='lgrn' and visibility_head=True")
    if not 0.0 < bn_momentum <= 1.0:
        raise InputError(f"bn_momentum must be in (0, 1], got {bn_momentum!r}")
    scheme = resolve_scheme(scheme)
    n = scheme.num_points

    trunk = ResNet(backbone, _positive_int("backbone_width", backbone_width), bn_momentum)
    if backbone_weights is not None:
        load_backbone_weights(trunk, backbone_weights)
    grid = image_size // 32
    if arch == "fc":
        neck, head = None, FCHead(trunk.channels[-1] * grid * grid, n, _positive_int("fc_width", fc_width))
    else:
        if map_to_node == "base":
            neck = MapToNode(trunk.channels[-1], n, CHANNELS_PER_POINT)
        else:
            neck = MultiScaleMapToNode(trunk.channels, n, CHANNELS_PER_POINT)
        head = LGRNHead(CHANNELS_PER_POINT * grid * grid, message_graph(scheme), head_width, num_blocks, adjacency,
                        trunk.channels[-1], op_backend, fused=fused_layers, visibility_gate=visibility_gate)
    return LandmarkRegressor(trunk, neck, head, scheme, image_size, _mean_shape(mean_shape, n, image_size),
                             normalize_input, VisibilityHead(trunk.channels[-1], grid, n) if visibility_head else None)
