"""Exponential moving average of a model's weights (buffers such as BatchNorm statistics are copied)."""
import copy

import torch


class EMA:
    """A frozen copy of `model` whose floating-point parameters track decay * ema + (1 - decay) * model.

    The effective decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates, so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()], 1 - d)
        buffers = list(self.module.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.decay = state["decay"]
        self.updates = state["updates"]
