"""The FC-regression baseline head (method.md §1.6): flatten out4 -> Linear -> ReLU -> Linear to 2N coordinates."""
import torch
from torch import nn

from structalign.models.lgrn import upcast


class FCHead(nn.Module):
    """forward(out4 (Tensor[B, C, g, g])) -> Tensor[B, N, 2] landmark offsets."""

    POINT_INDEXED = ("output",)

    def __init__(self, in_features: int, num_points: int, width: int = 256):
        super().__init__()
        self.num_points = num_points
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(inplace=True))
        self.output = nn.Linear(width, 2 * num_points)

    def forward(self, out4: torch.Tensor) -> torch.Tensor:
        x = self.hidden(out4)
        # Pixel offsets in bf16 would be quantised to ~0.25 px; the last layer runs in fp32 under autocast.
        with torch.autocast(x.device.type, enabled=False):
            return self.output(upcast(x)).view(-1, self.num_points, 2)
