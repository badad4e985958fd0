"""Config parsing and checking: typed sections, overrides, base + overlay recipes and the shipped recipes (no data, no
training)."""
import json
import os

import pytest
import yaml

import structalign
from structalign.data import AugmentConfig
from structalign.engine.config import ConfigError, config_from_dict, load_config, parse_override

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


CONFIG_DIR = os.path.join(os.path.dirname(structalign.__file__), "configs")
PAPER_RECIPES = ("wflw_lgrn_r34", "300w_lgrn_r34", "cofw_lgrn_r34")


@pytest.mark.parametrize("name", SHIPPED)
def test_recipes_are_one_base_with_overlays(name):
    """The paper recipes are lgrn_r34_base (docs/method.md §1.6; tests/test_method_doc.py checks its values) plus
    their data root and format and their run folder, and resolve to the base with just those three values changed.
    The demo shares almost nothing with them: it stays one standalone file."""
    with open(os.path.join(CONFIG_DIR, f"{name}.yaml")) as f:
        overlay = yaml.safe_load(f)
    if name not in PAPER_RECIPES:
        assert "base" not in overlay
        return
    assert overlay.pop("base") == "lgrn_r34_base"
    assert overlay == {"data": {"root": overlay["data"]["root"], "format": overlay["data"]["format"]},
                       "train": {"out_dir": f"runs/{name}"}}
    expected = load_config("lgrn_r34_base", check_data=False).to_dict()
    expected["data"].update(overlay["data"])
    expected["train"].update(overlay["train"])
    assert load_config(name, check_data=False).to_dict() == expected


def test_paper_recipe_outside_the_method_table_is_the_paper_code():
    """lgrn_r34_base's settings outside the docs/method.md §1.6 table that the paper's code fixes as well: ResNet-34's
    own widths (out4 of C4 = 8 x 64 channels, §1.6), the FC baseline's hidden width 256, no initial checkpoint, no
    warm-up, no gradient clipping, no weight EMA, one optimiser step per batch, and a learning rate that follows the
    global batch linearly from 64 (so 0.01 at the paper's 64)."""
    cfg = load_config("lgrn_r34_base", check_data=False)
    assert (cfg.model.backbone_width, cfg.model.fc_width, cfg.model.init_from) == (64, 256, None)
    assert (cfg.optim.warmup_epochs, cfg.optim.grad_clip, cfg.optim.lr_scaling) == (0.0, 0.0, "linear")
    assert (cfg.train.ema_decay, cfg.train.accumulate) == (0.0, 1)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_train_the_visibility_head_ungated(name):
    """structalign's addition to the paper (docs/method.md §1.4-1.5): every shipped recipe trains the visibility
    head with its loss at weight 0.5 and leaves the adjacency ungated."""
    cfg = load_config(name, check_data=False)
    assert (cfg.model.visibility_head, cfg.model.visibility_gate, cfg.loss.visibility_weight) == (True, False, 0.5)


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


def test_config_error_is_a_user_error():
    from structalign.errors import StructalignError

    with pytest.raises(StructalignError):
        load_config("demo", ["train.epochs=0"], check_data=False)


@pytest.mark.parametrize("name", ["wflw_lgrn_r34", "300w_lgrn_r34", "cofw_lgrn_r34"])
def test_gpu_recipes_set_the_gpu_defaults(name):
    cfg = load_config(name, check_data=False)
    assert (cfg.train.precision, cfg.train.channels_last, cfg.train.cudnn_benchmark) == ("bf16", True, True)
    assert cfg.optim.fused and cfg.train.log_every >= 50
