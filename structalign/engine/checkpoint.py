"""Training checkpoints: one `TrainState` saves and restores a run; files are written atomically (temporary file,
fsync, os.replace, fsync of the directory) and loaded without executing pickled code.

A checkpoint is a dict of tensors and plain Python values:
    model, ema (state dicts of the uncompiled, unwrapped modules; ema may be None), model_args (the architecture:
    model_args()), optimizer, scheduler, scaler (state dicts), epoch, batch
    (the next batch of that epoch), step, best_nme, best_epoch, rng (per rank: CPU/CUDA torch, numpy, python
    states), config (Config.to_dict()).
"""
import glob
import math
import os
import pickle
import random
import re
import uuid
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pydantic import ValidationError

from structalign.engine.config import Config, ConfigError
from structalign.engine.config_schema import ARCHITECTURE_FIELDS, ModelConfig
from structalign.engine.distributed import DistEnv, all_reduce_sum, from_main
from structalign.errors import InputError, MissingFileError
from structalign.landmarks import LandmarkScheme, resolve_scheme
from structalign.models import build_model, from_old_backbone_keys

# Settings the data position of a checkpoint depends on (batches per epoch, sample order, validation split).
RESUME_FIXED = ("train.batch_size", "train.accumulate", "train.seed", "data.val_fraction")
# What older checkpoints that lack these model_args keys were built with (the other architecture fields they lack take
# the config's defaults, which build_model's were): no visibility modules.
OLDER_ARCHITECTURE = {"visibility_head": False, "visibility_gate": False}
TEMPORARY_PATTERN = ".tmp-*.pt"


class CheckpointError(InputError):
    """A checkpoint file that cannot be used (corrupt, not a structalign checkpoint, a different model)."""


class CheckpointNotFoundError(CheckpointError, MissingFileError):
    """A checkpoint path that does not exist."""


def model_args(model_cfg: ModelConfig, scheme: LandmarkScheme, image_size: int) -> dict:
    """A checkpoint's model_args, what rebuilds its modules: the config's architecture fields, the scheme's content
    (a checkpoint needs no scheme file) and the side the network runs at."""
    return {**model_cfg.model_dump(include=set(ARCHITECTURE_FIELDS)), "scheme": scheme.to_dict(),
            "image_size": image_size}


def architecture(saved_args: dict) -> dict:
    """A checkpoint's model_args as model_args() writes them: the keys older checkpoints lack filled in, and the keys
    they had that are not the architecture (backbone_weights, op_backend) left out."""
    keys = (*ARCHITECTURE_FIELDS, "scheme", "image_size")
    return {**ModelConfig().model_dump(include=set(ARCHITECTURE_FIELDS)), **OLDER_ARCHITECTURE,
            **{k: v for k, v in saved_args.items() if k in keys}}


def build_from_args(saved_args: dict, op_backend: str | None = None) -> torch.nn.Module:
    """The (untrained) model a checkpoint's model_args describe; op_backend: backend of the graph op."""
    args = architecture(saved_args)
    missing = [k for k in ("scheme", "image_size") if k not in args]
    if missing:
        raise CheckpointError(f"the checkpoint's model_args lack {missing}")
    try:
        model_cfg = ModelConfig(**{k: args[k] for k in ARCHITECTURE_FIELDS}, op_backend=op_backend)
    except ValidationError as exc:
        why = exc.errors()[0]
        raise CheckpointError(f"the checkpoint's model_args do not describe a model: {why['loc']}: {why['msg']}") \
            from None
    return build_model(model_cfg, resolve_scheme(args["scheme"]), args["image_size"])


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"train": {"seed": 0}} -> {"train.seed": 0}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not prefix:
            out.update(_flat(value, f"{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out


def check_resume(saved: dict, cfg: Config, scheme: LandmarkScheme, world_size: int, path: str) -> list:
    """ConfigError when checkpoint `saved` cannot continue the run of cfg on data of this scheme; else a warning line
    per changed setting (the run goes on with this config's value)."""
    old_args = architecture(saved["model_args"])
    old_scheme, new_scheme = resolve_scheme(old_args.pop("scheme")), scheme
    args = {k: v for k, v in model_args(cfg.model, scheme, cfg.data.image_size).items() if k != "scheme"}
    if old_scheme != new_scheme:
        raise ConfigError(f"--resume {path}: the checkpoint's landmark scheme {old_scheme.name} "
                          f"({old_scheme.num_points} points) differs from the data's {new_scheme.name} "
                          f"({new_scheme.num_points} points); fine-tune with model.init_from instead")
    if old_args != args:
        diff = ", ".join(f"{k} {old_args.get(k)!r} -> {args.get(k)!r}" for k in args if old_args.get(k) != args[k])
        raise ConfigError(f"--resume {path}: the checkpoint holds a different model ({diff}); resume with the "
                          f"checkpoint's model settings or start a new run")
    old, new = _flat(saved["config"]), _flat(cfg.to_dict())
    where = f"epoch {saved['epoch']}, batch {saved['batch']}"
    for key in RESUME_FIXED:
        if old.get(key) != new[key]:
            raise ConfigError(f"--resume {path}: {key} changed from {old.get(key)!r} to {new[key]!r}, but the "
                              f"checkpoint's data position ({where}) depends on it; resume with "
                              f"{key}={old.get(key)!r} or start a new run")
    saved_world = len(saved["rng"])
    if saved_world != world_size:
        raise ConfigError(f"--resume {path}: the checkpoint was written by {saved_world} process(es), this run has "
                          f"{world_size}; the data shards and the global batch depend on it")
    return [f"{key} changed from {old[key]!r} to {value!r} (this run's value is used)" if key in old else
            f"{key} is not in the checkpoint's config (an older version); this run uses {value!r}"
            for key, value in new.items() if old.get(key, object()) != value]


def remove_stale_temporaries(directory: str) -> list:
    """Delete the `.tmp-*.pt` files a killed save left in directory; returns their paths."""
    stale = glob.glob(os.path.join(glob.escape(directory), TEMPORARY_PATTERN))
    for path in stale:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    return stale


def save_checkpoint(path: str, state: dict) -> None:
    """Write state to path so that a crash leaves either the old file or the new one, never a torn one.

    The file gets the usual mode (0666 less the umask); temporaries of earlier killed saves are removed first.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(directory)
    tmp = os.path.join(directory, TEMPORARY_PATTERN.replace("*", uuid.uuid4().hex))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint with weights_only=True (plain tensors and containers only); clear errors for bad files."""
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # the weights_only unpickler refused (torch's text invites unsafe loading)
        code = re.search(r"GLOBAL (\S+)", str(exc))
        why = (f": refused, as loading it would import {code[1]}; checkpoints are loaded as tensors and plain values "
               f"only, never by running code from a file" if code else
               " (corrupt or not a structalign checkpoint): it holds something other than tensors and plain values")
        raise CheckpointError(f"checkpoint {path!r} cannot be read{why}") from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path!r} cannot be read (corrupt or not a structalign checkpoint): "
                              f"{exc}") from None
    missing = [k for k in ("model", "model_args", "config") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} is not a structalign checkpoint: missing {missing}")
    # Checkpoints with the backbone's stem / stage module names load under torchvision's names.
    if isinstance(state["model"], dict):
        state["model"] = from_old_backbone_keys(state["model"])
    if isinstance(state.get("ema"), dict) and isinstance(state["ema"].get("module"), dict):
        state["ema"]["module"] = from_old_backbone_keys(state["ema"]["module"])
    return state


def resumed_checkpoint(resume: str | None, out_dir: str, env: DistEnv) -> dict | None:
    """The checkpoint a run continues from (the same file on every rank), its path under "path"; None for a new run.
    resume: a path, "auto" (out_dir/last.pt where rank 0 finds it, else a new run) or None."""
    if resume == "auto":  # rank 0 decides, so that every rank continues from the same checkpoint
        last = os.path.join(out_dir, "last.pt")
        resume = from_main(last if os.path.isfile(last) else None, env)
        if env.is_main:
            print(f"--resume auto: {'continuing from ' + last if resume else 'no ' + last + ' yet, starting the run'}",
                  flush=True)
    if resume is None:
        return None
    saved = load_checkpoint(resume, map_location=env.device)
    saved["path"] = resume
    if env.distributed:  # one train.out_dir that all nodes share
        step = torch.tensor([saved["step"]], device=env.device)
        if all_reduce_sum(step, env).item() != saved["step"] * env.world_size:
            raise ConfigError(f"--resume {resume}: rank {env.rank} reads step {saved['step']} there and another rank a "
                              f"different step; train.out_dir must be one folder that every node shares")
    return saved


def model_from_checkpoint(path: str, weights: str = "ema", op_backend: str | None = None,
                          device="cpu") -> tuple[torch.nn.Module, dict]:
    """The model of a checkpoint in eval mode, with its EMA weights where it has them (weights="ema") or the raw
    ones (weights="model"); returns (model, checkpoint). op_backend: backend of the graph op (None = the global
    default); no backbone-weights file is needed."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    state = load_checkpoint(path, map_location=device)
    model = build_from_args(state["model_args"], op_backend)
    if weights == "ema" and state.get("ema") is not None:
        model.load_state_dict(state["ema"]["module"])
    else:
        model.load_state_dict(state["model"])
    return model.to(device).eval(), state


@dataclass
class TrainState:
    """Everything a run continues from, in one place: the modules and optimiser objects (updated in place on load)
    and the data position (epoch, next batch of that epoch, optimiser step) with the best validation NME so far.

    model and ema are the uncompiled, unwrapped modules (ema: a structalign.engine.ema.EMA or None).
    """

    model: torch.nn.Module
    ema: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR  # over structalign.engine.optim.Schedule
    scaler: torch.amp.GradScaler
    model_args: dict
    config: dict
    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_nme: float = math.inf
    best_epoch: int | None = None

    def state_dict(self, rng: list) -> dict:
        """The checkpoint dict; rng: the RNG states of every rank (gather_rng_states)."""
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "model_args": self.model_args, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
                "batch": self.batch, "step": self.step, "best_nme": self.best_nme, "best_epoch": self.best_epoch,
                "rng": rng, "config": self.config}

    def save(self, path: str, rank: int = 0, world_size: int = 1) -> None:
        """Collective under DDP (every rank calls it: the RNG states are gathered); rank 0 writes the file."""
        state = self.state_dict(gather_rng_states(world_size))
        if rank == 0:
            save_checkpoint(path, state)

    def load_state_dict(self, state: dict, rank: int = 0, world_size: int = 1) -> None:
        """Restore a checkpoint dict (its model must be this model's architecture).

        This run's hyper-parameters stay (optimiser settings, learning rate and schedule, so that a setting changed
        on resume takes effect); the checkpoint gives the weights, the optimiser's moments, the schedule's position,
        the scaler, the RNG states and the data position.
        """
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        groups = self.optimizer.param_groups
        settings = [{k: v for k, v in group.items() if k != "params"} for group in groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, own in zip(groups, settings):
            group.update(own)
        position = {k: state["scheduler"][k] for k in ("last_epoch", "_step_count")}
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), **position})
        for group, base, factor in zip(groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in groups]
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.best_nme, self.best_epoch = state["best_nme"], state["best_epoch"]
        rngs = state["rng"]
        set_rng_state(rngs[rank] if len(rngs) == world_size else rngs[0])


def gather_rng_states(world_size: int = 1) -> list:
    """Every rank's rng_state(), in rank order (a collective under DDP)."""
    states = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states[0] = rng_state()
    return states


def rng_state() -> dict:
    """Every random generator the training step may touch."""
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# weights_only loading accepts tensors, numbers, strings and containers: convert the numpy/python states to those.
def _numpy_state() -> tuple:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


def _python_state() -> tuple:
    version, internal, gauss_next = random.getstate()
    return version, list(internal), gauss_next
