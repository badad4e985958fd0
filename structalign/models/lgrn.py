"""The landmark-graph relational network head (L-GRN, method.md §1.3-1.4).

GraphConv        SemGraphConv: out = graph_message_passing(X W_self, X W_nbr, edge logits) + b, the neighbour weights
                 being a softmax of the logits within each landmark's neighbourhood
GraphBlock       GraphConv -> BatchNorm -> ReLU (-> + residual). With `fused` (the default) a GraphConv and its block
                 run as one structalign.ops.graph_conv each: one GEMM with [W_self | W_nbr], everything after it in one
                 op (C++ backend); the reference backend computes the unfused layer. Parameters and state-dict keys
                 are the same either way. A fused block's BatchNorm takes the global batch's statistics when it is
                 an nn.SyncBatchNorm (GPUs) or after sync_graph_batch_norms (any device, CPU / gloo included).
RelationLearner  per-image edge logits from pooled backbone features (the "dynamic" adjacency, §1.4)
LGRNHead         input graph conv -> residual blocks of two graph convs (BN + ReLU) -> output graph conv to (x, y);
                 with visibility_gate, every edge i <- j of every conv gets s * log P(j visible) added to its logit,
                 P from the model's visibility head and s = gate_scale[0] on the self edge (j = i), gate_scale[1] on
                 the others (both learned, from 1): after the softmax each weight is scaled by P(j visible)^s and the
                 row renormalised, so likely occluded neighbours send less, and a likely occluded landmark listens to
                 its neighbours more than to itself
"""
from __future__ import annotations

import math

import torch
from torch import nn

from structalign.ops import LandmarkGraph, graph_conv, graph_message_passing
from structalign.ops.graph_conv import batch_norm_args, batch_norm_group
from structalign.ops.backend import check_op_backend
from structalign.ops.reference import edge_softmax_reference


def upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 -> fp32; other dtypes unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class GraphConv(nn.Module):
    """One graph convolution over the landmark graph.

    forward(x (Tensor[B, N, in]), logits (Tensor[B, E] or None), edge_bias (Tensor[B, E] or None, added to the
    logits)) -> Tensor[B, N, out]. With learn_edges the layer owns one logit per graph entry (init 1.0: uniform
    neighbour weights), used when logits is None. fused: run as
    structalign.ops.graph_conv (one GEMM with [W_self | W_nbr]) instead of two matmuls and graph_message_passing.
    """

    POINT_INDEXED = ("edge_logits",)  # one entry per graph edge (see LandmarkRegressor.point_indexed_keys)

    def __init__(self, in_features: int, out_features: int, graph: LandmarkGraph, learn_edges: bool = True,
                 op_backend: str | None = None, fused: bool = True):
        super().__init__()
        check_op_backend(op_backend)
        self.in_features, self.out_features = in_features, out_features
        self.graph, self.op_backend, self.fused = graph, op_backend, fused
        weight = torch.empty(2, in_features, out_features)
        # Fans of the [2, in, out] tensor, as SemGraphConv initialises it.
        nn.init.xavier_uniform_(weight, gain=1.414)
        # Stored in [in, 2, out] memory order: the fused op's [in, 2 * out] GEMM operand is then a view, and its
        # gradient comes back in the parameter's own strides (the layout DDP's bucket views and AccumulateGrad expect).
        self.weight = nn.Parameter(weight.transpose(0, 1).contiguous().transpose(0, 1))
        self.edge_logits = nn.Parameter(torch.ones(graph.num_edges)) if learn_edges else None
        bound = 1.0 / math.sqrt(out_features)
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))

    def logits_or_own(self, logits: torch.Tensor | None, edge_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The per-image logits given, or the layer's own learned ones; plus edge_bias (Tensor[B, E]) if given."""
        if logits is None:
            if self.edge_logits is None:
                raise ValueError("this GraphConv has no learned edge logits; pass per-image logits [B, E]")
            logits = self.edge_logits
        return logits if edge_bias is None else logits + edge_bias

    def forward(self, x: torch.Tensor, logits: torch.Tensor | None = None,
                edge_bias: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits_or_own(logits, edge_bias)
        if self.fused:
            return graph_conv(x, self.weight, logits, self.graph, self.bias, backend=self.op_backend)
        h_self = torch.matmul(x, self.weight[0])
        h_nbr = torch.matmul(x, self.weight[1])
        return graph_message_passing(h_self, h_nbr, logits, self.graph, self.bias.to(h_self.dtype),
                                     backend=self.op_backend)

    def extra_repr(self) -> str:
        kind = "learned edges" if self.edge_logits is not None else "per-image edges"
        return (f"{self.in_features} -> {self.out_features}, {self.graph}, {kind}, op_backend={self.op_backend}, "
                f"fused={self.fused}")


class GraphBlock(nn.Module):
    """GraphConv -> BatchNorm over channels -> ReLU (-> + residual).

    forward(x (Tensor[B, N, in]), logits, edge_bias, residual (Tensor[B, N, out] or None)) -> Tensor[B, N, out].
    fused: the
    whole block is one structalign.ops.graph_conv (same parameters, buffers and running-statistics updates), whose
    BatchNorm statistics are the global batch's (batch_norm_group) for an nn.SyncBatchNorm or with sync_batch_norm.
    """

    def __init__(self, in_features: int, out_features: int, graph: LandmarkGraph, learn_edges: bool,
                 op_backend: str | None, fused: bool = True):
        super().__init__()
        self.conv = GraphConv(in_features, out_features, graph, learn_edges, op_backend, fused)
        self.bn = nn.BatchNorm1d(out_features)
        self.relu = nn.ReLU(inplace=True)
        self.sync_batch_norm = False  # set by sync_graph_batch_norms: statistics over all processes, on any device

    def forward(self, x, logits=None, edge_bias=None, residual=None):
        conv = self.conv
        if conv.fused:
            return graph_conv(x, conv.weight, conv.logits_or_own(logits, edge_bias), conv.graph, conv.bias,
                              batch_norm_args(self.bn), relu=True, residual=residual, backend=conv.op_backend,
                              process_group=batch_norm_group(self.bn, self.sync_batch_norm))
        # BatchNorm over the [B * N, C] rows: the statistics of BatchNorm1d on [B, C, N], without the transposes
        # that would hand the graph op a gradient with channel stride N (and make it copy that gradient).
        y = conv(x, logits, edge_bias)
        out = self.relu(self.bn(y.reshape(-1, y.shape[-1])).view(y.shape))
        return out if residual is None else residual + out


def sync_graph_batch_norms(module: nn.Module) -> nn.Module:
    """`module` with every fused GraphBlock in it taking its BatchNorm's training statistics over all processes
    (torch.distributed's default group), on any device: the counterpart of nn.SyncBatchNorm.convert_sync_batchnorm
    for CPU modules, which nn.SyncBatchNorm and DDP refuse. Other BatchNorms keep their process's statistics."""
    for block in module.modules():
        if isinstance(block, GraphBlock) and block.conv.fused:
            block.sync_batch_norm = True
    return module


class ResidualGraphBlock(nn.Module):
    """x + GraphBlock(GraphBlock(x)) at constant width."""

    def __init__(self, width: int, graph: LandmarkGraph, learn_edges: bool, op_backend: str | None,
                 fused: bool = True):
        super().__init__()
        self.first = GraphBlock(width, width, graph, learn_edges, op_backend, fused)
        self.second = GraphBlock(width, width, graph, learn_edges, op_backend, fused)

    def forward(self, x, logits=None, edge_bias=None):
        return self.second(self.first(x, logits, edge_bias), logits, edge_bias, residual=x)


class RelationLearner(nn.Module):
    """Per-image edge logits: pooled (Tensor[B, C]) -> Linear(C, 256) -> ReLU -> BN -> Linear(256, E) -> Tensor[B, E].

    The last layer starts at zero weight and unit bias, so training starts from the static head's uniform weights.
    """

    POINT_INDEXED = ("net.3",)  # its last layer has one output per graph edge

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

    forward(nodes (Tensor[B, N, F]), pooled (Tensor[B, C], used by the dynamic adjacency), visibility_logits
    (Tensor[B, N], used by the visibility gate)) -> Tensor[B, N, 2].
    adjacency "static": every graph conv learns its own edge logits, shared by all images; "dynamic": a
    RelationLearner predicts one set of logits per image, shared by all layers. visibility_gate: edges from likely
    occluded neighbours weigh less (module docstring); the visibility logits are detached here, so the gate learns
    only its scale from the landmark loss and the visibility head only from its labels. fused: each graph conv with
    its BatchNorm, ReLU and residual add is one structalign.ops.graph_conv (False: the unfused modules, for A/B).
    """

    def __init__(self, node_features: int, graph: LandmarkGraph, width: int = 128, num_blocks: int = 4,
                 adjacency: str = "static", pooled_channels: int | None = None, op_backend: str | None = None,
                 fused: bool = True, visibility_gate: bool = False):
        super().__init__()
        if adjacency not in ("static", "dynamic"):
            raise ValueError(f"adjacency must be 'static' or 'dynamic', got {adjacency!r}")
        if adjacency == "dynamic" and not pooled_channels:
            raise ValueError("the dynamic adjacency needs pooled_channels (the backbone's last channel count)")
        learn = adjacency == "static"
        self.graph, self.adjacency_kind = graph, adjacency
        self.relation_learner = RelationLearner(pooled_channels, graph.num_edges) if not learn else None
        self.input = GraphBlock(node_features, width, graph, learn, op_backend, fused)
        self.blocks = nn.ModuleList(ResidualGraphBlock(width, graph, learn, op_backend, fused)
                                    for _ in range(num_blocks))
        self.output = GraphConv(width, 2, graph, learn, op_backend, fused)
        # The exponents of P(j visible) in the weights of self edges and of the other edges, learned.
        self.gate_scale = nn.Parameter(torch.ones(2)) if visibility_gate else None
        self.register_buffer("other_edges", (graph.rows != graph.indices).long(), persistent=False)

    def edge_logits(self, pooled: torch.Tensor | None) -> torch.Tensor | None:
        """The per-image logits (Tensor[B, E]) of the dynamic head; None for the static head."""
        if self.relation_learner is None:
            return None
        if pooled is None:
            raise ValueError("the dynamic L-GRN head needs pooled features [B, C]")
        return self.relation_learner(pooled)

    def edge_bias(self, visibility_logits: torch.Tensor | None) -> torch.Tensor | None:
        """s * log P(j visible) for every edge i <- j, s = gate_scale[0] on self edges, gate_scale[1] on the others
        (Tensor[B, E], fp32); None without the visibility gate."""
        if self.gate_scale is None:
            return None
        n = self.graph.num_nodes
        if visibility_logits is None or visibility_logits.shape[1:] != (n,):
            raise ValueError(f"the visibility-gated L-GRN head needs visibility logits [B, {n}], got "
                             f"{None if visibility_logits is None else list(visibility_logits.shape)}")
        _, indices = self.graph.tensors(visibility_logits.device)
        log_visible = nn.functional.logsigmoid(visibility_logits.detach().float())
        return self.gate_scale[self.other_edges] * log_visible[:, indices]

    def forward(self, nodes: torch.Tensor, pooled: torch.Tensor | None = None,
                visibility_logits: torch.Tensor | None = None) -> torch.Tensor:
        if nodes.dim() != 3 or nodes.shape[1] != self.graph.num_nodes:
            raise ValueError(f"nodes must have shape [B, {self.graph.num_nodes}, F] for this graph, "
                             f"got {list(nodes.shape)}")
        logits, bias = self.edge_logits(pooled), self.edge_bias(visibility_logits)
        x = self.input(nodes, logits, bias)
        for block in self.blocks:
            x = block(x, logits, bias)
        # Pixel offsets in bf16 would be quantised to ~0.25 px; the last layer runs in fp32 under autocast.
        with torch.autocast(x.device.type, enabled=False):
            return self.output(upcast(x), None if logits is None else upcast(logits), bias)

    def graph_convs(self) -> list:
        return [m for m in self.modules() if isinstance(m, GraphConv)]

    def adjacency(self, pooled: torch.Tensor | None = None, batch: int = 1,
                  visibility_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Dense neighbour weights each graph conv applies: Tensor[B, L, N, N], each row summing to 1.

        pooled (Tensor[B, C]) is needed by the dynamic head, visibility_logits (Tensor[B, N]) by the visibility
        gate; the static, ungated head's weights are repeated `batch` times.
        """
        convs = self.graph_convs()
        logits = self.edge_logits(pooled)
        if logits is None:
            logits = torch.stack([c.edge_logits for c in convs]).unsqueeze(0).expand(batch, -1, -1)
        else:
            logits = logits.unsqueeze(1).expand(-1, len(convs), -1)
        bias = self.edge_bias(visibility_logits)
        if bias is not None:
            logits = logits + bias.unsqueeze(1)
        indptr, indices = self.graph.tensors(logits.device)
        weights = edge_softmax_reference(logits, indptr)
        n = self.graph.num_nodes
        dense = weights.new_zeros(*weights.shape[:2], n, n)
        rows = self.graph.rows.to(logits.device)
        dense[:, :, rows, indices] = weights
        return dense
