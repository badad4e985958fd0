"""Optimisers and learning-rate schedules: warm-up, multistep and cosine schedules, linear LR scaling with the global
batch, every optimiser fitting a linear map (fused and not), and LAMB's trust ratio."""
import pytest
import torch

from structalign.engine.config import config_from_dict
from structalign.engine.optim import LAMB, Schedule, build_optimizer, build_scheduler, scaled_lr


def test_schedule_warmup_multistep_cosine():
    step = Schedule("multistep", steps_per_epoch=10, total_steps=100, warmup_steps=5, milestones=(3, 6), gamma=0.1)
    assert step(0) == pytest.approx(0.2) and step(4) == pytest.approx(1.0)
    assert step(29) == 1.0 and step(30) == pytest.approx(0.1) and step(60) == pytest.approx(0.01)
    cos = Schedule("cosine", steps_per_epoch=10, total_steps=100, warmup_steps=0, min_ratio=0.1)
    assert cos(0) == pytest.approx(1.0) and cos(50) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1)


def test_linear_lr_scaling_and_scheduler_state_round_trip():
    cfg = config_from_dict({"optim": {"lr": 0.01, "base_batch_size": 64, "warmup_epochs": 1.0}}).optim
    assert scaled_lr(cfg, 1024) == pytest.approx(0.16)
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, cfg, 0.16)
    sched = build_scheduler(opt, cfg, steps_per_epoch=4, epochs=10)
    for _ in range(3):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer(model, cfg, 0.16)
    sched2 = build_scheduler(opt2, cfg, steps_per_epoch=4, epochs=10)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr() == [pytest.approx(0.16)]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "lamb"])
def test_optimisers_fit_a_linear_map(name, fused):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    model = torch.nn.Linear(4, 1)
    cfg = config_from_dict({"optim": {"name": name, "weight_decay": 0.0, "fused": fused}}).optim
    opt = build_optimizer(model, cfg, 0.05)
    assert bool(opt.defaults.get("fused")) == (fused and name != "lamb")
    first = None
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_lamb_trust_ratio_scales_the_step():
    w = torch.nn.Parameter(torch.full((4, 4), 2.0))
    opt = LAMB([w], lr=0.1)
    w.grad = torch.ones(4, 4)
    opt.step()
    # Adam's first update is 1 per element; the trust ratio ||w|| / ||update|| = 2 doubles it.
    assert torch.allclose(w, torch.full((4, 4), 2.0 - 0.1 * 2.0), atol=1e-5)


def test_lamb_matches_the_per_tensor_formula():
    """The multi-tensor LAMB step equals Adam moments + decoupled decay + trust ratio written per tensor."""
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))
    opt = LAMB([w, b], lr=0.1, weight_decay=0.01)
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = torch.randn(3, 4), torch.randn(4)
    opt.step()
    for p0, p, decay in ((w0, w, True), (b0, b, False)):
        g = p.grad
        update = (0.1 * g / 0.1) / ((0.001 * g * g / 0.001).sqrt() + 1e-6)
        if decay:
            update = update + 0.01 * p0
            update = update * (p0.norm() / update.norm())
        torch.testing.assert_close(p.detach(), p0 - 0.1 * update)
