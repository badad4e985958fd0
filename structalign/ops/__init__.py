"""Fused custom ops of structalign, each with reference / cpp / triton backends behind one function.

    graph_conv              one graph-convolution layer (GEMM, aggregation, bias, BatchNorm, relu, residual)
    graph_message_passing   adaptive (softmax-normalised) neighbour aggregation of the L-GRN head
    relative_location_loss  criterion on landmark positions relative to related landmarks
"""
from structalign.ops.backend import get_backend, set_backend, use_backend
from structalign.ops.graph import LandmarkGraph, RelationSet
from structalign.ops.graph_conv import BatchNormArgs, graph_conv
from structalign.ops.graph_message_passing import graph_message_passing
from structalign.ops.relative_location_loss import relative_location_loss

__all__ = [
    "BatchNormArgs",
    "LandmarkGraph",
    "RelationSet",
    "get_backend",
    "graph_conv",
    "graph_message_passing",
    "relative_location_loss",
    "set_backend",
    "use_backend",
]
