"""Config parsing and checking, LR schedules, optimisers, EMA and checkpoint files (no data, no training)."""
import os

import pytest
import torch

from structalign.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from structalign.engine.config import ConfigError, config_from_dict, load_config, parse_override
from structalign.engine.ema import EMA
from structalign.engine.optim import LAMB, Schedule, build_optimizer, build_scheduler, scaled_lr

SHIPPED = ("wflw_lgrn_r34", "300w_lgrn_r34", "cofw_lgrn_r34", "demo")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    cfg = load_config(name, check_data=False)
    assert cfg.train.epochs > 0 and cfg.data.image_size % 32 == 0


def test_wflw_config_is_the_paper_recipe():
    cfg = load_config("wflw_lgrn_r34", check_data=False)
    model = (cfg.model.arch, cfg.model.backbone, cfg.data.image_size, cfg.data.balance)
    assert model == ("lgrn", "resnet34", 256, "pdb")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.01, 0.9, 5e-4)
    assert (cfg.optim.milestones, cfg.optim.gamma, cfg.train.epochs, cfg.train.batch_size) == ((200, 350), 0.2, 500, 64)
    assert cfg.loss.params == {"omega1": 2.0, "omega2": 20.0, "epsilon": 0.5}
    assert (cfg.loss.relative, cfg.loss.relative_weight) == ("laplacian", 1.0)


def test_overrides_are_typed():
    cfg = load_config("demo", ["optim.lr=1e-3", "optim.milestones=[3, 5]", "train.epochs=3", "data.balance=null",
                               "train.sync_bn=true"], check_data=False)
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.milestones == (3, 5) and cfg.train.epochs == 3 and cfg.data.balance is None and cfg.train.sync_bn


@pytest.mark.parametrize("override, match", [
    ("train.epoch=3", "unknown key train.epoch"),
    ("trian.epochs=3", "unknown section 'trian'"),
    ("train.epochs=three", "train.epochs: expected int"),
    ("train.epochs=0", "train.epochs: must be > 0"),
    ("optim.name=rmsprop", "optim.name: 'rmsprop' is not one of"),
    ("data.val_fraction=1.5", r"data.val_fraction: must be in \[0.0, 1.0\)"),
    ("optim.milestones=[5, 3]", "milestones must be increasing"),
    ("train.epochs", "expected section.key=value"),
    ("epochs=3", "expected section.key=value"),
])
def test_bad_overrides_are_reported(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("demo", [override], check_data=False)


def test_missing_data_root_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="data.root: .*nowhere.* is not a directory"):
        load_config("demo", [f"data.root={tmp_path / 'nowhere'}"])


def test_unknown_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no shipped config of that name"):
        load_config("no_such_config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    flat = tmp_path / "flat.yaml"
    flat.write_text("epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown section 'epochs'"):
        load_config(str(flat), check_data=False)


def test_toml_config(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[optim]\nname = "adamw"\nlr = 0.002\n[train]\nepochs = 4\n')
    cfg = load_config(str(path), check_data=False)
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.epochs) == ("adamw", 0.002, 4)


def test_defaults_and_parse_override():
    cfg = config_from_dict({"train": {"epochs": 2}})
    assert cfg.train.epochs == 2 and cfg.optim.lr == 0.01 and cfg.optim.betas == (0.9, 0.999)
    assert parse_override("optim.betas=[0.8, 0.9]") == ("optim", "betas", [0.8, 0.9])


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


def test_checkpoint_round_trip_with_rng(tmp_path):
    path = tmp_path / "ck.pt"
    torch.manual_seed(3)
    state = {"model": {"w": torch.arange(3.0)}, "model_args": {"arch": "fc"}, "config": {}, "rng": rng_state()}
    expected = torch.rand(2)
    save_checkpoint(str(path), state)
    loaded = load_checkpoint(str(path))
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(2), expected)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(str(path), {"model": {}, "model_args": {}, "config": {}, "step": 1})
    with pytest.raises(Exception):
        save_checkpoint(str(path), {"model": {}, "model_args": {}, "config": {}, "bad": lambda: 0})
    assert load_checkpoint(str(path))["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_load_refuses_pickled_code_and_bad_files(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Payload(), "model_args": {}, "config": {}}, evil)
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(str(evil))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(str(junk))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match=r"missing \['model', 'model_args', 'config'\]"):
        load_checkpoint(str(other))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "none.pt"))


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


def test_config_error_is_a_user_error():
    from structalign.errors import StructalignError

    with pytest.raises(StructalignError):
        load_config("demo", ["train.epochs=0"], check_data=False)


@pytest.mark.parametrize("name", ["wflw_lgrn_r34", "300w_lgrn_r34", "cofw_lgrn_r34"])
def test_gpu_recipes_set_the_gpu_defaults(name):
    cfg = load_config(name, check_data=False)
    assert (cfg.train.precision, cfg.train.channels_last, cfg.train.cudnn_benchmark) == ("bf16", True, True)
    assert cfg.optim.fused and cfg.train.log_every >= 50


def test_checkpoint_mode_follows_the_umask_and_stale_temporaries_go(tmp_path):
    stale = tmp_path / ".tmp-abc123.pt"
    stale.write_bytes(b"x" * 100)  # a save killed before its rename
    old = os.umask(0o022)
    try:
        save_checkpoint(str(tmp_path / "ck.pt"), {"model": {}, "model_args": {}, "config": {}})
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]
    assert (tmp_path / "ck.pt").stat().st_mode & 0o777 == 0o644


def test_checkpoint_directory_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((os.path.realpath(f"/proc/self/fd/{fd}"), os.path.isdir(f"/proc/self/fd/{fd}"),
                       os.path.exists(tmp_path / "ck.pt")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    save_checkpoint(str(tmp_path / "ck.pt"), {"model": {}, "model_args": {}, "config": {}})
    assert synced[-1] == (str(tmp_path.resolve()), True, True)  # the directory, after the rename
