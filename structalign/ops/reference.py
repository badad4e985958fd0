"""Plain PyTorch definitions of the ops: the specification, the tests' oracle and the eager baseline.

Two forms per op:
  *_reference  sparse (gather / index_add over the E edges or R relations), autograd by PyTorch, accumulates in fp32;
  *_dense      the formulation of the paper's code (dense N x N softmax and matmuls; dense delta tensors), kept as
               the "eager" baseline of benchmarks/ops.py and checked against the reference in the tests.
"""
import math

import torch

# The relative-location loss's criteria and reductions; a name's index is its integer code in the C++ / CUDA op
# (csrc/relative_location_loss_math.h) and the Triton kernels (kernels/relative_location_loss.py), whose copies
# tests/ops/test_op_codes.py checks.
CRITERIA = ("soft_wing", "l1", "mse")
REDUCTIONS = ("mean", "sum", "none")


def _edge_rows(indptr: torch.Tensor) -> torch.Tensor:
    n = indptr.numel() - 1
    return torch.repeat_interleave(torch.arange(n, device=indptr.device), indptr.diff())


def acc_dtype(*tensors) -> torch.dtype:
    """Accumulation dtype of the ops: float64 when any of the (floating) tensors is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _to(dtype, *tensors):
    return [None if t is None else t.to(dtype) for t in tensors]


def edge_softmax_reference(logits: torch.Tensor, indptr: torch.Tensor) -> torch.Tensor:
    """Softmax of logits (Tensor[E] or Tensor[B, E]) within each row of the CSR graph; same shape as logits."""
    rows = _edge_rows(indptr)
    n = indptr.numel() - 1
    flat = logits.reshape(-1, logits.shape[-1])
    idx = rows.expand_as(flat)
    peak = torch.full((flat.shape[0], n), -math.inf, dtype=flat.dtype, device=flat.device)
    peak = peak.scatter_reduce(1, idx, flat, "amax", include_self=True)
    ex = torch.exp(flat - peak.gather(1, idx))
    den = torch.zeros_like(peak).index_add(1, rows, ex)
    return (ex / den.gather(1, idx)).reshape(logits.shape)


def graph_message_passing_reference(h_self, h_nbr, logits, indptr, indices, bias=None):
    """out_i = A_ii h_self_i + sum_{j in N(i), j != i} A_ij h_nbr_j (+ bias), A = row softmax of logits.

    h_self, h_nbr (Tensor[B, N, C]); logits (Tensor[E] shared, or Tensor[B, E] per face); indptr (Tensor[N + 1]),
    indices (Tensor[E]) as in LandmarkGraph; bias (Tensor[C] or None). Returns Tensor[B, N, C] in h_self's dtype,
    computed in float64 for float64 features and in float32 otherwise (logits cast to that dtype).
    """
    dtype = h_self.dtype
    h_self, h_nbr, logits, bias = _to(acc_dtype(h_self), h_self, h_nbr, logits, bias)
    rows = _edge_rows(indptr)
    attn = edge_softmax_reference(logits, indptr)
    if attn.dim() == 1:
        attn = attn.unsqueeze(0)
    is_self = (indices == rows).view(1, -1, 1)
    values = torch.where(is_self, h_self[:, rows], h_nbr[:, indices])  # [B, E, C]
    out = torch.zeros_like(h_self).index_add(1, rows, attn.unsqueeze(-1) * values)
    if bias is not None:
        out = out + bias
    return out.to(dtype)


def graph_conv_reference(x, weight, logits, indptr, indices, bias=None, batch_norm=None, relu=False, residual=None,
                         aggregate=graph_message_passing_reference):
    """One graph-convolution layer of the L-GRN head, unfused: the layer as the model computed it before graph_conv.

    out = relu?(BatchNorm(aggregate(x W_self, x W_nbr, logits, bias))) (+ residual); x (Tensor[B, N, F]), weight
    (Tensor[2, F, C]), batch_norm: None or F.batch_norm's (running_mean, running_var, weight, bias, training,
    momentum, eps) over the B * N rows; residual (Tensor[B, N, C] or None). aggregate(h_self, h_nbr, logits, indptr,
    indices, bias) is the message passing (this module's, or a fused backend's).
    """
    h_self = torch.matmul(x, weight[0])
    h_nbr = torch.matmul(x, weight[1])
    y = aggregate(h_self, h_nbr, logits, indptr, indices, None if bias is None else bias.to(h_self.dtype))
    if batch_norm is not None:
        y = torch.nn.functional.batch_norm(y.reshape(-1, y.shape[-1]), *batch_norm).view(y.shape)
    if relu:
        y = torch.relu(y)
    return y if residual is None else residual + y


def graph_message_passing_dense(h_self, h_nbr, logits, indptr, indices, bias=None):
    """The paper code's SemGraphConv aggregation: -9e15-filled dense logits, N x N softmax, two batched matmuls."""
    n = indptr.numel() - 1
    rows = _edge_rows(indptr)
    lead = logits.shape[:-1]
    dense = torch.full((*lead, n, n), -9e15, dtype=logits.dtype, device=logits.device)
    dense[..., rows, indices] = logits
    attn = torch.softmax(dense, dim=-1)
    eye = torch.eye(n, dtype=attn.dtype, device=attn.device)
    out = torch.matmul(attn * eye, h_self) + torch.matmul(attn * (1 - eye), h_nbr)
    return out if bias is None else out + bias


def criterion_reference(d: torch.Tensor, criterion: str, omega1: float, omega2: float, epsilon: float):
    """Element-wise criterion of a residual d: soft_wing (method.md §2.1), l1 or mse."""
    if criterion == "l1":
        return d.abs()
    if criterion == "mse":
        return d * d
    if criterion == "soft_wing":
        x = d.abs()
        b = omega1 - omega2 * math.log1p(omega1 / epsilon)
        return torch.where(x < omega1, x, omega2 * torch.log1p(x / epsilon) + b)
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


def relation_weight_reference(landmark_weight, anchor, indptr, member):
    """Weight of each relation (Tensor[B, R]): w[anchor] times the product of w over its members."""
    r = anchor.numel()
    owner = torch.repeat_interleave(torch.arange(r, device=indptr.device), indptr.diff())
    lw = landmark_weight.to(acc_dtype(landmark_weight))
    prod = torch.ones(lw.shape[0], r, dtype=lw.dtype, device=lw.device)
    prod = prod.scatter_reduce(1, owner.expand(lw.shape[0], -1), lw[:, member], "prod", include_self=True)
    return lw[:, anchor] * prod


def _reduce(elem, rel_weight, reduction):
    """elem (Tensor[B, R, 2]); rel_weight (Tensor[B, R] or None)."""
    if rel_weight is not None:
        elem = elem * rel_weight.unsqueeze(-1)
    if reduction == "none":
        return elem
    if reduction == "sum":
        return elem.sum()
    if reduction == "mean":
        if elem.numel() == 0:
            return elem.sum()  # the mean over no relation (an empty batch) is 0, not nan
        if rel_weight is None:
            return elem.mean()
        return elem.sum() / (2 * rel_weight.sum()).clamp_min(1e-12)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def relative_location_loss_reference(pred, target, anchor, indptr, member, weight, landmark_weight=None,
                                     criterion="soft_wing", omega1=2.0, omega2=20.0, epsilon=0.5, reduction="mean"):
    """criterion(delta_r(pred) - delta_r(target)), delta_r(P) = sum_m weight_m P[member_m] - P[anchor_r].

    pred, target (Tensor[B, N, 2]); anchor (Tensor[R]), indptr (Tensor[R + 1]), member, weight (Tensor[M]) as in
    RelationSet; landmark_weight (Tensor[B, N] or None): a relation counts with w[anchor] * prod w[members].
    reduction "mean" (over B x R x 2, or weighted mean), "sum", or "none" (Tensor[B, R, 2]). Computed and returned
    in float64 when pred or target is float64, else in float32.
    """
    acc = acc_dtype(pred, target)
    err = pred.to(acc) - target.to(acc)
    owner = torch.repeat_interleave(torch.arange(anchor.numel(), device=indptr.device), indptr.diff())
    delta = torch.zeros(err.shape[0], anchor.numel(), 2, dtype=err.dtype, device=err.device)
    delta = delta.index_add(1, owner, weight.to(err.dtype).view(1, -1, 1) * err[:, member]) - err[:, anchor]
    elem = criterion_reference(delta, criterion, omega1, omega2, epsilon)
    rel_w = None if landmark_weight is None else relation_weight_reference(landmark_weight.to(acc), anchor, indptr,
                                                                            member)
    return _reduce(elem, rel_w, reduction)


def relative_location_loss_dense(pred, target, anchor, indptr, member, weight, landmark_weight=None,
                                 criterion="soft_wing", omega1=2.0, omega2=20.0, epsilon=0.5, reduction="mean"):
    """Unfused formulation: dense relation matrix L (R x N) applied to pred and to target separately, as the
    paper's LaplacianLoss does (delta tensors of both built), then the criterion on their difference."""
    r, n = anchor.numel(), pred.shape[1]
    acc = acc_dtype(pred, target)
    owner = torch.repeat_interleave(torch.arange(r, device=indptr.device), indptr.diff())
    lap = torch.zeros(r, n, dtype=acc, device=pred.device)
    lap.index_put_((owner, member), weight.to(acc), accumulate=True)
    lap[torch.arange(r, device=pred.device), anchor] -= 1.0
    delta_pred = torch.matmul(lap, pred.to(acc))
    delta_target = torch.matmul(lap, target.to(acc))
    elem = criterion_reference(delta_pred - delta_target, criterion, omega1, omega2, epsilon)
    rel_w = None if landmark_weight is None else relation_weight_reference(landmark_weight.to(acc), anchor, indptr,
                                                                            member)
    return _reduce(elem, rel_w, reduction)
