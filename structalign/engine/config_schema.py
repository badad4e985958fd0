"""What a run configuration is: frozen pydantic sections, each field with its type, range and default, and
config_from_dict, which checks nested dicts against them (structalign.engine.config reads files and overrides).

data.augment is structalign.data.AugmentConfig itself (its own range checks run on construction); loss.params holds
the keyword parameters of the point loss that loss.name names, read from that loss's constructor
(structalign.losses.POINT_LOSSES). A mistake raises ConfigError with one line naming the key: the first of pydantic's
errors.
"""
import dataclasses
import inspect
from typing import Annotated, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, SerializeAsAny, Strict, StrictBool,
                      ValidationError, create_model, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from structalign.data import AugmentConfig
from structalign.errors import StructalignError
from structalign.losses import POINT_LOSSES
from structalign.models.resnet import ARCHS

Int, Float = Annotated[int, Strict()], Annotated[float, Strict()]  # no bools, no strings, no 2.0 for an int


class ConfigError(StructalignError, ValueError):
    """A config file, key or value that cannot be used (a ValueError too, for callers that catch that)."""


def only_known_keys(raw, known):
    """`raw`, or the error naming its first key outside `known` (pydantic's extra="forbid" error lists no others)."""
    for key in raw if isinstance(raw, dict) else ():
        if key not in known:
            raise PydanticCustomError("unknown_key", "unknown key {key}", {"key": key, "known": sorted(known)})
    return raw


class Section(BaseModel):
    """A frozen section: unknown keys (named with the known ones), wrong types and values out of range are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _only_known_keys(cls, raw):
        return only_known_keys(raw, cls.model_fields)


class DataConfig(Section):
    root: str = "data/wflw"
    format: Literal["wflw", "300w", "cofw", "coco", "xml", "list"] = "wflw"  # reader of data.open_dataset
    scheme: str | None = None  # landmark scheme file (YAML) or shipped name; None = the format's (README "Schemes")
    train_split: str = "train"
    test_split: str = "test"
    val_fraction: Float = Field(0.05, ge=0, lt=1)  # carved from the train split; the test split never selects models
    image_size: Int = Field(256, ge=32)  # crop side in pixels: the backbone has stride 32
    loader: Literal["dali", "reference"] = "dali"
    num_threads: Int = Field(2, ge=0)  # loader worker threads/processes (reference: 0 = in the training process)
    balance: Literal[None, "pdb"] = None  # pdb: pose-based data balancing
    augment: Annotated[AugmentConfig | None, BeforeValidator(  # None: no augmentation
        lambda raw: only_known_keys(raw, [f.name for f in dataclasses.fields(AugmentConfig)]))] = AugmentConfig()
    on_error: Literal["raise", "skip"] = "raise"  # a bad annotation or image stops the run, or is skipped and listed
    crop_padding: Float = Field(1.5, gt=0)  # crop side / face box side (structalign.data.CROP_PADDING; README "Data")
    face_box: Literal["annotation", "landmarks"] = "annotation"  # the format's face box | the tight landmark box
    out_of_crop: Literal["supervise", "ignore"] = "supervise"  # whether landmarks outside the crop are trained on


class ModelConfig(Section):
    """What the model is, its architecture (every field but RUN_SETTINGS: a checkpoint stores them, with the scheme
    and data.image_size, to rebuild its modules; structalign.models.build_model reads them), and how a run starts
    and runs it (RUN_SETTINGS)."""

    arch: Literal["lgrn", "fc"] = "lgrn"  # map-to-node + L-GRN head | the FC-regression baseline
    backbone: Literal[tuple(ARCHS)] = "resnet34"
    head_width: Int = Field(128, gt=0)
    num_blocks: Int = Field(4, ge=0)
    adjacency: Literal["static", "dynamic"] = "static"
    map_to_node: Literal["base", "multiscale"] = "base"
    backbone_width: Int = Field(64, gt=0)  # stage-1 channels
    bn_momentum: Float = Field(0.1, gt=0, le=1)  # backbone BatchNorm (the paper's code used 0.01)
    fc_width: Int = Field(256, gt=0)  # hidden width of the FC baseline
    visibility_head: StrictBool = True  # predict P(visible) per landmark (trained on the data's visibility labels)
    visibility_gate: StrictBool = False  # L-GRN: scale each neighbour's edge weight by its P(visible)^learned
    backbone_weights: str | None = None  # a new run's backbone initialisation (a local state_dict file)
    init_from: str | None = None  # fine-tune: start from this checkpoint's trained model (not a resume)
    op_backend: Literal[None, "auto", "reference", "cpp", "triton"] = None  # None: the global default
    init_mean_shape: StrictBool = True  # start the learned shape prior at the training set's mean shape

    @model_validator(mode="after")
    def _gate_needs_its_inputs(self):
        if self.visibility_gate and (self.arch != "lgrn" or not self.visibility_head):
            raise ValueError("visibility_gate needs arch=lgrn and visibility_head=true")
        return self


# The ModelConfig fields that say how a run starts or runs the model, not what it is (not in checkpoints).
RUN_SETTINGS = ("backbone_weights", "init_from", "op_backend", "init_mean_shape")
ARCHITECTURE_FIELDS = tuple(name for name in ModelConfig.model_fields if name not in RUN_SETTINGS)


def _loss_params(loss: type) -> type[Section]:
    """The keyword parameters of a point loss as a section: names and defaults from its constructor, each a scale > 0
    (every parameter of structalign.losses is; its constructors check the same)."""
    params = inspect.signature(loss).parameters.values()
    return create_model(f"{loss.__name__}Params", __base__=Section,
                        **{p.name: (Float, Field(p.default, gt=0)) for p in params if p.default is not p.empty})


LOSS_PARAMS = {name: _loss_params(loss) for name, loss in POINT_LOSSES.items()}


class LossConfig(Section):
    name: Literal[tuple(POINT_LOSSES)] = "soft_wing"
    relative: Literal["laplacian", None] = "laplacian"
    relative_weight: Float = Field(1.0, ge=0)
    visibility_weight: Float = Field(0.5, ge=0)  # binary cross-entropy of the visibility head, on labelled points
    params: SerializeAsAny[Section] = Field(default_factory=dict, validate_default=True)  # a LOSS_PARAMS[name]

    @field_validator("params", mode="before")
    @classmethod
    def _params_of_the_loss(cls, raw, info):
        name = info.data.get("name")  # absent when the name failed its own check (that error comes first)
        return LOSS_PARAMS[name].model_validate(raw) if name in LOSS_PARAMS else raw

    def criterion_args(self) -> dict:
        """The keyword arguments of structalign.losses.build_criterion that this section sets."""
        return {"name": self.name, "relative": self.relative, "relative_weight": self.relative_weight,
                "visibility_weight": self.visibility_weight, **self.params.model_dump()}


class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw", "lamb"] = "sgd"
    lr: Float = Field(0.01, gt=0)  # at base_batch_size; scaled with the global batch by lr_scaling
    base_batch_size: Int = Field(64, gt=0)
    lr_scaling: Literal["linear", "sqrt"] = "linear"  # lr * (global batch / base_batch_size) ** (1 or 1/2)
    momentum: Float = Field(0.9, ge=0)
    betas: tuple[Float, Float] = (0.9, 0.999)
    weight_decay: Float = Field(5e-4, ge=0)
    grad_clip: Float = Field(0.0, ge=0)  # max global grad norm; 0 = off
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: tuple[Int, ...] = (200, 350)  # epochs (multistep)
    gamma: Float = Field(0.2, ge=0)
    warmup_epochs: Float = Field(0.0, ge=0)
    min_lr_ratio: Float = Field(0.0, ge=0)  # cosine floor as a fraction of lr
    fused: StrictBool = False  # one fused kernel updates all tensors (sgd, adam, adamw; lamb always runs foreach)

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, milestones):
        if list(milestones) != sorted(milestones):
            raise ValueError(f"must be increasing, got {list(milestones)}")
        return milestones


class TrainConfig(Section):
    out_dir: str = "runs/wflw_lgrn_r34"
    epochs: Int = Field(500, gt=0)
    batch_size: Int = Field(64, gt=0)  # per process
    accumulate: Int = Field(1, gt=0)  # micro-batches per optimiser step
    eval_every: Int = Field(2, gt=0)  # epochs
    eval_batch_size: Int = Field(128, gt=0)
    log_every: Int = Field(50, gt=0)  # steps
    save_every: Int = Field(0, ge=0)  # steps between mid-epoch checkpoints; 0 = at epoch ends only
    seed: Int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast, fp16 with a GradScaler; CUDA only
    sync_bn: StrictBool = False  # SyncBatchNorm under DDP (CUDA only)
    ddp_bucket_mb: Float = Field(25.0, gt=0)  # DDP gradient bucket size in MiB (bucket_cap_mb; torch's default 25)
    ema_decay: Float = Field(0.0, ge=0, lt=1)  # 0 = no EMA of the weights
    channels_last: StrictBool = False  # NHWC weights and activations: the layout of cuDNN's fastest tensor-core kernels
    cudnn_benchmark: StrictBool = False  # cuDNN times its algorithms once per input shape (training shapes are fixed)
    compile: StrictBool = False  # torch.compile the whole model (fullgraph, custom ops included)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # reduce-overhead: CUDA graphs
    progress: StrictBool = True  # tqdm progress bar on the main rank (when stderr is a terminal)
    tensorboard: StrictBool = True  # TensorBoard scalars beside log.jsonl (torch.utils.tensorboard)
    dist_timeout_s: Float = Field(300.0, gt=0)  # DDP: the longest wait for the other ranks (rendezvous, collectives)
    preempt_grace_s: Float = Field(25.0, gt=0)  # SIGTERM/Ctrl-C: save at a sync point within this, else exit unsaved


class Config(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict:
        """Nested plain values {section: {key: value}} (tuples stay tuples); config_from_dict(c.to_dict()) == c."""
        return self.model_dump()


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """A checked Config from nested dicts {section: {key: value}}; missing keys take the defaults."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:  # the first error, in one line
        err = exc.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")  # optim.betas[1]
        ctx = err.get("ctx", {})
        if err["type"] == "unknown_key":
            what = f"key {where}.{ctx['key']}" if where else f"section {ctx['key']!r}"
            raise ConfigError(f"{source}: unknown {what}; known: {ctx['known']}") from None
        says = err["msg"].removeprefix("Input ")  # "should be greater than 0"
        says = ctx["error"] if err["type"] == "value_error" else f"{says[0].lower()}{says[1:]}, got {err['input']!r}"
        raise ConfigError(f"{source}: {where + ': ' if where else ''}{says}") from None
