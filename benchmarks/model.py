"""End-to-end model benchmark: forward + backward images/s of the L-GRN model with its criterion, with the ops on
the reference backend and on the C++ backend, and the share of step time spent in the graph head and in the loss.

    .venv/bin/python benchmarks/model.py                 # both configurations, reference and cpp ops
    .venv/bin/python benchmarks/model.py --reps 3 --threads 1 --json /tmp/model.json

A step is model forward + criterion (Soft Wing + Laplacian relative loss) + backward, no optimiser. "head" is the
L-GRN head alone (forward + backward from detached node features), "loss" the criterion alone (from detached
predictions); shares are their medians over the step's median. The backends' calls alternate rep by rep in one
run, so a load change on a shared machine hits both alike. The head alone against its matrix products (fused layer,
unfused layer, torch.compile, the authors' dense head): benchmarks/head.py.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name, print_table, write_json  # noqa: E402

from structalign.engine.config_schema import ModelConfig  # noqa: E402
from structalign.landmarks import WFLW98  # noqa: E402
from structalign.losses import build_criterion  # noqa: E402
from structalign.models import build_model  # noqa: E402
from structalign.ops.backend import cpp_available  # noqa: E402

CONFIGS = (  # (backbone, image size, batch)
    ("resnet34", 256, 8),
    ("resnet18", 128, 32),
)
OPS = ("graph_conv", "graph_message_passing", "relative_location_loss")


def cpp_problem(device: torch.device) -> str | None:
    """None when both ops run on the cpp backend here, else why not (the script then reports reference only)."""
    missing = [op for op in OPS if not cpp_available(device.type, op)]
    if missing:
        return f"no cpp kernel on {device.type} for {', '.join(missing)}"
    try:
        model = build_model(ModelConfig(backbone="resnet18", head_width=8, num_blocks=0, backbone_width=8,
                                        op_backend="cpp"), WFLW98, 64).to(device)
        loss, _ = build_criterion(op_backend="cpp")(model(torch.rand(2, 3, 64, 64, device=device))[0],
                                                   torch.rand(2, 98, 2, device=device) * 64)
        loss.backward()
    except RuntimeError as exc:
        return f"cpp backend failed: {exc}"
    return None


def make_case(backbone: str, size: int, batch: int, backend: str, device) -> dict:
    """{"step", "head", "loss"}: callables running one forward + backward (see the module docstring)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, op_backend=backend), WFLW98, size).to(device)
    model = model.to(memory_format=torch.channels_last)
    criterion = build_criterion(op_backend=backend)
    images = torch.rand(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    target = torch.rand(batch, 98, 2, device=device) * size
    with torch.no_grad():
        nodes, pooled = model.head_input(model.features(images))
        pred, _ = model(images)
    nodes, pred = nodes.detach().requires_grad_(), pred.detach().requires_grad_()

    def step():
        model.zero_grad(set_to_none=True)
        loss, _ = criterion(model(images)[0], target)
        loss.backward()

    def head():
        model.head(nodes, pooled).sum().backward()

    def loss():
        criterion(pred, target)[0].backward()

    return {"step": step, "head": head, "loss": loss}


def timed_ms(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def bench_config(backbone: str, size: int, batch: int, backends: list, device, reps: int, warmup: int) -> list:
    """Rows per backend; the backends' calls are interleaved rep by rep, so load changes hit all of them alike."""
    cases = {b: make_case(backbone, size, batch, b, device) for b in backends}
    times = {(b, part): [] for b in backends for part in ("step", "head", "loss")}
    for rep in range(warmup + reps):
        for b, case in cases.items():
            for part, fn in case.items():
                t = timed_ms(fn, device)
                if rep >= warmup:
                    times[b, part].append(t)
    rows = []
    for b in backends:
        step, head, loss = (statistics.median(times[b, p]) for p in ("step", "head", "loss"))
        rows.append({"model": f"lgrn-{backbone}", "size": size, "batch": batch, "ops": b, "step_ms": step,
                     "img_per_s": batch / step * 1e3, "speedup": statistics.median(times[backends[0], "step"]) / step,
                     "head_ms": head, "head_share": head / step, "loss_ms": loss, "loss_share": loss / step})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="intra-op CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = cpp_problem(device)
    backends = ["reference"] if problem else ["reference", "cpp"]
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    if problem:
        print(f"cpp backend not measured: {problem}")
    rows = []
    for backbone, size, batch in CONFIGS:
        rows += bench_config(backbone, size, batch, backends, device, args.reps, args.warmup)
    print_table(rows, ["model", "size", "batch", "ops", "step_ms", "img_per_s", "speedup", "head_ms", "head_share",
                       "loss_ms", "loss_share"])
    if args.json:
        write_json(args.json, rows, device)


if __name__ == "__main__":
    main()
