"""Run configuration: frozen dataclasses read from YAML or TOML (data, never executed), with checked overrides.

    cfg = load_config("wflw_lgrn_r34.yaml", ["optim.lr=0.02", "train.epochs=10"])

A config name without a path resolves to the configs shipped in structalign/configs/. Unknown sections or keys, values
of the wrong type or out of range, and a missing data root raise ConfigError before any work starts.
"""
import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources

import yaml

from structalign.errors import StructalignError


class ConfigError(StructalignError, ValueError):
    """A config file, key or value that cannot be used (a ValueError too, for callers that catch that)."""


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/wflw"
    format: str = "wflw"  # reader of structalign.data.open_dataset: wflw | 300w | cofw | coco | xml | list
    scheme: str | None = None  # landmark scheme file (YAML) or shipped name; None = the format's (README "Schemes")
    train_split: str = "train"
    test_split: str = "test"
    val_fraction: float = 0.05  # carved from the train split; the test split is never used for model selection
    image_size: int = 256
    loader: str = "dali"  # dali | reference
    num_threads: int = 2  # loader worker threads/processes (reference: 0 = in the training process)
    balance: str | None = None  # None | pdb (pose-based data balancing)
    augment: dict | None = field(default_factory=dict)  # kwargs of structalign.data.AugmentConfig; null = off
    on_error: str = "raise"  # raise | skip: a bad annotation or image stops the run, or is skipped and listed
    crop_padding: float = 1.5  # crop side / face box side (structalign.data.CROP_PADDING; README "Data")
    face_box: str = "annotation"  # annotation (the format's face box) | landmarks (the tight landmark box)
    out_of_crop: str = "supervise"  # supervise | ignore: whether landmarks outside the crop are trained on


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "lgrn"  # lgrn | fc
    backbone: str = "resnet34"
    head_width: int = 128
    num_blocks: int = 4
    adjacency: str = "static"  # static | dynamic
    map_to_node: str = "base"  # base | multiscale
    backbone_width: int = 64  # stage-1 channels
    bn_momentum: float = 0.1  # backbone BatchNorm (the paper's code used 0.01)
    fc_width: int = 256  # hidden width of the FC baseline
    backbone_weights: str | None = None
    init_from: str | None = None  # fine-tune: start from this checkpoint's trained model (not a resume)
    op_backend: str | None = None  # None (global default) | auto | reference | cpp | triton
    init_mean_shape: bool = True  # start the learned shape prior at the training set's mean shape


@dataclass(frozen=True)
class LossConfig:
    name: str = "soft_wing"
    relative: str | None = "laplacian"
    relative_weight: float = 1.0
    params: dict = field(default_factory=dict)  # criterion parameters, e.g. omega1, omega2, epsilon


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw | lamb
    lr: float = 0.01  # at base_batch_size; scaled linearly by the global batch
    base_batch_size: int = 64
    momentum: float = 0.9
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 5e-4
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    schedule: str = "multistep"  # multistep | cosine | constant
    milestones: tuple = (200, 350)  # epochs (multistep)
    gamma: float = 0.2
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    fused: bool = False  # one fused kernel updates all tensors (sgd, adam, adamw; lamb always runs foreach kernels)


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "runs/wflw_lgrn_r34"
    epochs: int = 500
    batch_size: int = 64  # per process
    accumulate: int = 1  # micro-batches per optimiser step
    eval_every: int = 2  # epochs
    eval_batch_size: int = 128
    log_every: int = 50  # steps
    save_every: int = 0  # steps between mid-epoch checkpoints; 0 = at epoch ends only
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast, fp16 with a GradScaler; CUDA only)
    sync_bn: bool = False  # SyncBatchNorm under DDP (CUDA only)
    ema_decay: float = 0.0  # 0 = no EMA of the weights
    channels_last: bool = False  # NHWC weights and activations: the layout of cuDNN's fastest tensor-core kernels
    cudnn_benchmark: bool = False  # cuDNN times its algorithms once per input shape (training shapes are fixed)
    compile: bool = False  # torch.compile the whole model (fullgraph, custom ops included)
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs: static shapes) | max-autotune
    progress: bool = True  # tqdm progress bar on the main rank (when stderr is a terminal)
    tensorboard: bool = True  # TensorBoard scalars beside log.jsonl (torch.utils.tensorboard)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "data.format": ("wflw", "300w", "cofw", "coco", "xml", "list"),
    "data.loader": ("dali", "reference"),
    "data.balance": (None, "pdb"),
    "data.on_error": ("raise", "skip"),
    "data.face_box": ("annotation", "landmarks"),
    "data.out_of_crop": ("supervise", "ignore"),
    "model.arch": ("lgrn", "fc"),
    "model.adjacency": ("static", "dynamic"),
    "model.map_to_node": ("base", "multiscale"),
    "model.op_backend": (None, "auto", "reference", "cpp", "triton"),
    "loss.relative": (None, "laplacian"),
    "optim.name": ("sgd", "adam", "adamw", "lamb"),
    "optim.schedule": ("multistep", "cosine", "constant"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune"),
}
POSITIVE = {"data.image_size", "model.head_width", "model.backbone_width", "model.bn_momentum", "model.fc_width",
            "optim.lr", "optim.base_batch_size", "train.epochs", "train.batch_size", "train.accumulate",
            "train.eval_every", "train.eval_batch_size", "train.log_every", "data.crop_padding"}
NON_NEGATIVE = {"data.num_threads", "model.num_blocks", "optim.momentum", "optim.weight_decay", "optim.grad_clip",
                "optim.gamma", "optim.warmup_epochs", "optim.min_lr_ratio", "loss.relative_weight", "train.save_every",
                "train.seed"}
UNIT_INTERVAL = {"data.val_fraction": (0.0, 1.0), "train.ema_decay": (0.0, 1.0)}


_ACCEPTS = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, (str, int)) and not isinstance(v, bool),
    tuple: lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v),
    dict: lambda v: isinstance(v, dict),
}


def _coerce(where: str, value, kind):
    """`value` as type `kind` (from the dataclass annotation), or ConfigError naming `where`."""
    args = typing.get_args(kind)
    if type(None) in args:
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
    kind = typing.get_origin(kind) or kind
    if kind is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if not _ACCEPTS[kind](value):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    return kind(value)


def _check_value(where: str, value) -> None:
    if where in CHOICES and value not in CHOICES[where]:
        raise ConfigError(f"{where}: {value!r} is not one of {CHOICES[where]}")
    if where in POSITIVE and not value > 0:
        raise ConfigError(f"{where}: must be > 0, got {value!r}")
    if where in NON_NEGATIVE and not value >= 0:
        raise ConfigError(f"{where}: must be >= 0, got {value!r}")
    if where in UNIT_INTERVAL:
        lo, hi = UNIT_INTERVAL[where]
        if not lo <= value < hi:
            raise ConfigError(f"{where}: must be in [{lo}, {hi}), got {value!r}")


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """A checked Config from nested dicts {section: {key: value}}; missing keys take the defaults."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    built = {}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section {name!r}; known: {sorted(sections)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping, got {value!r}")
        cls = sections[name].default_factory
        hints = typing.get_type_hints(cls)
        for key in value:
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {name}.{key}; known: {sorted(hints)}")
        kwargs = {key: _coerce(f"{source}: {name}.{key}", v, hints[key]) for key, v in value.items()}
        for key, v in kwargs.items():
            _check_value(f"{name}.{key}", v)
        built[name] = cls(**kwargs)
    cfg = Config(**built)
    if list(cfg.optim.milestones) != sorted(cfg.optim.milestones):
        raise ConfigError(f"{source}: optim.milestones must be increasing, got {cfg.optim.milestones}")
    return cfg


def parse_override(text: str) -> tuple[str, str, object]:
    """"section.key=value" -> (section, key, value parsed as a YAML scalar or list)."""
    name, sep, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. optim.lr=0.02")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse the value ({exc})") from None
    return section, key, parsed


def resolve_config_path(name: str) -> str:
    """A path as given if it exists, else a config shipped in structalign/configs (with or without .yaml)."""
    if os.path.exists(name):
        return name
    shipped = resources.files("structalign") / "configs"
    for candidate in (name, name + ".yaml"):
        path = shipped / candidate
        if path.is_file():
            return str(path)
    known = sorted(p.name for p in shipped.iterdir() if p.name.endswith((".yaml", ".toml")))
    raise ConfigError(f"config {name!r}: no such file, and no shipped config of that name; shipped: {known}")


def load_config(name: str, overrides=(), check_data: bool = True) -> Config:
    """Read a YAML/TOML config, apply `section.key=value` overrides and check it (data root too, if asked)."""
    path = resolve_config_path(name)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f) if path.endswith(".toml") else yaml.safe_load(f)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'TOML' if path.endswith('.toml') else 'YAML'}: {exc}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        raw[section][key] = value
    cfg = config_from_dict(raw, source=path)
    if check_data:
        check_data_root(cfg)
    return cfg


def check_data_root(cfg: Config) -> None:
    if not os.path.isdir(cfg.data.root):
        raise ConfigError(f"data.root: {cfg.data.root!r} is not a directory (render the built-in data with "
                          f"`structalign data synth {cfg.data.root}` or point data.root at your dataset)")
