"""The exponential moving average of a model's weights: tracked parameters with the warm-up decay, copied buffers."""
import torch

from structalign.engine.ema import EMA


def test_ema_tracks_and_copies_buffers():
    model = torch.nn.BatchNorm1d(2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(7.0)
    ema.update(model)  # effective decay min(0.5, 2 / 11)
    d = 2 / 11
    assert torch.allclose(ema.module.weight, torch.full((2,), d * 1.0 + (1 - d) * 3.0))
    assert torch.equal(ema.module.running_mean, model.running_mean)
