"""The settings of large-batch runs: the learning-rate scaling rules, which tensors LAMB steps with its trust ratio,
the DDP bucket size reaching DDP, and the run plan of benchmarks/large_batch.py (global batch = processes x
micro-batch x accumulation, the LAMB recipe above 32)."""
import importlib.util
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

import structalign.engine.train as train_module
from structalign.engine.config import ConfigError, config_from_dict, load_config
from structalign.engine.optim import LAMB, build_optimizer, scaled_lr

from engine_helpers import tiny_config
from process_group import as_rank, free_port

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
BENCHMARK = os.path.join(BENCHMARKS, "large_batch.py")
NOISE_SCALE_BENCHMARK = os.path.join(BENCHMARKS, "gradient_noise_scale.py")


@pytest.mark.parametrize("rule, factor", [("linear", 32.0), ("sqrt", math.sqrt(32.0))])
def test_learning_rate_follows_the_global_batch_by_the_chosen_rule(rule, factor):
    optim = config_from_dict({"optim": {"lr": 5e-3, "base_batch_size": 32, "lr_scaling": rule}}).optim
    assert scaled_lr(optim, 1024) == pytest.approx(5e-3 * factor)
    assert scaled_lr(optim, 32) == pytest.approx(5e-3)


def test_lamb_steps_a_zero_initialised_weight_as_adam_does_instead_of_keeping_it_near_zero():
    """A zero weight has no scale for a relative step: with the trust ratio it would move by lr once, then by lr
    times its own tiny norm; stepped as Adam does, it moves lr per element every step."""
    zero, twos = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.full((3, 4), 2.0))
    opt = LAMB([zero, twos], lr=0.1)
    for step in (1, 2):
        zero.grad, twos.grad = torch.ones(3, 4), torch.ones(3, 4)
        opt.step()
        # Adam's update is 1 per element while the gradient is constant.
        torch.testing.assert_close(zero.detach(), torch.full((3, 4), -0.1 * step))
    # The non-zero weight keeps the trust ratio: ||w|| / ||update|| = its own scale (2, then 1.8).
    torch.testing.assert_close(twos.detach(), torch.full((3, 4), 2.0 - 0.1 * 2.0 - 0.1 * 1.8))


def test_lamb_recipe_steps_biases_and_the_shape_prior_as_adam_and_layer_weights_by_trust_ratio():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)
            self.shape_prior = torch.nn.Parameter(torch.full((5, 2), 0.5))  # a position: its norm is no scale

    model = Model()
    opt = build_optimizer(model, config_from_dict({"optim": {"name": "lamb", "weight_decay": 0.0}}).optim, lr=0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    moved = {name: before[name] - p.detach() for name, p in model.named_parameters()}
    torch.testing.assert_close(moved["shape_prior"], torch.full((5, 2), 0.1))
    torch.testing.assert_close(moved["layer.bias"], torch.full((4,), 0.1))
    w = before["layer.weight"]
    torch.testing.assert_close(moved["layer.weight"], torch.full((4, 4), 0.1 * float(w.norm()) / 4.0))


def test_ddp_bucket_size_is_checked_by_the_config():
    assert config_from_dict({}).train.ddp_bucket_mb == 25.0  # torch's own default
    with pytest.raises(ConfigError, match="train.ddp_bucket_mb: should be greater than 0"):
        config_from_dict({"train": {"ddp_bucket_mb": 0}})
    with pytest.raises(ConfigError, match="optim.lr_scaling: .*got 'cubic'"):
        config_from_dict({"optim": {"lr_scaling": "cubic"}})


def _rank_recording_the_bucket(rank: int, world: int, port: int, root: str, out: str):
    """One rank of a 2-process run whose DDP wrapper records the bucket cap it was built with."""
    as_rank(rank, world, port)

    class RecordingDDP(train_module.DDP):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            with open(os.path.join(out, f"bucket{rank}.txt"), "w") as f:
                f.write(str(self.bucket_bytes_cap))

    train_module.DDP = RecordingDDP
    cfg = tiny_config(root, out, train={"batch_size": 4, "epochs": 1, "ddp_bucket_mb": 3.0, "eval_every": 1,
                                        "tensorboard": False})
    train_module.train(cfg)


@pytest.mark.slow  # two processes train one epoch: ~25 s on 2 shared cores
def test_ddp_is_built_with_the_configured_bucket_size(synth_root, tmp_path):
    mp.spawn(_rank_recording_the_bucket, args=(2, free_port(), synth_root, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"bucket{r}.txt").read_text() for r in (0, 1)] == [str(3 * 2 ** 20)] * 2


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("large_batch_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("global_batch", [32, 256, 1024])
def test_large_batch_benchmark_splits_each_global_batch_over_processes_and_accumulation(synth_root,
                                                                                        global_batch):
    bench = _benchmark_module()
    args = bench.build_parser().parse_args(["--data", synth_root, "--processes", "2", "--micro-batch", "16",
                                            "--image-size", "64", "--large", "optim.warmup_epochs=2.0"])
    cfg = load_config("demo", bench.run_overrides(global_batch, args))
    assert cfg.train.batch_size * cfg.train.accumulate * args.processes == global_batch
    assert cfg.data.image_size == 64 and cfg.loss.params.omega2 == pytest.approx(5.0)  # the demo's 10 px at 128
    if global_batch == 32:
        assert cfg.optim == load_config("demo", check_data=False).optim
    else:
        assert cfg.optim.name == "lamb" and cfg.optim.warmup_epochs == 2.0
        # The second moment keeps the demo's memory in images: 0.999 per batch of 32.
        assert tuple(cfg.optim.betas) == {256: (0.8, 0.992), 1024: (0.8, 0.968)}[global_batch]


def test_large_batch_benchmark_refuses_a_batch_that_processes_and_micro_batch_do_not_divide(synth_root):
    bench = _benchmark_module()
    args = bench.build_parser().parse_args(["--data", synth_root, "--micro-batch", "24"])
    with pytest.raises(SystemExit, match="global batch 32 is not a multiple of processes x micro-batch = 48"):
        bench.run_overrides(32, args)


def test_gradient_noise_scale_benchmark_recovers_the_noise_scale_of_a_known_problem():
    """Loss 0.5 |w - mean of a batch of x|^2 with x ~ N(mu, sigma^2 I_d): one image's gradient is w - x, so
    |G|^2 = |w - mu|^2 = 16 and tr(Sigma) = d sigma^2 = 256. Estimates from 4 micro-batches of 8 (where the raw
    squared norms are 48 and 24: the noise is half of them) must average to the truth."""
    spec = importlib.util.spec_from_file_location("noise_scale_benchmark", NOISE_SCALE_BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    d, sigma, micro, count, repeats = 64, 2.0, 8, 4, 1500
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.full((d,), 0.5))  # mu = 0
    model.forward = lambda images: (model.w - images.mean(0), None)
    criterion = lambda pred, landmarks, weight, vis, labels: (0.5 * pred.pow(2).sum(), {})  # noqa: E731
    estimates = []
    for _ in range(repeats):
        batches = iter([SimpleNamespace(images=sigma * torch.randn(micro, d), landmarks=None, visibility=None)
                        for _ in range(count)])
        small_sq, big_sq = bench.squared_norms(model, criterion, batches, count, visibility=False)
        estimates.append(bench.unbiased(small_sq, big_sq, micro, micro * count))
    grad_sq, trace = torch.tensor(estimates, dtype=torch.float64).mean(0).tolist()
    assert grad_sq == pytest.approx(16.0, rel=0.05)
    assert trace == pytest.approx(d * sigma ** 2, rel=0.05)
