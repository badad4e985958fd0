"""The landmark-graph relational network head (L-GRN, method.md §1.3-1.4).

GraphConv        SemGraphConv: out = graph_message_passing(X W_self, X W_nbr, edge logits) + b, the neighbour weights
                 being a softmax of the logits within each landmark's neighbourhood
RelationLearner  per-image edge logits from pooled backbone features (the "dynamic" adjacency, §1.4)
LGRNHead         input graph conv -> residual blocks of two graph convs (BN + ReLU) -> output graph conv to (x, y)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from structalign.ops import LandmarkGraph, graph_message_passing
from structalign.ops.backend import BACKENDS
from structalign.ops.reference import edge_softmax_reference


def upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 -> fp32; other dtypes unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def check_op_backend(op_backend) -> None:
    if op_backend is not None and op_backend not in BACKENDS:
        raise ValueError(f"op_backend must be None or one of {BACKENDS}, got {op_backend!r}")


class GraphConv(nn.Module):
    """One graph convolution over the landmark graph.

    forward(x (Tensor[B, N, in]), logits (Tensor[B, E] or None)) -> Tensor[B, N, out]. With learn_edges the layer
    owns one logit per graph entry (init 1.0: uniform neighbour weights), used when logits is None.
    """

    def __init__(self, in_features: int, out_features: int, graph: LandmarkGraph, learn_edges: bool = True,
                 op_backend: str | None = None):
        super().__init__()
        check_op_backend(op_backend)
        self.in_features, self.out_features = in_features, out_features
        self.graph, self.op_backend = graph, op_backend
        self.weight = nn.Parameter(torch.empty(2, in_features, out_features))
        # Fans of the [2, in, out] tensor, as SemGraphConv initialises it.
        nn.init.xavier_uniform_(self.weight, gain=1.414)
        self.edge_logits = nn.Parameter(torch.ones(graph.num_edges)) if learn_edges else None
        bound = 1.0 / math.sqrt(out_features)
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        if logits is None:
            if self.edge_logits is None:
                raise ValueError("this GraphConv has no learned edge logits; pass per-image logits [B, E]")
            logits = self.edge_logits
        h_self = torch.matmul(x, self.weight[0])
        h_nbr = torch.matmul(x, self.weight[1])
        return graph_message_passing(h_self, h_nbr, logits, self.graph, self.bias.to(h_self.dtype),
                                     backend=self.op_backend)

    def extra_repr(self) -> str:
        kind = "learned edges" if self.edge_logits is not None else "per-image edges"
        return f"{self.in_features} -> {self.out_features}, {self.graph}, {kind}, op_backend={self.op_backend}"


class GraphBlock(nn.Module):
    """GraphConv -> BatchNorm over channels -> ReLU. forward(x (Tensor[B, N, in]), logits) -> Tensor[B, N, out]."""

    def __init__(self, in_features: int, out_features: int, graph: LandmarkGraph, learn_edges: bool,
                 op_backend: str | None):
        super().__init__()
        self.conv = GraphConv(in_features, out_features, graph, learn_edges, op_backend)
        self.bn = nn.BatchNorm1d(out_features)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x, logits=None):
        # BatchNorm over the [B * N, C] rows: the statistics of BatchNorm1d on [B, C, N], without the transposes
        # that would hand the graph op a gradient with channel stride N (and make it copy that gradient).
        y = self.conv(x, logits)
        return self.relu(self.bn(y.reshape(-1, y.shape[-1])).view(y.shape))


class ResidualGraphBlock(nn.Module):
    """x + GraphBlock(GraphBlock(x)) at constant width."""

    def __init__(self, width: int, graph: LandmarkGraph, learn_edges: bool, op_backend: str | None):
        super().__init__()
        self.first = GraphBlock(width, width, graph, learn_edges, op_backend)
        self.second = GraphBlock(width, width, graph, learn_edges, op_backend)

    def forward(self, x, logits=None):
        return x + self.second(self.first(x, logits), logits)


class RelationLearner(nn.Module):
    """Per-image edge logits: pooled (Tensor[B, C]) -> Linear(C, 256) -> ReLU -> BN -> Linear(256, E) -> Tensor[B, E].

    The last layer starts at zero weight and unit bias, so training starts from the static head's uniform weights.
    """

    def __init__(self, in_channels: int, num_edges: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.BatchNorm1d(hidden),
                                 nn.Linear(hidden, num_edges))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.ones_(self.net[-1].bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


class LGRNHead(nn.Module):
    """Node features -> landmark offsets through 2 + 2 * num_blocks graph convolutions.

    forward(nodes (Tensor[B, N, F]), pooled (Tensor[B, C], used by the dynamic adjacency)) -> Tensor[B, N, 2].
    adjacency "static": every graph conv learns its own edge logits, shared by all images; "dynamic": a
    RelationLearner predicts one set of logits per image, shared by all layers.
    """

    def __init__(self, node_features: int, graph: LandmarkGraph, width: int = 128, num_blocks: int = 4,
                 adjacency: str = "static", pooled_channels: int | None = None, op_backend: str | None = None):
        super().__init__()
        if adjacency not in ("static", "dynamic"):
            raise ValueError(f"adjacency must be 'static' or 'dynamic', got {adjacency!r}")
        if adjacency == "dynamic" and not pooled_channels:
            raise ValueError("the dynamic adjacency needs pooled_channels (the backbone's last channel count)")
        learn = adjacency == "static"
        self.graph, self.adjacency_kind = graph, adjacency
        self.relation_learner = RelationLearner(pooled_channels, graph.num_edges) if not learn else None
        self.input = GraphBlock(node_features, width, graph, learn, op_backend)
        self.blocks = nn.ModuleList(ResidualGraphBlock(width, graph, learn, op_backend) for _ in range(num_blocks))
        self.output = GraphConv(width, 2, graph, learn, op_backend)

    def edge_logits(self, pooled: torch.Tensor | None) -> torch.Tensor | None:
        """The per-image logits (Tensor[B, E]) of the dynamic head; None for the static head."""
        if self.relation_learner is None:
            return None
        if pooled is None:
            raise ValueError("the dynamic L-GRN head needs pooled features [B, C]")
        return self.relation_learner(pooled)

    def forward(self, nodes: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        if nodes.dim() != 3 or nodes.shape[1] != self.graph.num_nodes:
            raise ValueError(f"nodes must have shape [B, {self.graph.num_nodes}, F] for this graph, "
                             f"got {list(nodes.shape)}")
        logits = self.edge_logits(pooled)
        x = self.input(nodes, logits)
        for block in self.blocks:
            x = block(x, logits)
        # Pixel offsets in bf16 would be quantised to ~0.25 px; the last layer runs in fp32 under autocast.
        with torch.autocast(x.device.type, enabled=False):
            return self.output(upcast(x), None if logits is None else upcast(logits))

    def graph_convs(self) -> list:
        return [m for m in self.modules() if isinstance(m, GraphConv)]

    def adjacency(self, pooled: torch.Tensor | None = None, batch: int = 1) -> torch.Tensor:
        """Dense neighbour weights each graph conv applies: Tensor[B, L, N, N], each row summing to 1.

        pooled (Tensor[B, C]) is needed by the dynamic head; the static head's weights are repeated `batch` times.
        """
        convs = self.graph_convs()
        logits = self.edge_logits(pooled)
        if logits is None:
            logits = torch.stack([c.edge_logits for c in convs]).unsqueeze(0).expand(batch, -1, -1)
        else:
            logits = logits.unsqueeze(1).expand(-1, len(convs), -1)
        indptr, indices = self.graph.tensors(logits.device)
        weights = edge_softmax_reference(logits, indptr)
        n = self.graph.num_nodes
        dense = weights.new_zeros(*weights.shape[:2], n, n)
        rows = self.graph.rows.to(logits.device)
        dense[:, :, rows, indices] = weights
        return dense
