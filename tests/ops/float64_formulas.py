"""The ops' formulas written densely in float64 from method.md §1.3-1.5 and §2.1, independent of the ops' code: the
oracles that every backend's float64 results are held to (at 1e-10 relative) by the op tests."""
import math

import torch

WING = (2.0, 20.0, 0.5)  # omega1, omega2, epsilon


def gmp_formula(h_self, h_nbr, logits, indptr, indices, bias=None):
    """out_i = sum_j A_ij (h_self_i if j == i else h_nbr_j) + bias, A = softmax over row i, densely in float64."""
    n = indptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n), indptr.diff())
    dense = torch.full((*logits.shape[:-1], n, n), -math.inf, dtype=torch.float64)
    dense[..., rows, indices] = logits.double()
    attn = torch.softmax(dense, dim=-1)
    eye = torch.eye(n, dtype=torch.float64)
    out = (attn * eye) @ h_self.double() + (attn * (1 - eye)) @ h_nbr.double()
    return out if bias is None else out + bias.double()


def rll_formula(pred, target, anchor, indptr, member, weight, landmark_weight, criterion, reduction):
    """criterion(L (pred - target)) with the dense relation matrix L (R x N), reduced, in float64."""
    r, n = anchor.numel(), pred.shape[1]
    owner = torch.repeat_interleave(torch.arange(r), indptr.diff())
    lap = torch.zeros(r, n, dtype=torch.float64)
    lap.index_put_((owner, member), weight.double(), accumulate=True)
    lap[torch.arange(r), anchor] -= 1.0
    d = torch.einsum("rn,bnc->brc", lap, pred.double() - target.double())
    x = d.abs()
    omega1, omega2, epsilon = WING
    elem = {"l1": lambda: x, "mse": lambda: d * d,
            "soft_wing": lambda: torch.where(x < omega1, x, omega2 * torch.log1p(x / epsilon)
                                             + omega1 - omega2 * math.log1p(omega1 / epsilon))}[criterion]()
    rw = None
    if landmark_weight is not None:
        lw = landmark_weight.double()
        prod = torch.ones(lw.shape[0], r, dtype=torch.float64).scatter_reduce(
            1, owner.expand(lw.shape[0], -1), lw[:, member], "prod", include_self=True)
        rw = lw[:, anchor] * prod
        elem = elem * rw.unsqueeze(-1)
    if reduction == "none":
        return elem
    if reduction == "sum" or elem.numel() == 0:
        return elem.sum()
    return elem.mean() if rw is None else elem.sum() / (2 * rw.sum()).clamp_min(1e-12)
