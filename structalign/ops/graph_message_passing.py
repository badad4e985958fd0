"""graph_message_passing: adaptive neighbour aggregation of the L-GRN head (method.md §1.3-1.4).

    out_i = A_ii h_self_i + sum_{j in N(i), j != i} A_ij h_nbr_j (+ bias),   A_i. = softmax over row i of logits

Backends: reference (structalign.ops.reference), cpp (torch.ops.structalign.graph_message_passing from
structalign._C, CPU and CUDA), triton (torch.ops.structalign.graph_message_passing_triton, a triton_op over
structalign_kernels.graph_message_passing). Both fused backends take the graph and its transpose (cached by the
LandmarkGraph per device) and are registered by one template (structalign.ops.fused): fake kernels and an autograd
formula that calls the fused backward op.

    python -m pytest -q tests/ops/test_graph_message_passing.py
"""
import torch
from torch import Tensor
from torch.library import triton_op

from structalign.ops.backend import extension_error, resolve_backend
from structalign.ops.fused import register_fused
from structalign.ops.graph import LandmarkGraph
from structalign.ops.reference import graph_message_passing_reference

try:
    from structalign_kernels import graph_message_passing as triton_launchers
    from structalign_kernels.graph_message_passing import (graph_message_passing_backward_triton,
                                                           graph_message_passing_forward_triton)
except ImportError:  # no Triton: the reference and cpp backends remain
    triton_launchers = None

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

    h_self, h_nbr (Tensor[B, N, C]): self and neighbour transforms of the node features (X W_self, X W_nbr); views
    with unit channel stride (e.g. the two halves of one X @ [W_self | W_nbr]) are read in place;
    logits (Tensor[E] shared by all faces, or Tensor[B, E] per face); graph: LandmarkGraph with N nodes, E edges;
    bias (Tensor[C] or None). Returns Tensor[B, N, C] in h_self's dtype, computed in float64 for float64 features
    and in float32 otherwise (fp16 / bf16 accumulate in fp32; logits are cast to the computing dtype).
    """
    _check_inputs(h_self, h_nbr, logits, graph, bias)
    device = h_self.device
    indptr, indices = graph.tensors(device)
    name = _resolve(backend, device)
    if name == "reference":
        return graph_message_passing_reference(h_self, h_nbr, logits, indptr, indices, bias)
    fused = _APPLY[name]
    return fused(h_self, h_nbr, logits, indptr, indices, *graph.transposed(device), bias, graph.max_deg,
                 graph.max_in_deg)


@torch.compiler.assume_constant_result
def _resolve(backend: str | None, device: torch.device) -> str:
    # Under torch.compile the backend is chosen once, when the function is traced (the choice reads the global
    # setting and the dispatcher's registry, which Dynamo cannot trace).
    return resolve_backend(backend, device, OP)


# ---- one template for both fused backends -----------------------------------------------------------------------
# forward(h_self, h_nbr, logits, indptr, indices, in_ptr, in_edges, edge_row, bias, max_deg, max_in_deg) -> out
# backward(grad_out, h_self, h_nbr, logits, indptr, indices, in_ptr, in_edges, edge_row, max_deg, max_in_deg,
#          output_mask) -> (grad_h_self, grad_h_nbr, grad_logits, grad_bias), masked-off gradients empty [0].
# The C++ schemas are in csrc/graph_message_passing.cpp; the Triton pair below has the same signatures.

def _fake_forward(h_self, h_nbr, logits, indptr, indices, in_ptr, in_edges, edge_row, bias, max_deg, max_in_deg):
    torch._check(h_self.dim() == 3, lambda: f"h_self must have shape [B, N, C], got {list(h_self.shape)}")
    torch._check(h_nbr.shape == h_self.shape, lambda: f"h_nbr must match h_self's shape {list(h_self.shape)}")
    torch._check(logits.shape[-1] == indices.shape[0], lambda: "logits must have one entry per edge")
    return h_self.new_empty(h_self.shape)


def _fake_backward(grad_out, h_self, h_nbr, logits, indptr, indices, in_ptr, in_edges, edge_row, max_deg,
                   max_in_deg, output_mask):
    _fake_forward(h_self, h_nbr, logits, indptr, indices, in_ptr, in_edges, edge_row, None, max_deg, max_in_deg)
    full = (h_self.shape, h_self.shape, logits.shape, h_self.shape[2:])
    dtypes = (h_self.dtype, h_self.dtype, logits.dtype, h_self.dtype)
    return tuple(h_self.new_empty(shape if need else (0,), dtype=dtype)
                 for need, shape, dtype in zip(output_mask, full, dtypes))


def _setup_context(ctx, inputs, output):
    h_self, h_nbr, logits, indptr, indices, in_ptr, in_edges, edge_row, bias, max_deg, max_in_deg = inputs
    ctx.save_for_backward(h_self, h_nbr, logits, indptr, indices, in_ptr, in_edges, edge_row)
    ctx.degrees = (max_deg, max_in_deg)
    ctx.has_bias = bias is not None


def _backward_formula(backward_op):
    def backward(ctx, grad_out):
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], ctx.has_bias and need[8]]
        grads = backward_op(grad_out, *ctx.saved_tensors, *ctx.degrees, mask)
        gh, gn, gl, gb = (g if m else None for g, m in zip(grads, mask))
        return gh, gn, gl, None, None, None, None, None, gb, None, None

    return backward


_APPLY = {}  # backend -> the forward op with its autograd formula (register_fused's apply)

if extension_error() is None and hasattr(torch.ops.structalign, OP):
    _APPLY["cpp"] = register_fused(f"structalign::{OP}", f"structalign::{OP}_backward", _setup_context,
                                   _backward_formula(torch.ops.structalign.graph_message_passing_backward),
                                   _fake_forward, _fake_backward)


# The Triton pair: torch.library.triton_op, so torch.compile sees the kernels; its body is its own fake kernel.
# Separate operators because structalign._C owns the CUDA key of structalign::graph_message_passing.
if triton_launchers is not None:
    @triton_op(f"structalign::{OP}_triton", mutates_args=())
    def graph_message_passing_triton(h_self: Tensor, h_nbr: Tensor, logits: Tensor, indptr: Tensor,
                                     indices: Tensor, in_ptr: Tensor, in_edges: Tensor, edge_row: Tensor,
                                     bias: Tensor | None, max_deg: int, max_in_deg: int) -> Tensor:
        """The Triton forward (structalign_kernels.graph_message_passing), with the C++ op's contract."""
        return graph_message_passing_forward_triton(h_self, h_nbr, logits, indptr, indices, in_ptr, in_edges,
                                                    edge_row, bias, max_deg, max_in_deg)

    @triton_op(f"structalign::{OP}_triton_backward", mutates_args=())
    def graph_message_passing_triton_backward(grad_out: Tensor, h_self: Tensor, h_nbr: Tensor, logits: Tensor,
                                              indptr: Tensor, indices: Tensor, in_ptr: Tensor, in_edges: Tensor,
                                              edge_row: Tensor, max_deg: int, max_in_deg: int,
                                              output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The Triton backward, with the C++ backward op's contract."""
        return graph_message_passing_backward_triton(grad_out, h_self, h_nbr, logits, indptr, indices, in_ptr,
                                                     in_edges, edge_row, max_deg, max_in_deg, output_mask)

    _APPLY["triton"] = register_fused(f"structalign::{OP}_triton", f"structalign::{OP}_triton_backward",
                                      _setup_context, _backward_formula(graph_message_passing_triton_backward))
else:
    graph_message_passing_triton = None
