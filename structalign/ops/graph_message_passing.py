"""graph_message_passing: adaptive neighbour aggregation of the L-GRN head (method.md §1.3-1.4).

    out_i = A_ii h_self_i + sum_{j in N(i), j != i} A_ij h_nbr_j (+ bias),   A_i. = softmax over row i of logits

Backends: reference (structalign.ops.reference), cpp (torch.ops.structalign.graph_message_passing from
structalign._C, CPU and CUDA), triton (torch.ops.structalign.graph_message_passing_triton over
structalign_kernels.graph_message_passing). Each fused op has a fake (meta) implementation and an autograd formula
that calls its fused backward op, so torch.compile treats the ops as opaque nodes.

    python -m pytest -q tests/ops/test_graph_message_passing.py
"""
import weakref

import torch
from torch import Tensor

from structalign.ops.backend import extension_error, resolve_backend
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

    h_self, h_nbr (Tensor[B, N, C]): self and neighbour transforms of the node features (X W_self, X W_nbr); views
    with unit channel stride (e.g. the two halves of one X @ [W_self | W_nbr]) are read in place;
    logits (Tensor[E] shared by all faces, or Tensor[B, E] per face); graph: LandmarkGraph with N nodes, E edges;
    bias (Tensor[C] or None). Returns Tensor[B, N, C] in h_self's dtype (fp16 / bf16 accumulate in fp32).
    """
    _check_inputs(h_self, h_nbr, logits, graph, bias)
    indptr, indices = graph.tensors(h_self.device)
    name = _resolve(backend, h_self.device)
    if name == "cpp":
        return torch.ops.structalign.graph_message_passing(h_self, h_nbr, logits, indptr, indices, bias)
    if name == "triton":
        in_ptr, in_edges, edge_row, max_deg, max_in_deg = _transposed(graph, h_self.device)
        out, _ = graph_message_passing_triton(h_self, h_nbr, logits, indptr, indices, in_ptr, in_edges, edge_row,
                                              bias, max_deg, max_in_deg)
        return out
    return graph_message_passing_reference(h_self, h_nbr, logits, indptr, indices, bias)


@torch.compiler.assume_constant_result
def _resolve(backend: str | None, device: torch.device) -> str:
    # Under torch.compile the backend is chosen once, when the function is traced (the choice reads the global
    # setting and the dispatcher's registry, which Dynamo cannot trace).
    return resolve_backend(backend, device, OP)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("graph_message_passing: double backward (a gradient of its gradient) is not supported")


def _no_double_backward_context(ctx, inputs, output):
    pass


def _check_fake_args(h_self, h_nbr, logits, indices):
    torch._check(h_self.dim() == 3, lambda: f"h_self must have shape [B, N, C], got {list(h_self.shape)}")
    torch._check(h_nbr.shape == h_self.shape, lambda: f"h_nbr must match h_self's shape {list(h_self.shape)}")
    torch._check(logits.shape[-1] == indices.shape[0], lambda: "logits must have one entry per edge")


# ---- C++ ops (structalign._C) ------------------------------------------------------------------------------------
# The schema lives in csrc/graph_message_passing.cpp; fake kernels let torch.compile / export trace shapes without
# running them (the backward op needs one too, or AOT dispatch fails), and the autograd formula routes the gradient
# through the fused backward op.

def _register_cpp_op() -> None:
    @torch.library.register_fake("structalign::graph_message_passing")
    def _(h_self, h_nbr, logits, indptr, indices, bias):
        _check_fake_args(h_self, h_nbr, logits, indices)
        return h_self.new_empty(h_self.shape)

    @torch.library.register_fake("structalign::graph_message_passing_backward")
    def _(grad_out, h_self, h_nbr, logits, indptr, indices, output_mask):
        _check_fake_args(h_self, h_nbr, logits, indices)
        full = (h_self.shape, h_self.shape, logits.shape, h_self.shape[2:])
        dtypes = (h_self.dtype, h_self.dtype, logits.dtype, h_self.dtype)
        return tuple(h_self.new_empty(shape if need else (0,), dtype=dtype)
                     for need, shape, dtype in zip(output_mask, full, dtypes))

    def setup_context(ctx, inputs, output):
        h_self, h_nbr, logits, indptr, indices, bias = inputs
        ctx.save_for_backward(h_self, h_nbr, logits, indptr, indices)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_out):
        h_self, h_nbr, logits, indptr, indices = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], ctx.has_bias and need[5]]
        grads = torch.ops.structalign.graph_message_passing_backward(grad_out, h_self, h_nbr, logits, indptr,
                                                                     indices, mask)
        gh, gn, gl, gb = (g if m else None for g, m in zip(grads, mask))
        return gh, gn, gl, None, None, gb

    torch.library.register_autograd("structalign::graph_message_passing", backward, setup_context=setup_context)
    torch.library.register_autograd("structalign::graph_message_passing_backward", _no_double_backward,
                                    setup_context=_no_double_backward_context)


if extension_error() is None:
    _register_cpp_op()


# ---- Triton op (structalign_kernels) -----------------------------------------------------------------------------
# Its own custom op because the C++ extension holds the CUDA dispatch key of structalign::graph_message_passing,
# and because torch.compile cannot trace into Triton kernels on the CPU; as an opaque op with a fake kernel it can.

@torch.library.custom_op("structalign::graph_message_passing_triton", mutates_args=())
def graph_message_passing_triton(h_self: Tensor, h_nbr: Tensor, logits: Tensor, indptr: Tensor, indices: Tensor,
                                 in_ptr: Tensor, in_edges: Tensor, edge_row: Tensor, bias: Tensor | None,
                                 max_deg: int, max_in_deg: int) -> tuple[Tensor, Tensor]:
    """Triton forward: returns out (Tensor[B, N, C]) and the softmax kept for the backward (fp32 Tensor[1 or B, E]).

    in_ptr (Tensor[N + 1]), in_edges, edge_row (Tensor[E]): the transposed graph, used by the backward;
    max_deg / max_in_deg: the longest row / the most incoming edges of a node.
    """
    from structalign_kernels.graph_message_passing import graph_message_passing_forward_triton

    return graph_message_passing_forward_triton(h_self, h_nbr, logits, indptr, indices, bias, max_deg)


@graph_message_passing_triton.register_fake
def _(h_self, h_nbr, logits, indptr, indices, in_ptr, in_edges, edge_row, bias, max_deg, max_in_deg):
    _check_fake_args(h_self, h_nbr, logits, indices)
    sets = logits.shape[0] if logits.dim() == 2 else 1
    return h_self.new_empty(h_self.shape), logits.new_empty((sets, indices.shape[0]), dtype=torch.float32)


@torch.library.custom_op("structalign::graph_message_passing_triton_backward", mutates_args=())
def graph_message_passing_triton_backward(grad_out: Tensor, h_self: Tensor, h_nbr: Tensor, attn: Tensor,
                                          indptr: Tensor, indices: Tensor, in_ptr: Tensor, in_edges: Tensor,
                                          edge_row: Tensor, max_deg: int,
                                          max_in_deg: int) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward: grad_h_self, grad_h_nbr (Tensor[B, N, C]) and per-face grad logits (fp32 Tensor[B, E])."""
    from structalign_kernels.graph_message_passing import graph_message_passing_backward_triton

    return graph_message_passing_backward_triton(grad_out, h_self, h_nbr, attn, indptr, indices, in_ptr, in_edges,
                                                 edge_row, max_deg, max_in_deg)


@graph_message_passing_triton_backward.register_fake
def _(grad_out, h_self, h_nbr, attn, indptr, indices, in_ptr, in_edges, edge_row, max_deg, max_in_deg):
    return (h_self.new_empty(h_self.shape), h_self.new_empty(h_self.shape),
            attn.new_empty((h_self.shape[0], indices.shape[0])))


def _triton_setup_context(ctx, inputs, output):
    h_self, h_nbr, logits, indptr, indices, in_ptr, in_edges, edge_row, bias, max_deg, max_in_deg = inputs
    ctx.save_for_backward(h_self, h_nbr, output[1], indptr, indices, in_ptr, in_edges, edge_row)
    ctx.degrees = (max_deg, max_in_deg)
    ctx.per_face = logits.dim() == 2
    ctx.logits_dtype = logits.dtype
    ctx.has_bias = bias is not None


def _triton_backward(ctx, grad_out, grad_attn):
    h_self, h_nbr, attn, indptr, indices, in_ptr, in_edges, edge_row = ctx.saved_tensors
    gh, gn, gl = graph_message_passing_triton_backward(grad_out, h_self, h_nbr, attn, indptr, indices, in_ptr,
                                                       in_edges, edge_row, *ctx.degrees)
    gl = (gl if ctx.per_face else gl.sum(0)).to(ctx.logits_dtype)
    gb = grad_out.sum((0, 1), dtype=torch.float32).to(h_self.dtype) if ctx.has_bias else None
    return gh, gn, gl, None, None, None, None, None, gb, None, None


graph_message_passing_triton.register_autograd(_triton_backward, setup_context=_triton_setup_context)
graph_message_passing_triton_backward.register_autograd(_no_double_backward,
                                                        setup_context=_no_double_backward_context)

_TRANSPOSED: "weakref.WeakKeyDictionary[LandmarkGraph, dict]" = weakref.WeakKeyDictionary()


def _transposed(graph: LandmarkGraph, device: torch.device) -> tuple:
    """(in_ptr, in_edges, edge_row, max_deg, max_in_deg) of the graph on `device`, computed once per graph."""
    per_device = _TRANSPOSED.setdefault(graph, {})
    if device not in per_device:
        in_edges = torch.argsort(graph.indices, stable=True)
        in_count = torch.bincount(graph.indices, minlength=graph.num_nodes)
        in_ptr = torch.cat([in_count.new_zeros(1), in_count.cumsum(0)])
        tensors = tuple(t.to(device) for t in (in_ptr, in_edges, graph.rows))
        per_device[device] = (*tensors, int(graph.indptr.diff().max()), int(in_count.max()))
    return per_device[device]
