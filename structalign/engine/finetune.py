"""Fine-tuning: a new run starts from another run's trained model (`model.init_from: CKPT`).

Unlike `--resume`, which continues a run (same settings, optimiser and data position), init_from only copies weights:
backbone, neck, head and shape prior (the EMA weights when the checkpoint has them), matched by name and shape.
Entries indexed by landmark or graph edge (`LandmarkRegressor.point_indexed_keys`) are copied only when both schemes
are the same, since under another scheme the same index means another point.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from structalign.engine.checkpoint import load_checkpoint
from structalign.landmarks import resolve_scheme


@dataclass
class Transfer:
    """What init_from copied: loaded keys, and (key, reason) for each state-dict entry left at its initialisation."""

    source: str
    weights: str
    loaded: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def lines(self) -> list[str]:
        """A short human-readable account: one summary line, then one line per group of skipped entries."""
        out = [f"init_from {self.source} ({self.weights} weights): {len(self.loaded)} entries loaded, "
               f"{len(self.skipped)} re-initialised"]
        by_reason: dict = {}
        for key, reason in self.skipped:
            by_reason.setdefault(reason, []).append(key)
        for reason, keys in by_reason.items():
            shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            out.append(f"  re-initialised ({reason}): {shown}")
        return out


def init_from_checkpoint(model: torch.nn.Module, path: str) -> Transfer:
    """Copy a checkpoint's trained weights into model (a LandmarkRegressor, before training) where they fit."""
    state = load_checkpoint(path, map_location="cpu")
    ema = state.get("ema")
    weights, which = (ema["module"], "ema") if ema is not None else (state["model"], "model")
    source_scheme = resolve_scheme(state["model_args"]["scheme"])
    same_scheme = source_scheme == model.scheme
    point_indexed = set(model.point_indexed_keys())
    own = model.state_dict()
    transfer, matched = Transfer(path, which), {}
    for key, target in own.items():
        if key not in weights:
            transfer.skipped.append((key, "not in the checkpoint"))
        elif tuple(weights[key].shape) != tuple(target.shape):
            transfer.skipped.append((key, "shape differs"))
        elif key in point_indexed and not same_scheme:
            transfer.skipped.append((key, f"landmark scheme differs: {source_scheme.name} -> {model.scheme.name}"))
        else:
            matched[key] = weights[key]
    model.load_state_dict(matched, strict=False)
    transfer.loaded = sorted(matched)
    return transfer
