"""Map-to-node necks (method.md §1.1): backbone feature maps -> one feature vector per landmark.

Each landmark owns `channels_per_point` output channels of the last conv; its node feature is those channels' g x g
maps flattened (4 x 8 x 8 = 256-d at 256 px), so the spatial layout stays inside the vector.
"""
import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _to_nodes(maps: torch.Tensor, num_points: int) -> torch.Tensor:
    """maps (Tensor[B, N * c, g, g]) -> Tensor[B, N, c * g * g]; landmark n owns channels n*c .. n*c + c - 1."""
    b = maps.shape[0]
    return maps.reshape(b, num_points, -1)


class MapToNode(nn.Module):
    """The released BaseMapToNode: out4 -> Conv3x3 + BN + ReLU (256) -> Conv3x3 + BN + ReLU (N * 4) -> nodes.

    forward(features {"out4": Tensor[B, C, g, g]}) -> Tensor[B, N, channels_per_point * g * g].
    """

    POINT_INDEXED = ("to_points",)  # submodules whose outputs are indexed by landmark (see point_indexed_keys)

    def __init__(self, in_channels: int, num_points: int, channels_per_point: int = 4, mid_channels: int = 256):
        super().__init__()
        self.num_points = num_points
        self.reduce = conv_bn_relu(in_channels, mid_channels, 3)
        self.to_points = conv_bn_relu(mid_channels, num_points * channels_per_point, 3)

    def forward(self, features: dict) -> torch.Tensor:
        return _to_nodes(self.to_points(self.reduce(features["out4"])), self.num_points)


class ChannelAttention(nn.Module):
    """x * sigmoid(MLP(avgpool x) + MLP(maxpool x)), MLP = FC(c -> c/2) -> ReLU -> FC(c/2 -> c)."""

    def __init__(self, channels: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, max(channels // 2, 1)), nn.ReLU(inplace=True),
                                 nn.Linear(max(channels // 2, 1), channels))

    def forward(self, x):
        gate = self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3)))
        return x * torch.sigmoid(gate)[:, :, None, None]


class SpatialAttention(nn.Module):
    """x * sigmoid(conv7x7([mean over channels, max over channels]))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x):
        stats = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(stats))


class MultiScaleMapToNode(nn.Module):
    """Multi-scale variant (§1.1, last paragraph): out2/out3/out4 fused, attended, brought back to stride 32.

    Half-width 1x1 branches per scale, top-down bilinear x2 upsampling and summation at stride 8, channel then
    spatial attention, two strided 3x3 convs to stride 32, 1x1 conv to mid_channels and 3x3 conv to N * 4 channels.
    forward(features {"out2", "out3", "out4"}) -> Tensor[B, N, channels_per_point * g * g].
    """

    POINT_INDEXED = ("to_points",)

    def __init__(self, in_channels: tuple, num_points: int, channels_per_point: int = 4, mid_channels: int = 256):
        super().__init__()
        c2, c3, c4 = in_channels[-3:]
        half = mid_channels // 2
        self.num_points = num_points
        self.lateral = nn.ModuleList([conv_bn_relu(c, half, 1) for c in (c2, c3, c4)])
        self.channel_attention = ChannelAttention(half)
        self.spatial_attention = SpatialAttention()
        self.down = nn.Sequential(conv_bn_relu(half, half, 3, 2), conv_bn_relu(half, mid_channels, 3, 2))
        self.mix = conv_bn_relu(mid_channels, mid_channels, 1)
        self.to_points = conv_bn_relu(mid_channels, num_points * channels_per_point, 3)

    def forward(self, features: dict) -> torch.Tensor:
        p2, p3, p4 = (lat(features[k]) for lat, k in zip(self.lateral, ("out2", "out3", "out4")))
        p3 = p3 + F.interpolate(p4, size=p3.shape[-2:], mode="bilinear", align_corners=False)
        fused = p2 + F.interpolate(p3, size=p2.shape[-2:], mode="bilinear", align_corners=False)
        fused = self.spatial_attention(self.channel_attention(fused))
        return _to_nodes(self.to_points(self.mix(self.down(fused))), self.num_points)
