"""graph_conv with nn.SyncBatchNorm's statistics: two gloo processes, each holding its share of a batch (3 and 2 faces
with different statistics), against one process on the whole batch, in float64 to 1e-10: output, the gradients of
the inputs (concatenated) and of the parameters (summed over the processes), running statistics. Through the op on
each CPU backend, and through GraphBlock with an nn.SyncBatchNorm and with sync_graph_batch_norms under DDP.

    python -m pytest -q tests/ops/test_graph_conv_sync_bn.py
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from structalign.landmarks import scheme_for
from structalign.ops import BatchNormArgs, LandmarkGraph, graph_conv
from structalign.ops.backend import cpp_available, triton_available
from process_group import free_port

SHARES = (slice(0, 3), slice(3, 5))  # the faces of rank 0 and rank 1
N, F, C = 29, 5, 4
TOL = dict(atol=1e-10, rtol=1e-10)
OP_CASES = (dict(per_face=False, relu=True, residual=True, affine=True, momentum=0.1),
            dict(per_face=True, relu=False, residual=False, affine=False, momentum=0.3))
BACKENDS = [
    "reference",
    pytest.param("cpp", marks=pytest.mark.skipif(not cpp_available("cpu", "graph_conv"),
                                                 reason="structalign._C (CPU) is not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not triton_available("cpu"),
                                                    reason="triton missing or TRITON_INTERPRET unset")),
]
AVAILABLE = ["reference"] + ["cpp"] * cpp_available("cpu", "graph_conv") + ["triton"] * triton_available("cpu")
BLOCK_BACKEND = "cpp" if cpp_available("cpu", "graph_conv") else "reference"


def graph() -> LandmarkGraph:
    return LandmarkGraph.from_edges(N, scheme_for(N).edges)


def make(gen, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift


def faces(seed: int) -> torch.Tensor:
    """x (Tensor[5, N, F]) whose two shares have different means and spreads."""
    x = make(torch.Generator().manual_seed(seed), SHARES[1].stop, N, F)
    x[SHARES[1]] = x[SHARES[1]] * 2 + 1
    return x


def run_op(backend: str, case: dict, share: slice, group) -> dict:
    """One training call of graph_conv on the faces `share` of the batch: output, gradients, running statistics."""
    gen = torch.Generator().manual_seed(1)
    e, b = graph().num_edges, SHARES[1].stop
    full = dict(x=faces(0), weight=make(gen, 2, F, C, scale=F ** -0.5),
                logits=make(gen, *((b, e) if case["per_face"] else (e,))), bias=make(gen, C),
                residual=make(gen, b, N, C), bn_weight=make(gen, C, scale=0.3, shift=1.0),
                bn_bias=make(gen, C, scale=0.3))
    stats = dict(running_mean=make(gen, C, scale=0.1), running_var=make(gen, C, scale=0.1, shift=1.0).abs())
    grad_out = make(gen, b, N, C)[share]
    used = ["x", "weight", "logits", "bias"] + ["residual"] * case["residual"]
    used += ["bn_weight", "bn_bias"] * case["affine"]
    batched = {"x", "residual"} | ({"logits"} if case["per_face"] else set())
    leaves = {k: (full[k][share] if k in batched else full[k]).clone().requires_grad_() for k in used}
    bn = BatchNormArgs(stats["running_mean"], stats["running_var"], leaves.get("bn_weight"), leaves.get("bn_bias"),
                       True, case["momentum"], 1e-5)
    out = graph_conv(leaves["x"], leaves["weight"], leaves["logits"], graph(), leaves["bias"], bn, case["relu"],
                     leaves.get("residual"), backend=backend, process_group=group)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    return dict(out=out.detach(), grads=dict(zip(used, grads)), stats=stats, batched=batched)


def run_block(kind: str, share: slice, world: int) -> dict:
    """Two training steps then one evaluation of a fused GraphBlock on the faces `share`; kind "sync_batchnorm":
    its BatchNorm converted to nn.SyncBatchNorm, "ddp": sync_graph_batch_norms and DDP (world > 1 only)."""
    from structalign.models.lgrn import GraphBlock, sync_graph_batch_norms

    torch.manual_seed(0)
    block = GraphBlock(F, C, graph(), learn_edges=True, op_backend=BLOCK_BACKEND).double()
    block.bn.momentum = None  # the cumulative average: num_batches_tracked counts the steps
    model = block
    if world > 1 and kind == "sync_batchnorm":
        block.bn = torch.nn.SyncBatchNorm.convert_sync_batchnorm(block.bn)
    elif world > 1:
        model = DDP(sync_graph_batch_norms(block))
    outs, input_grads = [], []
    for step in range(2):
        x = faces(10 + step)[share].requires_grad_()
        residual = make(torch.Generator().manual_seed(20 + step), SHARES[1].stop, N, C)[share].requires_grad_()
        out = model(x, residual=residual)
        grad_out = make(torch.Generator().manual_seed(30 + step), SHARES[1].stop, N, C)[share]
        (out * grad_out).sum().backward()
        outs.append(out.detach())
        input_grads.append((x.grad, residual.grad))
    param_grads = {k: p.grad for k, p in block.named_parameters()}
    model.eval()
    with torch.no_grad():
        outs.append(model(faces(40)[share]))
    buffers = {k: v.clone() for k, v in block.bn.named_buffers()}
    return dict(outs=outs, input_grads=input_grads, param_grads=param_grads, buffers=buffers)


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {backend: [run_op(backend, case, SHARES[rank], dist.group.WORLD) for case in OP_CASES]
                  for backend in AVAILABLE}
        result.update({kind: run_block(kind, SHARES[rank], world) for kind in ("sync_batchnorm", "ddp")})
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list:
    """What each of the two processes computed (one spawn for every test here: starting them dominates)."""
    out = tmp_path_factory.mktemp("sync_bn")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_with_a_process_group_equals_one_process_on_the_whole_batch(backend, two_processes):
    for i, case in enumerate(OP_CASES):
        expected = run_op(backend, case, slice(None), None)
        parts = [r[backend][i] for r in two_processes]
        close(torch.cat([p["out"] for p in parts]), expected["out"], f"{case} out")
        for k, g in expected["grads"].items():
            local = [p["grads"][k] for p in parts]
            close(torch.cat(local) if k in expected["batched"] else sum(local), g, f"{case} grad {k}")
        for p in parts:
            for k, v in expected["stats"].items():
                close(p["stats"][k], v, f"{case} {k}")


def test_graph_block_syncs_with_sync_batchnorm_and_with_sync_graph_batch_norms_under_ddp(two_processes):
    """A fused GraphBlock whose BatchNorm is an nn.SyncBatchNorm (as convert_sync_batchnorm leaves it on GPUs), and
    one marked by sync_graph_batch_norms inside DDP (the CPU training path): two steps then evaluation."""
    expected = run_block("single", slice(None), 1)
    for kind in ("sync_batchnorm", "ddp"):
        parts = [r[kind] for r in two_processes]
        for step, out in enumerate(expected["outs"]):
            close(torch.cat([p["outs"][step] for p in parts]), out, f"{kind} out {step}")
        for step, grads in enumerate(expected["input_grads"]):
            for name, g, *local in zip(("x", "residual"), grads, *(p["input_grads"][step] for p in parts)):
                close(torch.cat(local), g, f"{kind} grad {name} {step}")
        for k, g in expected["param_grads"].items():
            local = [p["param_grads"][k] for p in parts]
            if kind == "ddp":  # DDP's gradients: the mean of the processes' on each of them
                close(local[0], local[1], f"{kind} grad {k} across ranks")
                local = [local[0] * 2]
            close(sum(local), g, f"{kind} grad {k}")
        for p in parts:
            for k, v in expected["buffers"].items():
                close(p["buffers"][k], v, f"{kind} {k}")
