"""The training loop on CPU: exact resume after Ctrl-C, no host sync between log steps, NaN stops, resume checks,
validation and best checkpoint, TensorBoard, 2-process DDP (an interrupt on one rank only)."""
import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode

import structalign.engine.train as train_module
from structalign.engine.checkpoint import load_checkpoint, model_from_checkpoint
from structalign.engine.config import ConfigError
from structalign.engine.runlog import NonFiniteLossError
from structalign.engine.train import train
from structalign.errors import StructalignError
from structalign.models import build_model
from structalign.models.resnet import ResNet

from engine_helpers import tiny_config
from process_group import as_rank, free_port


@pytest.fixture(scope="module")
def uninterrupted(synth_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full"))
    return out, train(tiny_config(synth_root, out))


def test_interrupted_and_resumed_run_repeats_the_loss_sequence(synth_root, uninterrupted, tmp_path):
    _, full = uninterrupted
    assert full.steps == 6 and len(full.losses) == 6

    def ctrl_c_after_step_3(step):
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    cfg = tiny_config(synth_root, str(tmp_path))
    handler = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    # Ctrl-C between steps 3 and 4: step 4, the one in progress, completes; then a checkpoint is saved.
    first = train(cfg, on_step=ctrl_c_after_step_3)
    assert first.interrupted and first.steps == 4
    state = load_checkpoint(first.last_checkpoint)
    assert (state["epoch"], state["batch"], state["step"]) == (1, 1, 4)  # mid-epoch: epoch 1 after its first batch
    assert signal.getsignal(signal.SIGINT) is handler
    second = train(cfg, resume=first.last_checkpoint)
    assert first.losses + second.losses == full.losses
    for a, b in zip(full.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.state_dict().values(), second.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_validation_log_and_best_checkpoint(uninterrupted):
    out, full = uninterrupted
    assert [v["epoch"] for v in full.val] == [0, 1]
    assert full.best_nme == min(v["val_nme"] for v in full.val) and full.best_nme > 0
    best = load_checkpoint(os.path.join(out, "best.pt"))
    assert best["epoch"] == full.best_epoch + 1 and best["config"]["train"]["out_dir"] == out
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert len([r for r in records if "val_nme" in r]) == 2
    assert os.path.isfile(os.path.join(out, "config.yaml"))


def test_divergence_stops_in_one_line_and_never_saves_non_finite_weights(synth_root, tmp_path):
    """lr 1e30: the first update already makes the weights infinite while its loss was finite; the save after it
    must refuse them."""
    cfg = tiny_config(synth_root, str(tmp_path), optim={"name": "sgd", "lr": 1e30, "grad_clip": 0.0,
                                                         "warmup_epochs": 0.0}, train={"save_every": 1})
    with pytest.raises(NonFiniteLossError, match=r"(the weights became non-finite in step \d+|non-finite loss "
                                                 r"\(\w+\) at step \d+) .*the run diverged") as info:
        train(cfg)
    assert "\n" not in str(info.value)
    if os.path.exists(tmp_path / "last.pt"):
        state = load_checkpoint(str(tmp_path / "last.pt"))
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_bad_config_is_reported_before_training(synth_root, tmp_path):
    with pytest.raises(ConfigError, match="unknown key data.augment.rotaton"):
        train(tiny_config(synth_root, str(tmp_path), data={"augment": {"rotaton": 10}}))
    with pytest.raises(ConfigError, match="loss.name: .*got 'hinge'"):
        train(tiny_config(synth_root, str(tmp_path), loss={"name": "hinge"}))
    with pytest.raises(ConfigError, match="data.root"):
        train(tiny_config(str(tmp_path / "missing"), str(tmp_path)))
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_config(synth_root, str(tmp_path)), resume=str(tmp_path / "none.pt"))
    assert not os.path.exists(tmp_path / "log.jsonl")


def _ddp_worker(rank: int, world: int, port: int, root: str, out: str):
    as_rank(rank, world, port)

    def sigterm_on_rank_1(step):  # as a cluster scheduler may do to one process
        if rank == 1 and step == 1:
            signal.raise_signal(signal.SIGTERM)

    # Two micro-batches of 4 per step exercise no_sync; 12 images per rank -> 3 batches, 2 steps per epoch.
    cfg = tiny_config(root, out, train={"batch_size": 4, "accumulate": 2, "epochs": 2, "ema_decay": 0.0,
                                        "log_every": 2})
    with open(os.path.join(out, f"rank{rank}.log"), "w") as log, contextlib.redirect_stdout(log):
        result = train(cfg, on_step=sigterm_on_rank_1)
    flat = torch.cat([p.detach().flatten() for p in result.model.parameters()])
    torch.save({"params": flat, "losses": result.losses, "interrupted": result.interrupted},
               os.path.join(out, f"rank{rank}.pt"))


def test_ddp_two_processes_keep_identical_parameters_and_stop_together(synth_root, tmp_path):
    """SIGTERM on rank 1 only, after step 1: the ranks exchange it at the next log step (2) and both stop there."""
    mp.spawn(_ddp_worker, args=(2, free_port(), synth_root, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert len(r0["losses"]) == 2 and all(math.isfinite(v) for v in r0["losses"])
    # Each rank reports the global loss (the all-reduced mean), not its own shard's: a rank that logged its local
    # losses would differ here (the shards hold different images).
    assert r0["losses"] == r1["losses"] and r0["interrupted"] and r1["interrupted"]
    assert torch.equal(r0["params"], r1["params"])
    assert load_checkpoint(str(tmp_path / "last.pt"))["step"] == 2
    assert "interrupt received on rank(s) [1] of 2: saving a checkpoint at step 2 and stopping" in \
        (tmp_path / "rank0.log").read_text()


@pytest.mark.gpu
def test_bf16_training_on_cuda_with_the_dali_loader(synth_root, tmp_path):
    pytest.importorskip("nvidia.dali")
    cfg = tiny_config(synth_root, str(tmp_path), data={"loader": "dali", "num_threads": 2},
                      train={"device": "cuda", "precision": "bf16", "epochs": 1})
    result = train(cfg)
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    assert next(result.model.parameters()).is_cuda and result.val[0]["val_nme"] > 0


# ---- no host synchronisation inside the step ---------------------------------------------------------------------

# Reading a tensor's value on the host: on a GPU each of these waits for the device.
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.nonzero, torch.Tensor.nonzero,
              torch.masked_select, torch.Tensor.masked_select, torch.unique, torch.Tensor.unique}


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values per training step. A step's window runs from the fetch of its batch to
    the fetch of the next one (the loader's own work is not counted: it prepares batches on the host by design)."""

    def __init__(self):
        super().__init__()
        self.window, self.fetching, self.reads = 0, False, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS and self.window and not self.fetching:
            self.reads[self.window] = self.reads.get(self.window, 0) + 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def watched_train_loader(monkeypatch, on_fetched):
    """Wrap the training loader that train() makes: fetch() brackets each batch's fetch, on_fetched() follows it."""
    make = train_module.make_loader

    class Watched:
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def epoch(self, epoch, start_batch=0):
            batches = iter(self.inner.epoch(epoch, start_batch=start_batch))
            while True:
                batch = on_fetched(batches)
                if batch is None:
                    return
                yield batch

    monkeypatch.setattr(train_module, "make_loader",
                        lambda *a, **k: Watched(make(*a, **k)) if k.get("train") else make(*a, **k))
    yield


def test_no_host_sync_inside_steps_between_log_steps(synth_root, tmp_path, monkeypatch):
    """The host reads device values only at sync points: log steps (every 3rd here) and epoch ends (steps 4, 8)."""
    cfg = tiny_config(synth_root, str(tmp_path), data={"val_fraction": 0.0},
                      optim={"name": "sgd"},  # torch's unfused Adam reads its step counters (host tensors) with .item()
                      train={"log_every": 3, "epochs": 2, "ema_decay": 0.9})
    counter = HostReads()

    def fetch(batches):
        counter.fetching = True
        batch = next(batches, None)
        counter.fetching = False
        counter.window += batch is not None
        return batch

    with watched_train_loader(monkeypatch, fetch), counter:
        result = train(cfg)
    assert result.steps == 8 and counter.window == 8
    sync_steps = {3, 4, 6, 8}
    assert {step for step in counter.reads if step not in sync_steps} == set(), counter.reads
    assert set(counter.reads) == sync_steps  # the check sees the reads where they belong
    assert len(result.losses) == 8 and all(math.isfinite(v) for v in result.losses)


@pytest.mark.gpu
def test_no_cuda_sync_inside_steps_between_log_steps(synth_root, tmp_path, monkeypatch):
    """On CUDA: torch.cuda.set_sync_debug_mode("error") raises on any synchronising call inside non-log steps."""
    cfg = tiny_config(synth_root, str(tmp_path), data={"val_fraction": 0.0},
                      optim={"fused": True}, train={"device": "cuda", "precision": "bf16", "log_every": 3,
                                                    "epochs": 2, "ema_decay": 0.9, "progress": False})
    steps = {"fetched": 0}

    def fetch(batches):
        torch.cuda.set_sync_debug_mode("default")
        batch = next(batches, None)
        if batch is not None:
            batch.images, batch.landmarks = batch.images.cuda(), batch.landmarks.cuda()
            torch.cuda.synchronize()
            steps["fetched"] += 1
            # Steps 3, 4, 6, 8 end in a sync point (they read their losses); step 1 fills lazy per-device caches
            # (graph indices copied to the GPU once).
            if steps["fetched"] not in (1, 3, 4, 6, 8):
                torch.cuda.set_sync_debug_mode("error")
        return batch

    try:
        with watched_train_loader(monkeypatch, fetch):
            result = train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.steps == 8 and all(math.isfinite(v) for v in result.losses)


# ---- non-finite values --------------------------------------------------------------------------------------------

def test_first_non_finite_step_is_named_and_the_last_good_checkpoint_kept(synth_root, tmp_path, monkeypatch):
    """Weights poisoned after step 4: step 5 is the first non-finite loss; the run reads its losses only at the end
    of epoch 1 (step 6) and must still name step 5; last.pt stays the one of step 3 (end of epoch 0)."""
    cfg = tiny_config(synth_root, str(tmp_path), train={"log_every": 100})

    def poison(step):
        if step == 4:
            with torch.no_grad():
                next(iter(model_params)).fill_(float("nan"))

    model_params = []
    original = train_module.build_model

    def build(*args, **kwargs):
        model = original(*args, **kwargs)
        model_params.extend(model.parameters())
        return model

    monkeypatch.setattr(train_module, "build_model", build)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 5 \(epoch 1, batch 1\).*"
                                                 r"last good checkpoint is .*last.pt"):
        train(cfg, on_step=poison)
    state = load_checkpoint(str(tmp_path / "last.pt"))
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_in_a_batch_is_one_line_naming_the_step(synth_root, tmp_path, monkeypatch):
    cfg = tiny_config(synth_root, str(tmp_path), train={"log_every": 100})
    fetched = {"n": 0}

    def fetch(batches):
        batch = next(batches, None)
        fetched["n"] += 1
        if batch is not None and fetched["n"] == 2:
            batch.landmarks[0, 5, 1] = float("nan")
        return batch

    with watched_train_loader(monkeypatch, fetch):
        with pytest.raises(NonFiniteLossError, match=r"a training batch holds NaN or infinite images or landmarks "
                                                     r"at step 2 \(epoch 0, batch 1\)") as info:
            train(cfg)
    assert "\n" not in str(info.value) and isinstance(info.value, StructalignError)


# ---- resume -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(synth_root, tmp_path_factory):
    """A finished 2-epoch run that also kept a copy of its mid-epoch checkpoint of step 4 (save_every=1)."""
    out = tmp_path_factory.mktemp("finished")

    def keep_step_4(step):
        if step == 5:  # last.pt holds step 4 until step 5 is saved
            shutil.copy(out / "last.pt", out / "step4.pt")

    result = train(tiny_config(synth_root, str(out), train={"save_every": 1}), on_step=keep_step_4)
    assert load_checkpoint(str(out / "step4.pt"))["step"] == 4
    return out, result


def _copy_run(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def test_resume_keeps_each_step_once_in_the_log_and_removes_stale_temporaries(synth_root, finished_run, tmp_path):
    finished, full = finished_run
    run = _copy_run(finished, tmp_path)
    (run / ".tmp-killed.pt").write_bytes(b"x" * 1000)  # left by a save that was killed
    before = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in before if "loss" in r] == [1, 2, 3, 4, 5, 6]
    second = train(tiny_config(synth_root, str(run), train={"save_every": 1}), resume=str(run / "step4.pt"))
    assert second.losses == full.losses[4:]
    records = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in records if "val_nme" in r] == [0, 1]
    assert not list(run.glob(".tmp-*"))


def test_resume_with_another_op_backend_and_without_the_backbone_weights_file(synth_root, tmp_path):
    weights = tmp_path / "backbone.pt"
    torch.save(ResNet("resnet18", 8).state_dict(), weights)
    out = tmp_path / "run"
    cfg = tiny_config(synth_root, str(out), model={"backbone_weights": str(weights)}, train={"epochs": 1})
    train(cfg)
    weights.unlink()
    model, state = model_from_checkpoint(str(out / "last.pt"), op_backend="reference")
    assert "backbone_weights" not in state["model_args"] and "op_backend" not in state["model_args"]
    resumed = tiny_config(synth_root, str(out), model={"backbone_weights": str(weights), "op_backend": "reference"},
                          train={"epochs": 2})
    assert train(resumed, resume=str(out / "last.pt")).steps == 6


@pytest.mark.parametrize("changes, message", [
    ({"train": {"batch_size": 4}}, r"train.batch_size changed from 8 to 4, but the checkpoint's data position "
                                   r"\(epoch 2, batch 0\) depends on it"),
    ({"train": {"seed": 1}}, r"train.seed changed from 0 to 1"),
    ({"model": {"head_width": 32}}, r"the checkpoint holds a different model \(head_width 16 -> 32\)"),
])
def test_resume_that_cannot_continue_is_one_line_and_leaves_the_run_folder(synth_root, finished_run, tmp_path,
                                                                           changes, message):
    finished, _ = finished_run
    run = _copy_run(finished, tmp_path)
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    cfg = tiny_config(synth_root, str(run), **{k: {**v} for k, v in changes.items()})
    with pytest.raises(ConfigError) as info:
        train(cfg, resume=str(run / "last.pt"))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files  # config.yaml and log.jsonl untouched
    assert re.search(message, str(info.value)) and "\n" not in str(info.value)


def test_resume_with_a_new_lr_warns_and_uses_it(synth_root, finished_run, tmp_path, capsys):
    finished, _ = finished_run
    run = _copy_run(finished, tmp_path)
    cfg = tiny_config(synth_root, str(run), optim={"lr": 4e-3, "schedule": "constant", "warmup_epochs": 0.0},
                      train={"epochs": 3})
    result = train(cfg, resume=str(run / "step4.pt"))
    out = capsys.readouterr().out
    assert "resume: optim.lr changed from 0.002 to 0.004 (this run's value is used)" in out
    assert "resume: train.epochs changed from 2 to 3" in out and "resume: optim.schedule changed from 'cosine'" in out
    assert result.steps == 9
    state = load_checkpoint(str(run / "last.pt"))
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [pytest.approx(4e-3)]


# ---- what users see ---------------------------------------------------------------------------------------------

def test_tensorboard_scalars_beside_the_log(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, full = uninterrupted
    events = EventAccumulator(out)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_s", "train/data_wait", "val/nme", "val/fr", "val/auc"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(full.losses, rel=1e-6)


@pytest.mark.slow
def test_compiled_model_trains_like_eager(synth_root, uninterrupted, tmp_path):
    """train.compile=true: the whole model under torch.compile(fullgraph=True), the custom ops included."""
    _, eager = uninterrupted
    result = train(tiny_config(synth_root, str(tmp_path), train={"compile": True, "epochs": 1}))
    assert result.losses == pytest.approx(eager.losses[:3], rel=1e-3)


def test_progress_bar_on_a_terminal_shows_rate_and_loss(synth_root, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    train(tiny_config(synth_root, str(tmp_path), data={"val_fraction": 0.0}, train={"epochs": 1, "log_every": 2}))
    text = terminal.getvalue()
    assert "4/4" in text and re.search(r"step/s|s/step", text) and "loss=" in text and "img_s=" in text
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    train(tiny_config(synth_root, str(tmp_path / "quiet"), data={"val_fraction": 0.0},
                      train={"epochs": 1, "progress": False}))
    assert terminal.getvalue() == ""


def test_visibility_head_learns_from_the_labels_and_validation_scores_it(uninterrupted):
    """The built-in data carries exact per-point occluder labels: the step adds their cross-entropy (logged as
    `visibility`, its loss part) and validation reports the AUROC of the predicted P(visible)."""
    out, full = uninterrupted
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    steps = [r for r in records if "loss" in r]
    assert all(r["visibility"] > 0 for r in steps)
    assert all(r["loss"] == pytest.approx(r["absolute"] + r["relative"] + 0.5 * r["visibility"], rel=1e-5)
               for r in steps)
    assert all(v["val_visibility_auroc"] is None or 0 <= v["val_visibility_auroc"] <= 1 for v in full.val)
    assert all("val_nme_visible" in v and "val_heavy_occlusion" in v for v in full.val)


def test_data_without_visibility_labels_trains_and_says_the_head_gets_no_loss(synth_root, tmp_path, capsys,
                                                                            monkeypatch):
    root = tmp_path / "unlabelled"
    shutil.copytree(synth_root, root)
    sidecars = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".visibility.txt")]
    assert sidecars  # the built-in data has them; without them the WFLW reader has no per-point labels
    for path in sidecars:
        os.remove(path)
    out = str(tmp_path / "run")
    start = {}

    def build_and_keep_the_start(*args, **kwargs):
        model = build_model(*args, **kwargs)
        start.update((k, v.detach().clone()) for k, v in model.named_parameters())
        return model

    monkeypatch.setattr(train_module, "build_model", build_and_keep_the_start)
    result = train(tiny_config(str(root), out, train={"epochs": 1}, optim={"weight_decay": 0.05}))
    assert "has no per-landmark visibility labels: the visibility head gets no loss" in capsys.readouterr().out
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["visibility"] for r in records if "loss" in r] == [0.0] * result.steps
    assert all(v["val_visibility_auroc"] is None for v in result.val)
    # Frozen: not even weight decay moves its weights (the rest of the model trained).
    trained = dict(result.model.named_parameters())
    assert all(torch.equal(trained[k], v) for k, v in start.items() if k.startswith("visibility."))
    assert not torch.equal(trained["head.output.weight"], start["head.output.weight"])
