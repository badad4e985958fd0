"""Training checkpoints: written atomically (temporary file, then os.replace), loaded without executing pickled code.

A checkpoint is a dict of tensors and plain Python values:
    model, ema (state dicts of the uncompiled, unwrapped modules; ema may be None), model_args (build_model kwargs),
    optimizer, scheduler, scaler (state dicts), epoch, batch (the next batch of that epoch), step, best_nme,
    rng (CPU/CUDA torch, numpy, python states), config (Config.to_dict()).
"""
import os
import random
import tempfile

import numpy as np
import torch

from structalign.models import build_model


def save_checkpoint(path: str, state: dict) -> None:
    """Write state to path so that a crash leaves either the old file or the new one, never a torn one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
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


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint with weights_only=True (plain tensors and containers only); clear errors for bad files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {path!r} cannot be read (corrupt or not a structalign checkpoint): "
                         f"{exc}") from None
    missing = [k for k in ("model", "model_args", "config") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"checkpoint {path!r} is not a structalign checkpoint: missing {missing}")
    return state


def model_from_checkpoint(path: str, weights: str = "ema", op_backend: str | None = None,
                          device="cpu") -> tuple[torch.nn.Module, dict]:
    """The model of a checkpoint in eval mode, with its EMA weights where it has them (weights="ema") or the raw
    ones (weights="model"); returns (model, checkpoint)."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    state = load_checkpoint(path, map_location=device)
    args = dict(state["model_args"])
    if op_backend is not None:
        args["op_backend"] = op_backend
    model = build_model(**args)
    if weights == "ema" and state.get("ema") is not None:
        model.load_state_dict(state["ema"]["module"])
    else:
        model.load_state_dict(state["model"])
    return model.to(device).eval(), state


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
