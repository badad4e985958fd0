"""relative_location_loss cases of the op benchmark (driver: benchmarks/ops.py, which imports `cases`).

At the paper's shapes: B = 256 faces of N = 98 landmarks (WFLW), soft-wing criterion, mean reduction, with the
294 Laplacian relations of the top-3 neighbour lists (the paper's loss) and with all 4 753 pairs i < j. Providers:
eager (relative_location_loss_dense: builds the delta tensors, as the paper's code), reference, compile
(torch.compile of the reference; the driver turns off donated buffers so that "backward" can replay a graph), cpp
and triton (CUDA only).
"""
import torch

from harness import OpCase  # benchmarks/ is on sys.path when benchmarks/ops.py runs
from structalign.landmarks import scheme_for
from structalign.ops import RelationSet, relative_location_loss
from structalign.ops.backend import cpp_available, triton_available
from structalign.ops.reference import relative_location_loss_dense, relative_location_loss_reference

OP = "relative_location_loss"
BATCH, POINTS = 256, 98


def _relation_sets() -> dict:
    return {
        f"laplacian top-3 ({3 * POINTS} pairs)": RelationSet.laplacian(scheme_for(POINTS).relation_neighbors),
        f"all pairs ({POINTS * (POINTS - 1) // 2})": RelationSet.pairs(POINTS),
    }


def _loss_fn(provider: str, relations: RelationSet, target: torch.Tensor):
    tensors = relations.tensors(target.device)
    if provider == "eager":
        return lambda p: relative_location_loss_dense(p, target, *tensors)
    if provider == "reference":
        return lambda p: relative_location_loss_reference(p, target, *tensors)
    if provider == "compile":
        return torch.compile(lambda p: relative_location_loss_reference(p, target, *tensors))
    return lambda p: relative_location_loss(p, target, relations, backend=provider)


def _case(provider: str, mode: str, relations: RelationSet, pred: torch.Tensor, target: torch.Tensor) -> OpCase:
    fn = _loss_fn(provider, relations, target)
    x = pred.clone().requires_grad_()

    def forward():
        return fn(x)

    graph = {}

    def backward():
        if "loss" not in graph:  # one forward, made lazily so that construction stays cheap
            graph["loss"] = fn(x)
        x.grad = None
        graph["loss"].backward(retain_graph=True)

    def full():
        x.grad = None
        fn(x).backward()

    shape = f"B={pred.shape[0]} N={pred.shape[1]} {mode}"
    return OpCase(OP, shape, provider, forward, backward, full)


def providers(device: torch.device) -> list:
    names = ["eager", "reference", "compile"]
    if cpp_available(device.type, OP):
        names.append("cpp")
    if device.type == "cuda" and triton_available("cuda"):
        names.append("triton")
    return names


def cases(device: torch.device) -> list:
    """OpCases (benchmarks/harness.py) for every provider available on `device`, soft-wing mean, B = 256, N = 98."""
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(BATCH, POINTS, 2, generator=gen) * 256
    pred = target + torch.randn(BATCH, POINTS, 2, generator=gen) * 3  # a few pixels off: both soft-wing branches
    target, pred = target.to(device), pred.to(device)
    return [_case(provider, mode, relations, pred, target)
            for mode, relations in _relation_sets().items() for provider in providers(device)]
