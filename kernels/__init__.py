"""Triton kernels of structalign, installed as `structalign_kernels` (one op a module).

Each module holds the @triton.jit kernels, its launchers (the C++ ops' signatures, launching through `launch`, so
a launcher can be the body of a torch.library.triton_op) and `_tiles`, the tile choice for a CUDA device or for
the interpreter. tests/test_triton_compile.py compiles every kernel for sm_80 and sm_90 as the JIT specialises the
launchers' real arguments; tests/test_triton_kernels.py checks the launchers against structalign.ops.reference.
Only structalign.ops imports these; they never import structalign.models.
"""
import contextlib

import torch
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the kernels compute in for t's dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def device_of(t: torch.Tensor):
    """The context that launches on t's device (the current CUDA device may be another one)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def launch(kernel, grid, *args, **meta) -> None:
    """wrap_triton(kernel)[grid](*args, **meta): torch.compile and export see the launch through a triton_op.

    Under TRITON_INTERPRET=1 wrap_triton hands back the interpreted kernel, which cannot run on fake tensors: when a
    triton_op's body runs for shapes only (its fake kernel, e.g. under opcheck) the launch is skipped, the launcher
    having allocated its outputs; when it is being traced into a graph (torch.compile, export) that is an error.
    """
    if isinstance(kernel, InterpretedFunction) and torch._guards.detect_fake_mode(args) is not None:
        if get_proxy_mode() is not None:
            raise RuntimeError(f"{kernel.fn.__name__}: a kernel run by the Triton interpreter (TRITON_INTERPRET=1) "
                               "cannot be traced into a graph (torch.compile / export); trace it on a GPU")
        return
    try:
        wrapped = wrap_triton(kernel)
    except RuntimeError:  # torch < 2.12's wrap_triton takes no interpreted kernel: run it directly
        if not isinstance(kernel, InterpretedFunction):
            raise
        wrapped = kernel
    wrapped[grid](*args, **meta)
