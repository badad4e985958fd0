"""Mixed precision: the autocast context of a run's `train.precision` on its device (training, evaluation, predict)."""
from contextlib import nullcontext
from functools import partial

import torch


def autocast_for(precision: str, device: torch.device):
    """A context factory: bf16/fp16 autocast on CUDA, nothing on CPU (CPU autocast slows these convolutions)."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext
    return partial(torch.autocast, "cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
