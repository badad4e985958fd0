"""relative_location_loss cases of the op benchmark (driver: benchmarks/ops.py, which imports `cases`).

At the paper's shapes: B faces (256 by default; the driver passes its --batch list) of N = 98 landmarks (WFLW),
soft-wing criterion, mean reduction, with the 294 Laplacian relations of the top-3 neighbour lists (the paper's loss)
and with all 4 753 pairs i < j, in each dtype asked for (pred and target in that dtype). Providers: eager
(relative_location_loss_dense: builds the delta tensors, as the paper's code), reference, compile (torch.compile of
the reference; the driver turns off donated buffers so that "backward" can replay a graph), cpp and triton. The bytes
model of each mode is in benchmarks/ops.py (`loss_bytes`).
"""
import torch

from harness import OpCase  # benchmarks/ is on sys.path when benchmarks/ops.py runs
from structalign.landmarks import scheme_for
from structalign.ops import RelationSet, relative_location_loss
from structalign.ops.backend import cpp_available, triton_available
from structalign.ops.reference import relative_location_loss_dense, relative_location_loss_reference

OP = "relative_location_loss"
BATCH, POINTS = 256, 98
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


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


def _case(provider: str, mode: str, relations: RelationSet, make_inputs, batch: int, dtype: torch.dtype,
          last: bool = False) -> OpCase:
    state = {}

    def release():
        state.clear()
        if last:
            make_inputs.release()

    def setup():
        if "fn" not in state:  # made on first use, so that building the case list costs nothing
            pred, target = make_inputs()
            state["fn"] = _loss_fn(provider, relations, target)
            state["x"] = pred.clone().requires_grad_()
        return state["fn"], state["x"]

    def forward():
        fn, x = setup()
        return fn(x)

    def backward():
        fn, x = setup()
        if "loss" not in state:  # one forward, made lazily
            state["loss"] = fn(x)
        x.grad = None
        state["loss"].backward(retain_graph=True)

    def full():
        fn, x = setup()
        x.grad = None
        fn(x).backward()

    name = DTYPE_NAMES.get(dtype, str(dtype))
    shape = f"B={batch} N={POINTS} {name} {mode}"
    size = torch.empty((), dtype=dtype).element_size()
    p = batch * POINTS * 2 * size
    nbytes = {"forward": 2 * p, "backward": 2 * p, "full": 3 * p}  # the model of benchmarks/ops.py's docstring
    meta = {"dtype": name, "batch": batch, "channels": None, "layout": mode}
    return OpCase(OP, shape, provider, forward, backward, full, nbytes, meta, release)


def providers(device: torch.device) -> list:
    names = ["eager", "reference", "compile"]
    if cpp_available(device.type, OP):
        names.append("cpp")
    if triton_available(device.type):  # on the CPU only under TRITON_INTERPRET=1
        names.append("triton")
    return names


def _inputs(batch: int, dtype: torch.dtype, device: torch.device):
    made = {}

    def make():
        if "pair" not in made:
            gen = torch.Generator().manual_seed(batch)
            target = torch.rand(batch, POINTS, 2, generator=gen) * 256
            pred = target + torch.randn(batch, POINTS, 2, generator=gen) * 3  # a few pixels off: both branches
            made["pair"] = (pred.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype))
        return made["pair"]

    make.release = made.clear
    return make


def cases(device: torch.device, batches=(BATCH,), dtypes=(torch.float32,), providers=None) -> list:
    """OpCases (benchmarks/harness.py), soft-wing mean, N = 98, for every batch x dtype x relation set x provider
    (default: every provider available on `device`)."""
    names = providers if providers is not None else globals()["providers"](device)
    out = []
    for batch in batches:
        for dtype in dtypes:
            make_inputs = _inputs(batch, dtype, device)
            sets = list(_relation_sets().items())
            for i, (mode, relations) in enumerate(sets):
                out += [_case(provider, mode, relations, make_inputs, batch, dtype,
                              last=i == len(sets) - 1 and provider == names[-1]) for provider in names]
    return out
