"""Optimisers (SGD, Adam, AdamW, LAMB), the learning-rate schedule and LR scaling by the global batch.

The schedule is a pure function of the optimiser step (warm-up, then multi-step, cosine or constant), wrapped in a
LambdaLR so that its position is saved and restored with the checkpoint.
"""
import math
from dataclasses import dataclass

import torch

from structalign.engine.config import OptimConfig


class LAMB(torch.optim.Optimizer):
    """Adam moments with a per-tensor trust ratio ||w|| / ||update|| (You et al., ICLR 2020), for large batches.

    The trust ratio and the decoupled weight decay apply to layer weights: tensors of more than one dimension, in a
    group with adapt=True (the default), that are not all zero when first stepped (a tensor that starts at zero has
    no scale for its step to be relative to, and would stay near zero). Every other tensor (biases, norms, groups
    with adapt=False, zero-initialised weights) takes Adam's step.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, adapt=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adapt=adapt))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # Multi-tensor (foreach) kernels: one launch per operation for all tensors of the group.
            beta1, beta2 = group["betas"]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                if "adapt" not in state:  # decided once, at the first step (one host read per tensor)
                    state["adapt"] = group["adapt"] and p.ndim > 1 and bool(p.any())
                state["step"] += 1
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            exp_avg, exp_avg_sq = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
            denom = torch._foreach_div(exp_avg_sq, [1 - beta2 ** s["step"] for s in states])
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["eps"])
            update = torch._foreach_div(exp_avg, [1 - beta1 ** s["step"] for s in states])
            torch._foreach_div_(update, denom)
            adapted = [i for i, s in enumerate(states) if s["adapt"]]
            if adapted:
                weights, updates = [params[i] for i in adapted], [update[i] for i in adapted]
                torch._foreach_add_(updates, weights, alpha=group["weight_decay"])
                w_norm, u_norm = torch.stack(torch._foreach_norm(weights)), torch.stack(torch._foreach_norm(updates))
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                torch._foreach_mul_(updates, list(trust.unbind()))
            torch._foreach_add_(params, update, alpha=-group["lr"])
        return loss


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """cfg.lr at the global batch: lr * global_batch / base_batch_size (cfg.lr_scaling="linear", Goyal et al. 2017)
    or lr * sqrt(global_batch / base_batch_size) ("sqrt", You et al. 2020 for LAMB)."""
    ratio = global_batch / cfg.base_batch_size
    return cfg.lr * (ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The optimiser named by cfg.name over model's trainable parameters, at learning rate lr.

    cfg.fused: torch's fused kernels for sgd/adam/adamw (CUDA and CPU; with them a GradScaler step needs no host
    sync); otherwise torch picks its multi-tensor (foreach) kernels where the parameters allow. LAMB is always foreach.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = cfg.fused or None  # None: torch's default (foreach on CUDA)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "lamb":  # the trust ratio for layer weights; other tensors (the shape prior) step as Adam does
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        weights = [p for name, p in named if name.rsplit(".", 1)[-1] == "weight"]
        others = [p for name, p in named if name.rsplit(".", 1)[-1] != "weight"]
        groups = [{"params": weights}] + ([{"params": others, "adapt": False}] if others else [])
        return LAMB(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name: unknown optimiser {cfg.name!r}")


@dataclass
class Schedule:
    """LR factor at an optimiser step: linear warm-up, then multi-step decay, cosine decay or constant.

    A callable object rather than a closure, so LambdaLR's state_dict keeps it as plain data.
    """

    kind: str
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    milestones: tuple = ()
    gamma: float = 0.1
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "multistep":
            epoch = step // self.steps_per_epoch
            return self.gamma ** sum(epoch >= m for m in self.milestones)
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0


def build_scheduler(optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int):
    """LambdaLR over `Schedule`, stepped once per optimiser step."""
    schedule = Schedule(kind=cfg.schedule, steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * epochs,
                        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch), milestones=tuple(cfg.milestones),
                        gamma=cfg.gamma, min_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
