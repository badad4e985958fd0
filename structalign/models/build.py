"""build_model: the paper's L-GRN network or the FC-regression baseline from a model config (its fields are the
architecture, checked where the config is made: structalign.engine.config_schema.ModelConfig)."""
from __future__ import annotations

import numpy as np
import torch

from structalign.errors import InputError
from structalign.landmarks import LandmarkScheme
from structalign.models.fc import FCHead
from structalign.models.landmark_graphs import message_graph
from structalign.models.lgrn import LGRNHead
from structalign.models.map_to_node import MapToNode, MultiScaleMapToNode
from structalign.models.regressor import LandmarkRegressor
from structalign.models.resnet import ResNet
from structalign.models.visibility import VisibilityHead

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


def build_model(model_cfg, scheme: LandmarkScheme, image_size: int, *, mean_shape=None, normalize_input: bool = True,
                fused_layers: bool = True) -> LandmarkRegressor:
    """A face-alignment model: model(images Tensor[B, 3, H, W]) -> (landmarks Tensor[B, N, 2] in pixels of the
    input, logits of P(visible) Tensor[B, N] or None without a visibility head).

    model_cfg: a structalign.engine.config_schema.ModelConfig, whose checks its values have passed (any object with
    its fields does): arch "lgrn" (map-to-node + L-GRN head, method.md §1.1-1.4) or "fc" (§1.6), backbone, head and
    visibility settings, and op_backend, the backend of the graph op; its backbone_weights are the caller's to load
    (load_backbone_weights), as only a new run wants them. scheme: the landmarks predicted; image_size: side the
    network runs at (a multiple of 32; other inputs are resized to it and the landmarks mapped back).
    Keyword-only: mean_shape (array[N, 2], pixels of an image_size crop) initialises the learned shape prior
    (default: every point at the centre); normalize_input: per-image z-score inside the model; fused_layers: the
    L-GRN head's layers as structalign.ops.graph_conv (False: the unfused modules; the same parameters and state
    dict, for A/B runs).
    """
    if not isinstance(scheme, LandmarkScheme):
        raise TypeError(f"scheme must be a LandmarkScheme (structalign.landmarks.resolve_scheme), got {scheme!r}")
    image_size = _positive_int("image_size", image_size, 32)
    if image_size % 32:
        raise InputError(f"image_size must be a multiple of 32 (the backbone's stride), got {image_size}")
    m, n = model_cfg, scheme.num_points
    trunk = ResNet(m.backbone, m.backbone_width, m.bn_momentum)
    grid = image_size // 32
    if m.arch == "fc":
        neck, head = None, FCHead(trunk.channels[-1] * grid * grid, n, m.fc_width)
    else:
        if m.map_to_node == "base":
            neck = MapToNode(trunk.channels[-1], n, CHANNELS_PER_POINT)
        else:
            neck = MultiScaleMapToNode(trunk.channels, n, CHANNELS_PER_POINT)
        head = LGRNHead(CHANNELS_PER_POINT * grid * grid, message_graph(scheme), m.head_width, m.num_blocks,
                        m.adjacency, trunk.channels[-1], m.op_backend, fused=fused_layers,
                        visibility_gate=m.visibility_gate)
    visibility = VisibilityHead(trunk.channels[-1], grid, n) if m.visibility_head else None
    return LandmarkRegressor(trunk, neck, head, scheme, image_size, _mean_shape(mean_shape, n, image_size),
                             normalize_input, visibility)
