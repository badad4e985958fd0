"""graph_message_passing: adaptive neighbour aggregation of the L-GRN head (method.md §1.3-1.4).

    out_i = A_ii h_self_i + sum_{j in N(i), j != i} A_ij h_nbr_j (+ bias),   A_i. = softmax over row i of logits

Backends: reference (structalign.ops.reference), cpp (structalign._C, CPU and CUDA), triton (structalign_kernels).
"""
import torch

from structalign.ops.backend import resolve_backend
from structalign.ops.graph import LandmarkGraph
from structalign.ops.reference import graph_message_passing_reference

OP = "graph_message_passing"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(h_self, h_nbr, logits, graph, bias):
    if not isinstance(graph, LandmarkGraph):
        raise TypeError(f"graph must be a LandmarkGraph, got {type(graph).__name__}")
    for name, t in (("h_self", h_self), ("h_nbr", h_nbr), ("logits", logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if h_self.dim() != 3:
        raise ValueError(f"h_self must have shape [B, N, C], got {list(h_self.shape)}")
    b, n, c = h_self.shape
    if n != graph.num_nodes:
        raise ValueError(f"h_self has {n} nodes but the graph has {graph.num_nodes}")
    if h_nbr.shape != h_self.shape:
        raise ValueError(f"h_nbr must match h_self's shape {list(h_self.shape)}, got {list(h_nbr.shape)}")
    if logits.shape not in (torch.Size([graph.num_edges]), torch.Size([b, graph.num_edges])):
        raise ValueError(f"logits must have shape [{graph.num_edges}] (shared) or [{b}, {graph.num_edges}] "
                         f"(per face), got {list(logits.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != torch.Size([c])):
        raise ValueError(f"bias must be a tensor of shape [{c}], got {getattr(bias, 'shape', type(bias))}")
    tensors = [h_nbr, logits] + ([bias] if bias is not None else [])
    for name, t in zip(("h_nbr", "logits", "bias"), tensors):
        if t.device != h_self.device:
            raise ValueError(f"{name} is on {t.device} but h_self is on {h_self.device}")
        if t.dtype != h_self.dtype and name != "logits":
            raise TypeError(f"{name} has dtype {t.dtype} but h_self has {h_self.dtype}")


def graph_message_passing(h_self: torch.Tensor, h_nbr: torch.Tensor, logits: torch.Tensor, graph: LandmarkGraph,
                          bias: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Softmax-weighted aggregation over each landmark's neighbourhood, in one fused pass.

    h_self, h_nbr (Tensor[B, N, C]): self and neighbour transforms of the node features (X W_self, X W_nbr);
    logits (Tensor[E] shared by all faces, or Tensor[B, E] per face); graph: LandmarkGraph with N nodes, E edges;
    bias (Tensor[C] or None). Returns Tensor[B, N, C].
    """
    _check_inputs(h_self, h_nbr, logits, graph, bias)
    indptr, indices = graph.tensors(h_self.device)
    name = resolve_backend(backend, h_self.device, OP)
    if name == "reference":
        return graph_message_passing_reference(h_self, h_nbr, logits, indptr, indices, bias)
    raise RuntimeError(f"backend {name!r} for {OP} is not wired yet")
