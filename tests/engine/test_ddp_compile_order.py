"""DDP with torch.compile, 2 processes on gloo: compile wraps the DDP module, the L-GRN graph's device copies exist
before tracing, and every gradient arrives in its parameter's layout (DDP never warns "Grad strides do not match
bucket view strides", the warning of a copy into each bucket)."""
import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from engine_helpers import tiny_config
from process_group import as_rank, free_port

STRIDE_WARNING = "Grad strides do not match bucket view strides"


def _worker(rank: int, port: int, root: str, out: str):
    as_rank(rank, 2, port)
    from structalign.engine.train import train

    compiled = []

    def recording_compile(module, **kwargs):
        """Stands in for torch.compile (this test checks what is compiled, not the compiler): eager from here on."""
        inner = getattr(module, "module", module)
        compiled.append({"wrapper": type(module).__name__,
                         "cached": sorted({key[0] for key in inner.head.graph._cache if key[1].type == "cpu"})})
        return module

    torch.compile = recording_compile
    cfg = tiny_config(root, out, train={"batch_size": 4, "accumulate": 2, "epochs": 1, "ema_decay": 0.0,
                                        "compile": True, "progress": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    torch.save({"compiled": compiled, "warnings": [str(w.message) for w in caught]},
               os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ddp_compiled_run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_compile")
    mp.spawn(_worker, args=(free_port(), synth_root, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]


def test_compile_wraps_ddp_after_the_graph_tensors_are_on_the_device(ddp_compiled_run):
    for rank in ddp_compiled_run:
        assert rank["compiled"] == [{"wrapper": "DistributedDataParallel", "cached": ["csr", "transposed"]}]


def test_gradients_arrive_in_the_bucket_views_layout(ddp_compiled_run):
    for rank in ddp_compiled_run:
        assert not [w for w in rank["warnings"] if STRIDE_WARNING in w]
