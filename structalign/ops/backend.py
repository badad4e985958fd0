"""Which implementation runs an op: "reference" (PyTorch), "cpp" (structalign._C, CPU/CUDA) or "triton".

The choice is per call (`backend=` argument) or global (`set_backend`); "auto" picks the fastest available for the
tensors' device: the C++ extension where it is built for that device, else Triton on CUDA, else the reference.
"""
import os
import warnings
from contextlib import contextmanager
from functools import lru_cache

import torch

from structalign.ops.extension import build_just_in_time

BACKENDS = ("auto", "reference", "cpp", "triton")
_global_backend = os.environ.get("STRUCTALIGN_BACKEND", "auto")


@lru_cache(maxsize=None)
def extension_error() -> str | None:
    """None when structalign._C is loaded, else why not, as text (the ops then fall back to the reference).

    The extension is the one built with the package (`pip install --no-build-isolation`, `make ext`) or, where it was
    installed without it (a plain `pip install -e .`), the one built on first use into a cache
    (structalign.ops.extension)."""
    try:
        import structalign._C  # noqa: F401  (registers torch.ops.structalign.*)
    except ModuleNotFoundError as exc:
        if exc.name != "structalign._C":
            raise
        why = build_just_in_time()
    except ImportError as exc:
        why = f"it failed to load: {exc}"
    else:
        return None
    if why is not None:
        warnings.warn(f"structalign._C is not available ({why}); only the reference and triton backends are")
    return why


# Constant for torch.compile: the dispatcher queries below cannot be traced, and the answer never changes.
@lru_cache(maxsize=None)
@torch.compiler.assume_constant_result
def cpp_available(device_type: str, op: str) -> bool:
    """True when structalign._C has a kernel for `op` on `device_type` ("cpu"/"cuda")."""
    if extension_error() is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    name = f"structalign::{op}"
    if key is None or name not in torch._C._dispatch_get_all_op_names():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, key)


@lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_available(device_type: str) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1."""
    if not _triton_importable():
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


@lru_cache(maxsize=None)
def _warn_no_cuda_kernels() -> None:
    why = extension_error() or "it was built without CUDA kernels (no CUDA toolkit at build time?)"
    warnings.warn(f"structalign._C has no CUDA kernels ({why}); backend 'auto' runs the Triton kernels on CUDA "
                  "tensors. Rebuild with a CUDA toolkit (STRUCTALIGN_CUDA=1 make ext) for the C++/CUDA kernels.")


def check_op_backend(op_backend) -> None:
    """ValueError unless op_backend (a module's per-call backend choice) is None or one of BACKENDS."""
    if op_backend is not None and op_backend not in BACKENDS:
        raise ValueError(f"op_backend must be None or one of {BACKENDS}, got {op_backend!r}")


def set_backend(name: str) -> None:
    """Set the default backend for every op ("auto", "reference", "cpp" or "triton")."""
    global _global_backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _global_backend = name


def get_backend() -> str:
    return _global_backend


@contextmanager
def use_backend(name: str):
    """Context manager that sets the global backend for its body."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve_backend(requested: str | None, device: torch.device, op: str) -> str:
    """The concrete backend for one call; raises if an explicitly requested one cannot run on `device`."""
    name = requested or _global_backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    dev = device.type
    if name == "auto":
        if cpp_available(dev, op):
            return "cpp"
        if dev == "cuda" and triton_available(dev):
            _warn_no_cuda_kernels()
            return "triton"
        return "reference"
    if name == "cpp" and not cpp_available(dev, op):
        why = extension_error() or f"it was built without {dev.upper()} kernels"
        raise RuntimeError(f"backend 'cpp' cannot run {op} on {dev}: {why}")
    if name == "triton" and not triton_available(dev):
        raise RuntimeError(
            f"backend 'triton' cannot run {op} on {dev}: Triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)"
        )
    return name
