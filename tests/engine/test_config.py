"""Config parsing and checking (typed sections, base + overlay recipes), LR schedules, optimisers, EMA and checkpoint
files (no data, no training)."""
import dataclasses
import json
import os

import pytest
import torch
import yaml

import structalign
from structalign.data import AugmentConfig
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
    assert cfg.loss.params.model_dump() == {"omega1": 2.0, "omega2": 20.0, "epsilon": 0.5}
    assert (cfg.loss.relative, cfg.loss.relative_weight) == ("laplacian", 1.0)


def test_overrides_are_typed():
    cfg = load_config("demo", ["optim.lr=1e-3", "optim.milestones=[3, 5]", "train.epochs=3", "data.balance=null",
                               "train.sync_bn=true"], check_data=False)
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.milestones == (3, 5) and cfg.train.epochs == 3 and cfg.data.balance is None and cfg.train.sync_bn


@pytest.mark.parametrize("override, match", [
    ("train.epoch=3", "unknown key train.epoch"),
    ("trian.epochs=3", "unknown section 'trian'"),
    ("train.epochs=three", "train.epochs: should be a valid integer, got 'three'"),
    ("train.epochs=2.0", "train.epochs: should be a valid integer, got 2.0"),
    ("train.epochs=0", "demo.yaml: train.epochs: should be greater than 0, got 0"),
    ("optim.name=rmsprop", "optim.name: should be 'sgd', 'adam', 'adamw' or 'lamb', got 'rmsprop'"),
    ("data.val_fraction=1.5", "data.val_fraction: should be less than 1, got 1.5"),
    ("optim.milestones=[5, 3]", r"optim.milestones: must be increasing, got \[5, 3\]"),
    ("optim.betas=[0.9, true]", r"optim.betas\[1\]: should be a valid number, got True"),
    ("optim.lr=.inf", "optim.lr: should be a finite number, got inf"),
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
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(str(bad))
    assert "\n" not in str(info.value)  # one line, however PyYAML words it
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


RECIPES = os.path.join(os.path.dirname(__file__), "fixtures", "recipes_before_issue13.json")
# Keys added later, with the values every shipped config has.
ADDED_IN_ISSUE14 = {"model": {"visibility_head": True, "visibility_gate": False}, "loss": {"visibility_weight": 0.5}}


@pytest.mark.parametrize("name", SHIPPED)
def test_recipes_are_one_base_with_overlays_and_unchanged(name):
    """The paper recipes are lgrn_r34_base plus a few lines each, and every shipped config reads as it did before
    (values recorded from the config code before issue 13; data.augment {} there meant AugmentConfig's defaults)."""
    with open(RECIPES) as f:
        expected = json.load(f)[name]
    expected["data"]["augment"] = dataclasses.asdict(AugmentConfig(**expected["data"]["augment"]))
    expected["model"].update(ADDED_IN_ISSUE14["model"])
    expected["loss"].update(ADDED_IN_ISSUE14["loss"])
    if name == "demo":  # the best variant of the issue-14 ablation
        expected["model"]["adjacency"] = "dynamic"
    assert json.loads(json.dumps(load_config(name, check_data=False).to_dict())) == json.loads(json.dumps(expected))
    if name != "demo":  # the demo shares almost nothing with the ResNet-34 recipes: it stays one standalone file
        path = os.path.join(os.path.dirname(structalign.__file__), "configs", f"{name}.yaml")
        with open(path) as f:
            overlay = yaml.safe_load(f)
        assert overlay.pop("base") == "lgrn_r34_base"
        assert overlay == {"data": {"root": overlay["data"]["root"], "format": overlay["data"]["format"]},
                           "train": {"out_dir": f"runs/{name}"}}


def test_base_and_overlay_merge_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {name: sgd, lr: 0.1, milestones: [5, 9]}\n"
                                        "data: {augment: {rotation: 10.0, flip: 0.0}, image_size: 64}\n")
    (tmp_path / "mid.yaml").write_text("base: base\noptim: {lr: 0.2}\ndata: {augment: {flip: 0.5}}\n")
    (tmp_path / "top.toml").write_text('base = "mid.yaml"\n[optim]\nmilestones = [7]\n')
    cfg = load_config(str(tmp_path / "top.toml"), ["data.augment.scale=[0.8, 1.2]"], check_data=False)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.milestones, cfg.data.image_size) == ("sgd", 0.2, (7,), 64)
    assert (cfg.data.augment.rotation, cfg.data.augment.flip, cfg.data.augment.scale) == (10.0, 0.5, (0.8, 1.2))
    assert cfg.data.augment.occlusion == AugmentConfig().occlusion  # unset keys keep AugmentConfig's defaults
    (tmp_path / "base.yaml").write_text("base: top.toml\n")
    with pytest.raises(ConfigError, match=r"base.yaml: base: .*top.toml is this config or one it is based on") as info:
        load_config(str(tmp_path / "top.toml"), check_data=False)
    assert "\n" not in str(info.value)
    (tmp_path / "lost.yaml").write_text("base: nowhere_base\n")
    with pytest.raises(ConfigError, match="config 'nowhere_base': no such file"):
        load_config(str(tmp_path / "lost.yaml"), check_data=False)
    (tmp_path / "shipped.yaml").write_text("base: demo\ntrain: {epochs: 1}\n")  # a shipped config as the base
    cfg = load_config(str(tmp_path / "shipped.yaml"), check_data=False)
    assert cfg.train.epochs == 1 and cfg.optim == load_config("demo", check_data=False).optim


def test_augment_is_an_augment_config_checked_when_the_config_loads():
    cfg = load_config("demo", ["data.augment.flip=0.0"], check_data=False)
    assert cfg.data.augment == AugmentConfig(rotation=20.0, flip=0.0)  # demo.yaml's rotation, the override's flip
    assert load_config("demo", ["data.augment=null"], check_data=False).data.augment is None
    for override, match in [
        ("data.augment.rotaton=3", r"unknown key data.augment.rotaton; known: \['brightness', .*'rotation'"),
        ("data.augment.rotation=-1", "data.augment: AugmentConfig.rotation must be >= 0, got -1"),
        ("data.augment.scale=[1.2, 0.8]", r"data.augment: AugmentConfig.scale must be \(lo, hi\) with 0 < lo <= hi"),
        ("data.augment.flip=often", "data.augment.flip: should be a valid number, .*got 'often'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config("demo", [override], check_data=False)


def test_loss_params_are_typed_by_the_loss_name():
    from structalign.losses import AdaptiveWingLoss, WingLoss

    cfg = load_config("demo", ["loss.name=wing", "loss.params={epsilon: 3}"], check_data=False)
    assert cfg.loss.params.model_dump() == {"omega": WingLoss().omega, "epsilon": 3.0}  # the loss's own defaults
    params = config_from_dict({"loss": {"name": "adaptive_wing"}}).loss.params
    assert (params.alpha, params.theta) == (AdaptiveWingLoss().alpha, AdaptiveWingLoss().theta)
    assert config_from_dict({"loss": {"name": "l1"}}).loss.params.model_dump() == {}
    for overrides, match in [
        (["loss.params.omega=1"], r"unknown key loss.params.omega; known: \['epsilon', 'omega1', 'omega2'\]"),
        (["loss.name=wing"], r"unknown key loss.params.omega1; known: \['epsilon', 'omega'\]"),  # demo's soft_wing ones
        (["loss.params.omega1=0"], "loss.params.omega1: should be greater than 0, got 0"),
        (["loss.params.epsilon=small"], "loss.params.epsilon: should be a valid number, got 'small'"),
        (["loss.name=hinge"], "loss.name: should be 'soft_wing', 'wing', 'adaptive_wing', 'l1' or 'mse', got 'hinge'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config("demo", overrides, check_data=False)


@pytest.mark.parametrize("name", SHIPPED)
def test_config_round_trips_through_to_dict_and_is_frozen(name):
    cfg = load_config(name, check_data=False)
    assert config_from_dict(cfg.to_dict()) == cfg
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))) == cfg
    with pytest.raises(Exception, match="frozen"):
        cfg.loss.params.omega1 = 1.0


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
