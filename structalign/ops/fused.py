"""How a fused op is registered with torch.library: one template for every op and backend.

Each fused op is a pair of operators, `structalign::<op>[_triton]` and its `_backward`, with the same schema on every
backend (csrc/<op>.cpp declares the C++ pair; structalign/ops/<op>.py declares the Triton pair with
torch.library.triton_op over structalign_kernels). `register_fused` gives a pair its fake kernels (the C++ ops; a
triton_op's body is its own fake kernel) and its autograd formula, which calls the fused backward operator. A
gradient of a gradient is refused with an error rather than returned silently as zero.
"""
from collections.abc import Callable

import torch


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(f"{ctx.op}: double backward (a gradient of its gradient) is not supported")


def register_fused(forward: str, backward: str, setup_context: Callable, backward_formula: Callable,
                   fake_forward: Callable | None = None, fake_backward: Callable | None = None) -> Callable:
    """Register the fused pair `forward` / `backward` (qualified names "structalign::...") and return `apply`.

    setup_context(ctx, inputs, output) and backward_formula(ctx, *grad_outputs) as torch.library.register_autograd
    takes them; fake_forward / fake_backward: shape functions of the two operators (None for triton_op pairs).
    `apply(*args)` calls the forward operator through a torch.autograd.Function made of the same two functions: the
    same formula as the registration (which serves direct calls of the operator, opcheck and export), without the
    ~50 us per call that torch.library's generic Python autograd wrapper adds (measured on the 2-core CPU, as much
    as the whole fused loss kernel at training batches).
    """
    if fake_forward is not None:
        torch.library.register_fake(forward)(fake_forward)
        torch.library.register_fake(backward)(fake_backward)
    torch.library.register_autograd(forward, backward_formula, setup_context=setup_context)

    def refuse_setup(ctx, inputs, output):
        ctx.op = backward

    torch.library.register_autograd(backward, _refuse_double_backward, setup_context=refuse_setup)
    namespace, name = forward.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default

    class Fused(torch.autograd.Function):
        # forward(ctx, ...) rather than a separate setup_context: Function.apply then skips binding the arguments
        # to a signature on every call (another ~25 us).
        @staticmethod
        def forward(ctx, *args):
            output = op(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward_formula(ctx, *grads)

    Fused.__name__ = Fused.__qualname__ = f"Fused_{name}"
    return Fused.apply
