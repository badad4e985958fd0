"""The training loop on CPU: exact resume after Ctrl-C, NaN stop, validation and best checkpoint, 2-process DDP."""
import json
import math
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from structalign.engine.checkpoint import load_checkpoint
from structalign.engine.config import ConfigError
from structalign.engine.train import train

from engine_helpers import tiny_config


@pytest.fixture(scope="module")
def uninterrupted(synth_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full"))
    return out, train(tiny_config(synth_root, out))


def test_interrupted_and_resumed_run_repeats_the_loss_sequence(synth_root, uninterrupted, tmp_path):
    _, full = uninterrupted
    assert full["steps"] == 6 and len(full["losses"]) == 6

    def ctrl_c_after_step_3(step, loss):
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    cfg = tiny_config(synth_root, str(tmp_path))
    # Ctrl-C between steps 3 and 4: step 4, the one in progress, completes; then a checkpoint is saved.
    first = train(cfg, on_step=ctrl_c_after_step_3)
    assert first["interrupted"] and first["steps"] == 4
    state = load_checkpoint(first["last_checkpoint"])
    assert (state["epoch"], state["batch"], state["step"]) == (1, 1, 4)  # mid-epoch: epoch 1 after its first batch
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    second = train(cfg, resume=first["last_checkpoint"])
    assert first["losses"] + second["losses"] == full["losses"]
    for a, b in zip(full["model"].state_dict().values(), second["model"].state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full["ema"].state_dict().values(), second["ema"].state_dict().values()):
        assert torch.equal(a, b)


def test_validation_log_and_best_checkpoint(uninterrupted):
    out, full = uninterrupted
    assert [v["epoch"] for v in full["val"]] == [0, 1]
    assert full["best_nme"] == min(v["val_nme"] for v in full["val"]) and full["best_nme"] > 0
    best = load_checkpoint(os.path.join(out, "best.pt"))
    assert best["epoch"] == full["best_epoch"] + 1 and best["config"]["train"]["out_dir"] == out
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert len([r for r in records if "val_nme" in r]) == 2
    assert os.path.isfile(os.path.join(out, "config.yaml"))


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(synth_root, tmp_path):
    cfg = tiny_config(synth_root, str(tmp_path), optim={"name": "sgd", "lr": 1e30, "grad_clip": 0.0,
                                                         "warmup_epochs": 0.0}, train={"save_every": 1})
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(\w+\) at step (\d+) .*last good checkpoint"):
        train(cfg)
    state = load_checkpoint(str(tmp_path / "last.pt"))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_bad_config_is_reported_before_training(synth_root, tmp_path):
    with pytest.raises(ConfigError, match="data.augment: .*rotaton"):
        train(tiny_config(synth_root, str(tmp_path), data={"augment": {"rotaton": 10}}))
    with pytest.raises(ConfigError, match="loss: "):
        train(tiny_config(synth_root, str(tmp_path), loss={"name": "hinge"}))
    with pytest.raises(ConfigError, match="data.root"):
        train(tiny_config(str(tmp_path / "missing"), str(tmp_path)))
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_config(synth_root, str(tmp_path)), resume=str(tmp_path / "none.pt"))
    assert not os.path.exists(tmp_path / "log.jsonl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, root: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # Two micro-batches of 4 per step exercise no_sync; 12 images per rank -> 3 batches, 2 steps per epoch.
    cfg = tiny_config(root, out, train={"batch_size": 4, "accumulate": 2, "epochs": 1, "ema_decay": 0.0})
    result = train(cfg)
    flat = torch.cat([p.detach().flatten() for p in result["model"].parameters()])
    torch.save({"params": flat, "losses": result["losses"]}, os.path.join(out, f"rank{rank}.pt"))


def test_ddp_two_processes_keep_identical_parameters(synth_root, tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), synth_root, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert len(r0["losses"]) == 2 and all(math.isfinite(v) for v in r0["losses"])
    assert r0["losses"] == r1["losses"]
    assert torch.equal(r0["params"], r1["params"])
    assert load_checkpoint(str(tmp_path / "last.pt"))["step"] == 2


@pytest.mark.gpu
def test_bf16_training_on_cuda_with_the_dali_loader(synth_root, tmp_path):
    pytest.importorskip("nvidia.dali")
    cfg = tiny_config(synth_root, str(tmp_path), data={"loader": "dali", "num_threads": 2},
                      train={"device": "cuda", "precision": "bf16", "epochs": 1})
    result = train(cfg)
    assert len(result["losses"]) == 3 and all(math.isfinite(v) for v in result["losses"])
    assert next(result["model"].parameters()).is_cuda and result["val"][0]["val_nme"] > 0
