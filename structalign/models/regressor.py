"""LandmarkRegressor: images -> landmark (x, y) in pixels of the input image.

Coordinates put pixel centres at integers (pixel (0, 0) spans [-0.5, 0.5]), as the data pipelines do.

    images -> [resize to image_size] -> per-image z-score -> backbone -> neck -> head -> offsets (px)
    p = shape_prior * image_size + offsets;  landmarks = (p + 0.5) * (W, H) / image_size - 0.5
    backbone's last map -> visibility head -> logit of P(landmark visible) per point (read by a gated L-GRN head)

shape_prior (learned, Tensor[N, 2] in units of the image side) starts at the mean shape given to the builder (or at
the image centre), so the head only regresses each face's offset from it; the paper regresses pixels directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from structalign.landmarks import LandmarkScheme
from structalign.models.lgrn import LGRNHead, upcast


def standardize(images: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel z-score (method.md §1.6). images (Tensor[B, 3, H, W]) -> same shape."""
    mean = images.mean(dim=(2, 3), keepdim=True)
    std = images.std(dim=(2, 3), keepdim=True, unbiased=False)
    # A flat channel (std 0) maps to 0 instead of dividing by zero.
    return (images - mean) / std.clamp_min(1e-6)


class LandmarkRegressor(nn.Module):
    """Backbone + neck + head + learned shape prior (+ visibility head).

    forward(images (Tensor[B, 3, H, W], any float range)) -> (landmarks Tensor[B, N, 2] in pixels of the input
    image, visibility logits Tensor[B, N] fp32, or None for a model without a visibility head).
    neck is None for the FC head (it reads the backbone's out4 directly); visibility reads out4 too.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, head: nn.Module, scheme: LandmarkScheme,
                 image_size: int, mean_shape: torch.Tensor, normalize_input: bool = True,
                 visibility: nn.Module | None = None):
        super().__init__()
        self.backbone, self.neck, self.head, self.visibility = backbone, neck, head, visibility
        self.scheme, self.image_size, self.normalize_input = scheme, image_size, normalize_input
        self.shape_prior = nn.Parameter(mean_shape.detach().float().clone() / image_size)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"images must be a floating torch.Tensor, got {getattr(images, 'dtype', type(images))}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {list(images.shape)}")
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return standardize(images) if self.normalize_input else images

    def features(self, images: torch.Tensor) -> dict:
        """Backbone maps {"out1".."out4"} of the prepared images."""
        return self.backbone(self._prepare(images))

    def head_input(self, features: dict) -> tuple:
        """The head's positional inputs from the backbone maps (what `head` is called with)."""
        if self.neck is None:
            return (features["out4"],)
        pooled = features["out4"].mean(dim=(2, 3)) if self.head.relation_learner is not None else None
        return self.neck(features), pooled

    def visibility_logits(self, features: dict) -> torch.Tensor | None:
        """Logits of P(visible) (Tensor[B, N] fp32) from the backbone maps; None without a visibility head."""
        return None if self.visibility is None else upcast(self.visibility(features["out4"]))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = self.features(images)
        h, w = images.shape[-2:]
        head_input = self.head_input(features)
        visibility = self.visibility_logits(features)
        # An L-GRN head reads the visibility logits where it has the visibility gate (LGRNHead.edge_bias).
        offsets = self.head(*head_input, visibility) if isinstance(self.head, LGRNHead) else self.head(*head_input)
        points = self.shape_prior * self.image_size + upcast(offsets)
        if (h, w) != (self.image_size, self.image_size):
            points = (points + 0.5) * points.new_tensor([w / self.image_size, h / self.image_size]) - 0.5
        return points, visibility

    def cache_graph_tensors(self, device: torch.device) -> None:
        """Copies the L-GRN head's graph indices to `device` now (LandmarkGraph's per-device cache), so that a
        torch.compile trace finds them there instead of filling the cache inside the traced graph."""
        if isinstance(self.head, LGRNHead):
            self.head.graph.tensors(device)
            self.head.graph.transposed(device)

    @torch.no_grad()
    def adjacency(self, images: torch.Tensor) -> torch.Tensor:
        """Neighbour weights the L-GRN head applies to each image: Tensor[B, L, N, N] (L graph convs), rows sum to 1."""
        if not isinstance(self.head, LGRNHead):
            raise ValueError("adjacency exists only for the L-GRN head (arch='lgrn')")
        features = self.features(images)
        nodes, pooled = self.head_input(features)
        return self.head.adjacency(pooled, batch=nodes.shape[0], visibility_logits=self.visibility_logits(features))

    def point_indexed_keys(self) -> list[str]:
        """State-dict keys whose entries are indexed by landmark or graph edge (the shape prior, and what the neck
        and head modules name in their POINT_INDEXED): meaningless under another landmark scheme."""
        prefixes = ["shape_prior"] + [f"{name}.{sub}" for name, module in self.named_modules()
                                      for sub in getattr(module, "POINT_INDEXED", ())]
        return [k for k in self.state_dict() if any(k == p or k.startswith(p + ".") for p in prefixes)]

    def extra_repr(self) -> str:
        return f"scheme={self.scheme.name}, image_size={self.image_size}, normalize_input={self.normalize_input}"

