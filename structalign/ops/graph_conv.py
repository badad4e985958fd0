"""graph_conv: one graph-convolution layer of the L-GRN head, everything but its matrix product fused.

    h = x @ [W_self | W_nbr]                                  one GEMM, Tensor[B * N, 2C]
    y = graph_message_passing(h[..., :C], h[..., C:], logits) + bias       (the halves read in place)
    out = relu?(BatchNorm(y)) (+ residual)

Backends: reference (structalign.ops.reference.graph_conv_reference: two matmuls, the reference message passing,
F.batch_norm, relu, residual: the layer as the model computed it before this op), cpp (torch.mm, then
torch.ops.structalign.graph_conv from structalign._C, CPU and CUDA: aggregation, bias, BatchNorm, relu and residual
in one op, its backward one op too), triton (the unfused layer over the Triton message-passing kernel: the fused
layer has no Triton kernel of its own, the CUDA one serves GPUs). BatchNorm's training statistics are exact (the
batch's mean and biased variance over the B * N rows); the running statistics are updated here as
nn.BatchNorm1d updates them. Given a process group (nn.SyncBatchNorm's, see batch_norm_group) the statistics are those
of the global batch, on every backend and device (gloo or NCCL): the backend computes the aggregation and bias, one
all-reduce per layer sums the count, sum and sum of squares of its rows over the group (in float64), and the
normalisation, relu and residual follow as torch ops; the backward all-reduces the gradients of those sums
(nn.SyncBatchNorm's sum_dy and sum_dy_xmu), and the running statistics take the global unbiased variance.

    python -m pytest -q tests/ops/test_graph_conv.py
"""
from typing import NamedTuple

import torch
import torch.distributed as dist

from structalign.ops.backend import extension_error, resolve_backend
from structalign.ops.fused import register_fused
from structalign.ops.graph import LandmarkGraph
from structalign.ops.graph_message_passing import graph_message_passing
from structalign.ops.reference import acc_dtype, graph_conv_reference

OP = "graph_conv"
NORM_NONE, NORM_BATCH, NORM_GIVEN = 0, 1, 2  # the ops' `norm` argument (csrc/graph_conv.h)


class BatchNormArgs(NamedTuple):
    """The BatchNorm after the aggregation, as F.batch_norm takes it (running statistics may be None)."""

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    training: bool
    momentum: float
    eps: float


def batch_norm_args(bn: torch.nn.modules.batchnorm._BatchNorm) -> BatchNormArgs:
    """What bn.forward would hand F.batch_norm now, with the same bookkeeping (num_batches_tracked += 1 in
    training; momentum None: the cumulative average)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return BatchNormArgs(bn.running_mean if track else None, bn.running_var if track else None, bn.weight, bn.bias,
                         training, momentum, bn.eps)


def batch_norm_group(bn: torch.nn.modules.batchnorm._BatchNorm, sync: bool = False):
    """The process group over whose global batch `bn`'s training statistics are taken, as nn.SyncBatchNorm.forward
    chooses it: for an nn.SyncBatchNorm (its process_group, default all processes) or with `sync` (all processes),
    in training, under an initialised torch.distributed with more than one process in the group. None otherwise
    (this process's batch)."""
    if not ((sync or isinstance(bn, torch.nn.SyncBatchNorm)) and bn.training and dist.is_available()
            and dist.is_initialized()):
        return None
    group = getattr(bn, "process_group", None) or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _check_inputs(x, weight, logits, graph, bias, batch_norm, residual):
    if not isinstance(graph, LandmarkGraph):
        raise TypeError(f"graph must be a LandmarkGraph, got {type(graph).__name__}")
    for name, t in (("x", x), ("weight", weight), ("logits", logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if x.dim() != 3 or x.shape[1] != graph.num_nodes:
        raise ValueError(f"x must have shape [B, {graph.num_nodes}, F] for this graph, got {list(x.shape)}")
    if weight.dim() != 3 or weight.shape[0] != 2 or weight.shape[1] != x.shape[2]:
        raise ValueError(f"weight must have shape [2, {x.shape[2]}, C] (W_self, W_nbr), got {list(weight.shape)}")
    b, c = x.shape[0], weight.shape[2]
    if logits.shape not in (torch.Size([graph.num_edges]), torch.Size([b, graph.num_edges])):
        raise ValueError(f"logits must have shape [{graph.num_edges}] (shared) or [{b}, {graph.num_edges}] "
                         f"(per face), got {list(logits.shape)}")
    channel = [("bias", bias)]
    if batch_norm is not None:
        if not isinstance(batch_norm, BatchNormArgs):
            raise TypeError(f"batch_norm must be a BatchNormArgs, got {type(batch_norm).__name__}")
        channel += [("batch_norm.running_mean", batch_norm.running_mean),
                    ("batch_norm.running_var", batch_norm.running_var), ("batch_norm.weight", batch_norm.weight),
                    ("batch_norm.bias", batch_norm.bias)]
        if not batch_norm.training and (batch_norm.running_mean is None or batch_norm.running_var is None):
            raise ValueError("batch_norm with training=False normalises with running_mean and running_var: give both")
        if batch_norm.training and x.shape[0] * x.shape[1] <= 1:
            raise ValueError(f"BatchNorm in training needs more than one value per channel, got B * N = "
                             f"{x.shape[0] * x.shape[1]}")
    for name, t in channel:
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != torch.Size([c])):
            raise ValueError(f"{name} must be a tensor of shape [{c}], got {getattr(t, 'shape', type(t))}")
    if residual is not None and (not isinstance(residual, torch.Tensor) or residual.shape != (*x.shape[:2], c)):
        raise ValueError(f"residual must have shape {[*x.shape[:2], c]}, got {getattr(residual, 'shape', None)}")
    for name, t in [("weight", weight), ("logits", logits), ("residual", residual)] + channel:
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def graph_conv(x: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor, graph: LandmarkGraph,
               bias: torch.Tensor | None = None, batch_norm: BatchNormArgs | None = None, relu: bool = False,
               residual: torch.Tensor | None = None, backend: str | None = None,
               process_group: "dist.ProcessGroup | None" = None) -> torch.Tensor:
    """One graph convolution (SemGraphConv, method.md §1.3) with its BatchNorm, relu and residual add.

    x (Tensor[B, N, F]); weight (Tensor[2, F, C]: W_self, W_nbr); logits (Tensor[E] shared, or Tensor[B, E] per
    face); graph: LandmarkGraph with N nodes, E edges; bias (Tensor[C] or None); batch_norm (BatchNormArgs or None:
    BatchNorm over the B * N rows, running statistics updated in training as nn.BatchNorm1d does); relu: apply
    ReLU after the normalisation; residual (Tensor[B, N, C] or None): added last; process_group (a torch.distributed
    group or None): in training, BatchNorm's statistics are those of the global batch of the group's processes
    (every process calls the layer; module docstring). Returns Tensor[B, N, C] in the matrix product's dtype (x's,
    or autocast's).
    """
    _check_inputs(x, weight, logits, graph, bias, batch_norm, residual)
    if process_group is not None and batch_norm is not None and batch_norm.training:
        y = graph_conv(x, weight, logits, graph, bias, backend=backend)
        return _global_batch_norm(y, batch_norm, process_group, relu, residual)
    device = x.device
    name = _resolve(backend, device)
    if name != "cpp":
        kwargs = {"aggregate": _triton_aggregate(graph)} if name == "triton" else {}
        indptr, indices = graph.tensors(device)
        return graph_conv_reference(x, weight, logits, indptr, indices, bias, batch_norm, relu, residual, **kwargs)
    b, n, f = x.shape
    c = weight.shape[2]
    # [W_self | W_nbr] (Tensor[F, 2C]): one copy of the weights; its gradient flows back as one copy too.
    w_cat = weight.permute(1, 0, 2).reshape(f, 2 * c)
    h = torch.mm(x.reshape(b * n, f), w_cat).view(b, n, 2 * c)
    norm, nw, nb, mean, var, eps = NORM_NONE, None, None, None, None, 0.0
    if batch_norm is not None:
        norm = NORM_BATCH if batch_norm.training else NORM_GIVEN
        nw, nb, eps = batch_norm.weight, batch_norm.bias, batch_norm.eps
        if norm == NORM_GIVEN:
            mean, var = batch_norm.running_mean, batch_norm.running_var
    out, _, batch_mean, batch_var = _APPLY["cpp"](
        h, logits, *graph.tensors(device), *graph.transposed(device), None if bias is None else bias.to(h.dtype), nw,
        nb, mean, var, residual, norm, eps, relu, graph.max_deg, graph.max_in_deg)
    if norm == NORM_BATCH and batch_norm.running_mean is not None:
        _update_running_stats(batch_norm, batch_mean, batch_var, b * n)
    return out


def _triton_aggregate(graph: LandmarkGraph):
    """The reference layer's aggregate argument running the Triton message-passing kernel over `graph`."""
    def aggregate(h_self, h_nbr, logits, indptr, indices, bias):
        return graph_message_passing(h_self, h_nbr, logits, graph, bias, backend="triton")

    return aggregate


class _GlobalSums(torch.autograd.Function):
    """The sums of a group's rows: one all-reduce of one packed float64 tensor each way.

    forward(rows (Tensor[R, C], this process's), group) -> Tensor[2C + 1] float64: the sum and the sum of squares of
    the rows of every process in the group, then their count. The backward all-reduces the gradients of the sums
    before applying them to this process's rows. In float64, the variance E[y^2] - E[y]^2 is off by about 1e-16
    (mean / spread)^2 relative (measured on fp32 rows: 1e-12 at a mean 100 spreads from 0, 2e-4 at 1e6).
    """

    @staticmethod
    def forward(ctx, rows, group):
        wide = rows.to(torch.float64)
        packed = torch.cat([wide.sum(0), wide.square().sum(0), wide.new_full((1,), rows.shape[0])])
        dist.all_reduce(packed, group=group)
        ctx.save_for_backward(rows)
        ctx.group = group
        return packed

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        c = rows.shape[1]
        return (grad[:c] + 2 * rows.to(torch.float64) * grad[c:2 * c]).to(rows.dtype), None


def _global_batch_norm(y: torch.Tensor, batch_norm: BatchNormArgs, process_group, relu: bool,
                       residual: torch.Tensor | None) -> torch.Tensor:
    """relu?(BatchNorm(y)) (+ residual) for y (Tensor[B, N, C]) with the mean and biased variance of the rows of
    every process in process_group (nn.SyncBatchNorm's); the running statistics take the global unbiased variance.
    Normalises in the accumulation dtype; returns y's dtype."""
    c, acc = y.shape[-1], acc_dtype(y)
    sums = _GlobalSums.apply(y.reshape(-1, c), process_group)
    count = sums[2 * c]
    mean = sums[:c] / count
    var = (sums[c:2 * c] / count - mean.square()).clamp_min(0)
    if batch_norm.running_mean is not None:
        _update_running_stats(batch_norm, mean, var, count)
    scale = torch.rsqrt(var + batch_norm.eps).to(acc)
    if batch_norm.weight is not None:
        scale = scale * batch_norm.weight.to(acc)
    out = (y.to(acc) - mean.to(acc)) * scale
    if batch_norm.bias is not None:
        out = out + batch_norm.bias.to(acc)
    if relu:
        out = torch.relu(out)
    out = out.to(y.dtype)
    return out if residual is None else residual + out


@torch.no_grad()
def _update_running_stats(batch_norm: BatchNormArgs, mean: torch.Tensor, var: torch.Tensor,
                          rows: int | torch.Tensor) -> None:
    """running = (1 - momentum) running + momentum batch, with the unbiased variance over `rows` rows (as
    nn.BatchNorm1d)."""
    m = batch_norm.momentum
    batch_norm.running_mean.mul_(1 - m).add_(mean.to(batch_norm.running_mean.dtype), alpha=m)
    unbiased = var * (rows / (rows - 1))
    batch_norm.running_var.mul_(1 - m).add_(unbiased.to(batch_norm.running_var.dtype), alpha=m)


@torch.compiler.assume_constant_result
def _resolve(backend: str | None, device: torch.device) -> str:
    # Chosen once per trace under torch.compile (reads the global setting and the dispatcher's registry).
    return resolve_backend(backend, device, OP)


# ---- the fused pair ---------------------------------------------------------------------------------------------
# forward(h, logits, indptr, indices, in_ptr, in_edges, edge_row, bias, norm_weight, norm_bias, mean, var, residual,
#         norm, eps, relu, max_deg, max_in_deg) -> (out, y, batch_mean, batch_var)
# backward(grad_out, h, y, logits, indptr, indices, in_ptr, in_edges, edge_row, norm_weight, norm_bias, mean, var,
#          norm, eps, relu, max_deg, max_in_deg, output_mask) -> (grad_h, grad_logits, grad_bias, grad_norm_weight,
#          grad_norm_bias). Schemas: csrc/graph_conv.cpp.

def _fake_forward(h, logits, indptr, indices, in_ptr, in_edges, edge_row, bias, norm_weight, norm_bias, mean, var,
                  residual, norm, eps, relu, max_deg, max_in_deg):
    torch._check(h.dim() == 3 and h.shape[2] % 2 == 0, lambda: f"h must have shape [B, N, 2C], got {list(h.shape)}")
    torch._check(logits.shape[-1] == indices.shape[0], lambda: "logits must have one entry per edge")
    b, n, c = h.shape[0], h.shape[1], h.shape[2] // 2
    stats = h.new_empty((c if norm == NORM_BATCH else 0,), dtype=acc_dtype(h))
    return (h.new_empty(b, n, c), h.new_empty((b, n, c) if norm != NORM_NONE or relu else (0,)), stats,
            torch.empty_like(stats))


def _fake_backward(grad_out, h, y, logits, indptr, indices, in_ptr, in_edges, edge_row, norm_weight, norm_bias, mean,
                   var, norm, eps, relu, max_deg, max_in_deg, output_mask):
    c = h.shape[2] // 2
    full = [(h.shape, h.dtype), (logits.shape, logits.dtype), ((c,), h.dtype),
            ((c,), norm_weight.dtype if norm_weight is not None else h.dtype),
            ((c,), norm_bias.dtype if norm_bias is not None else h.dtype)]
    return tuple(h.new_empty(shape if need else (0,), dtype=dtype) for need, (shape, dtype) in zip(output_mask, full))


def _setup_context(ctx, inputs, output):
    (h, logits, indptr, indices, in_ptr, in_edges, edge_row, bias, norm_weight, norm_bias, mean, var, residual, norm,
     eps, relu, max_deg, max_in_deg) = inputs
    _, y, batch_mean, batch_var = output
    if norm == NORM_BATCH:
        mean, var = batch_mean, batch_var
    ctx.save_for_backward(h, y, logits, indptr, indices, in_ptr, in_edges, edge_row, norm_weight, norm_bias, mean,
                          var)
    ctx.args = (norm, eps, relu, max_deg, max_in_deg)
    ctx.present = (bias is not None, norm_weight is not None, norm_bias is not None, residual is not None)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward_formula(ctx, grad_out, *unused):
    need = ctx.needs_input_grad
    has_bias, has_nw, has_nb, has_res = ctx.present
    mask = [need[0], need[1], has_bias and need[7], has_nw and need[8], has_nb and need[9]]
    if grad_out is None:
        return (None,) * 18
    gh = gl = gb = gnw = gnb = None
    if any(mask):
        grads = torch.ops.structalign.graph_conv_backward(grad_out, *ctx.saved_tensors, *ctx.args, mask)
        gh, gl, gb, gnw, gnb = (g if m else None for g, m in zip(grads, mask))
    grad_residual = grad_out if has_res and need[12] else None
    return (gh, gl, None, None, None, None, None, gb, gnw, gnb, None, None, grad_residual, None, None, None, None,
            None)


_APPLY = {}  # backend -> the forward op with its autograd formula (register_fused's apply)

if extension_error() is None and hasattr(torch.ops.structalign, OP):
    _APPLY["cpp"] = register_fused(f"structalign::{OP}", f"structalign::{OP}_backward", _setup_context,
                                   _backward_formula, _fake_forward, _fake_backward)
