"""The training loop, in one linear pass: one process, or DDP under torchrun (NCCL on GPUs, gloo on CPU).

    structalign train wflw_lgrn_r34 data.root=data/wflw
    torchrun --standalone --nproc_per_node=8 -m structalign.cli train wflw_lgrn_r34 data.root=data/wflw
    structalign train wflw_lgrn_r34 --resume runs/wflw_lgrn_r34/last.pt

Writes under train.out_dir, once every check (resume included) has passed: config.yaml, log.jsonl and TensorBoard
scalars (structalign.engine.runlog), last.pt (every epoch, every train.save_every steps, and on a stop signal),
best.pt (lowest validation NME) and skipped.txt (the annotations and images left out under data.on_error=skip).
Validation uses a split carved from the training data, never the test set. A resumed run continues with exactly the
losses the uninterrupted run would have had.

The step never waits for the device: its losses are read at sync points only (RunLog.sync), where a non-finite loss
stops the run (the last checkpoint, written before it, is kept) and a stop signal on any rank (Ctrl-C, SIGTERM:
structalign.engine.stop_signals) makes every rank save and stop.
"""
import math
import os
import random
import signal
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from structalign.data import make_loader, mean_crop_landmarks, open_dataset, split_validation
from structalign.engine.checkpoint import (TrainState, check_resume, model_args, remove_stale_temporaries,
                                           resumed_checkpoint)
from structalign.engine.config import Config, ConfigError, check_paths
from structalign.engine.distributed import (DistEnv, broadcast_buffers, lost_contact, setup_distributed,
                                            teardown_distributed)
from structalign.engine.ema import EMA
from structalign.engine.evaluate import evaluate
from structalign.engine.finetune import init_from_checkpoint
from structalign.engine.optim import build_optimizer, build_scheduler, scaled_lr
from structalign.engine.precision import autocast_for
from structalign.engine.runlog import LOSS_PARTS, ROW, RunLog
from structalign.engine.stop_signals import STOP_EXIT_CODES, StopSignals
from structalign.losses import build_criterion
from structalign.models import build_model, load_backbone_weights
from structalign.models.lgrn import sync_graph_batch_norms


@dataclass
class TrainResult:
    """What a run returns: model and ema (the trained unwrapped module and its EMA copy or None), losses (per-step
    global mean loss), steps, epoch (the last one entered), interrupted (the name of the signal that stopped the
    run, SIGTERM where any rank had one, else None), best_nme and best_epoch (None without validation),
    last_checkpoint, best_checkpoint (None without validation), images_per_s and data_wait_share (RunLog.throughput),
    val (per-evaluation summaries) and is_main (whether this process is rank 0)."""

    model: torch.nn.Module
    ema: torch.nn.Module | None
    losses: list
    steps: int
    epoch: int
    interrupted: str | None
    best_nme: float | None
    best_epoch: int | None
    last_checkpoint: str
    best_checkpoint: str | None
    images_per_s: float | None
    data_wait_share: float | None
    val: list
    is_main: bool


def train(cfg: Config, resume: str | None = None, on_step=None, loader=None) -> TrainResult:
    """Train as cfg says; resume: a checkpoint, or "auto" (train.out_dir/last.pt where rank 0 finds it, else a new
    run); on_step(step) is called after every optimiser step (tests use it); loader: a structalign.data loader to train
    on instead of the one cfg.data describes (benchmarks feed synthetic batches). A rank that loses the others raises
    DistributedError (one line)."""
    try:
        return _run(cfg, resume, on_step, loader)
    except RuntimeError as exc:  # a collective that failed or timed out; anything else keeps its traceback
        lost = lost_contact(exc)
        if lost is None:
            raise
        raise lost from None


def _save(state: TrainState, path: str, epoch: int, batch: int, env: DistEnv, runlog: RunLog) -> None:
    """Checkpoint the run at (epoch, next batch) on every rank (the RNG gather is collective); never non-finite
    weights, which a finite loss may still have produced in its update."""
    if not torch.stack(torch._foreach_norm(list(state.model.parameters()))).isfinite().all():
        raise runlog.diverged(f"the weights became non-finite in step {state.step} (epoch {epoch - (batch == 0)}): "
                              f"the run diverged (lower optim.lr or set optim.grad_clip)")
    state.epoch, state.batch = epoch, batch
    state.save(path, env.rank, env.world_size)
    runlog.restart_clock()


def _run(cfg: Config, resume: str | None, on_step, loader) -> TrainResult:
    """The body of train()."""
    check_paths(cfg, resume)
    tc = cfg.train
    env = setup_distributed(tc.device, tc.dist_timeout_s)
    device, main = env.device, env.is_main
    saved = resumed_checkpoint(resume, tc.out_dir, env)
    torch.manual_seed(tc.seed + env.rank)
    np.random.seed(tc.seed + env.rank)
    random.seed(tc.seed + env.rank)
    torch.backends.cudnn.benchmark = tc.cudnn_benchmark

    # -- data -------------------------------------------------------------------------------------------------------
    full = open_dataset(cfg.data.root, fmt=cfg.data.format, split=cfg.data.train_split, on_error=cfg.data.on_error,
                        face_box=cfg.data.face_box, scheme=cfg.data.scheme)
    scheme = full.scheme
    train_ds, val_ds = (split_validation(full, fraction=cfg.data.val_fraction, seed=tc.seed)
                        if cfg.data.val_fraction > 0 else (full, None))
    shard = dict(device=device, image_size=cfg.data.image_size, backend=cfg.data.loader, shard_id=env.rank,
                 num_shards=env.world_size, num_threads=cfg.data.num_threads, seed=tc.seed,
                 padding=cfg.data.crop_padding, on_error=cfg.data.on_error)
    skipped_path = os.path.join(tc.out_dir, "skipped.txt")  # bad annotations, then images found bad while training
    train_loader = loader if loader is not None else make_loader(
        train_ds, tc.batch_size, train=True, balance=cfg.data.balance, augment=cfg.data.augment, drop_last=True,
        skip_log=skipped_path, **shard)
    val_loader = make_loader(val_ds, tc.eval_batch_size, train=False, drop_last=False, skip_log=skipped_path,
                             **shard) if val_ds else None
    batches_per_epoch = len(train_loader)
    steps_per_epoch = math.ceil(batches_per_epoch / tc.accumulate)

    # -- model, loss, optimiser, state ------------------------------------------------------------------------------
    warnings = check_resume(saved, cfg, scheme, env.world_size, saved["path"]) if saved is not None else []
    init_shape = None
    if cfg.model.init_mean_shape and saved is None:
        init_shape = mean_crop_landmarks(make_loader(train_ds, tc.eval_batch_size, train=False, drop_last=False,
                                                     **shard))
    try:  # its errors are checks of data.image_size and of the backbone-weights file
        raw_model = build_model(cfg.model, scheme, cfg.data.image_size, mean_shape=init_shape)
        if cfg.model.backbone_weights is not None and saved is None:
            load_backbone_weights(raw_model.backbone, cfg.model.backbone_weights)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"model: {exc}") from None
    transfer = init_from_checkpoint(raw_model, cfg.model.init_from) if cfg.model.init_from and saved is None else None
    # The visibility head learns from per-point labels only: on data without them (the random occlusion rectangle
    # alone would teach it "occluded" and never "visible") it is frozen, and its scores stay at their start.
    train_visibility = raw_model.visibility is not None and full.has_visibility_labels
    if raw_model.visibility is not None and not train_visibility:
        raw_model.visibility.requires_grad_(False)
    raw_model = raw_model.to(device, memory_format=torch.channels_last if tc.channels_last else torch.preserve_format)
    if env.distributed and tc.sync_bn:  # nn.SyncBatchNorm refuses CPU modules: there only the graph layers sync
        to_sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm if device.type == "cuda" else sync_graph_batch_norms
        raw_model = to_sync(raw_model)
    # NaN targets are caught on the device by the loop below, not by a host sync in the criterion.
    criterion = build_criterion(scheme=scheme, check_targets=False, **cfg.loss.criterion_args()).to(device)
    ema = EMA(raw_model, tc.ema_decay) if tc.ema_decay > 0 else None
    global_batch = tc.batch_size * tc.accumulate * env.world_size
    optimizer = build_optimizer(raw_model, cfg.optim, scaled_lr(cfg.optim, global_batch))
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, tc.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=tc.precision == "fp16" and device.type == "cuda")
    autocast = autocast_for(tc.precision, device)
    state = TrainState(raw_model, ema, optimizer, scheduler, scaler,
                       model_args(cfg.model, scheme, cfg.data.image_size), cfg.to_dict())
    if saved is not None:
        state.load_state_dict(saved, env.rank, env.world_size)
    # DDP first, then compile (torch's documented order): DDPOptimizer splits the compiled graph at DDP's buckets, so
    # their all-reduces overlap the compiled backward.
    model = raw_model
    if env.distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True, bucket_cap_mb=tc.ddp_bucket_mb)
        if ema is not None and saved is None:  # each rank's EMA copied its own initial weights: take rank 0's,
            ema.module.load_state_dict(raw_model.state_dict())  # which DDP broadcast
    if tc.compile:
        raw_model.cache_graph_tensors(device)
        # Under DDP the reducer's hooks run between the compiled graphs: one full graph only without it.
        model = torch.compile(model, fullgraph=not env.distributed, mode=tc.compile_mode)

    # -- the run folder: written only now that every check has passed ------------------------------------------------
    runlog = RunLog(cfg, env, state.step, steps_per_epoch * tc.epochs, resumed=saved is not None)
    last_path, best_path = os.path.join(tc.out_dir, "last.pt"), os.path.join(tc.out_dir, "best.pt")
    if main:
        for folder in {tc.out_dir, os.path.dirname(os.path.abspath(saved["path"] if saved else last_path))}:
            remove_stale_temporaries(folder)  # left by a run killed while saving
        if saved is None or not os.path.isfile(skipped_path):  # a resumed run keeps the images its loaders found bad
            full.write_skipped(skipped_path)
    notes = [f"data: skipped {len(full.skipped)} bad annotation(s) of {cfg.data.root}, listed in {skipped_path}"
             ] if full.skipped else []
    notes += [f"resume: {line}" for line in warnings]
    if cfg.model.init_from and saved is not None:
        notes.append(f"resume: model.init_from {cfg.model.init_from} is not used (the run continues from "
                     f"{saved['path']})")
    notes += transfer.lines() if transfer is not None else []
    if raw_model.visibility is not None and not train_visibility:
        notes.append(f"visibility: {cfg.data.root} ({cfg.data.format}) has no per-landmark visibility labels: the "
                     f"visibility head gets no loss and its scores mean nothing")
    runlog.say(notes + [f"train: {len(train_ds)} images ({batches_per_epoch} batches of {tc.batch_size} per rank), "
                        f"{env.world_size} process(es) on {device}, global batch {global_batch}, "
                        f"lr {scaled_lr(cfg.optim, global_batch):.4g}, {steps_per_epoch} steps/epoch"])

    # -- the loop ---------------------------------------------------------------------------------------------------
    interrupted, epoch, completed = 0, state.epoch, False  # interrupted: the signal that stopped the run
    start_epoch, start_batch = state.epoch, state.batch
    ignore_out_of_crop = cfg.data.out_of_crop == "ignore"
    with StopSignals(tc.preempt_grace_s, env.rank, env.distributed) as stop:
        try:
            for epoch in range(start_epoch, tc.epochs):
                batch_idx = start_batch if epoch == start_epoch else 0
                batches = iter(train_loader.epoch(epoch, start_batch=batch_idx))
                model.train()
                while batch_idx < batches_per_epoch:
                    group = min(tc.accumulate, batches_per_epoch - batch_idx)
                    row = torch.zeros(ROW, device=device)  # LOSS_PARTS (means over the micro-batches), finite
                    finite = torch.ones((), dtype=torch.bool, device=device)
                    for micro in range(group):
                        batch = runlog.next_batch(batches)
                        # Gradients are all-reduced on the last micro-batch only.
                        with nullcontext() if not env.distributed or micro == group - 1 else model.no_sync():
                            with autocast():
                                pred, visibility = model(batch.images)
                            # Occluded points are supervised: inferring them from structure is the point. Points
                            # outside the crop too, unless data.out_of_crop=ignore (README "Data").
                            loss, parts = criterion(pred.float(), batch.landmarks,
                                                    batch.in_crop if ignore_out_of_crop else None,
                                                    visibility if train_visibility else None, batch.visibility)
                            scaler.scale(loss / group).backward()
                        row[:-1] += torch.stack([loss.detach(), *(parts[k] for k in LOSS_PARTS[1:])]) / group
                        finite &= torch.isfinite(batch.landmarks).all() & torch.isfinite(batch.images).all()
                    row[-1] = finite.float()
                    runlog.step(row, (epoch, batch_idx), group * global_batch // tc.accumulate)
                    batch_idx += group
                    if cfg.optim.grad_clip > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.optim.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    if ema is not None:
                        ema.update(raw_model)
                    state.step += 1

                    save_now = tc.save_every and state.step % tc.save_every == 0 and batch_idx < batches_per_epoch
                    if (runlog.due(state.step) or save_now or batch_idx == batches_per_epoch
                            or (stop.received and not env.distributed)):
                        stopped = runlog.sync(state.step, optimizer.param_groups[0]["lr"], stop.received)
                        if stopped:
                            interrupted = max(stopped.values())
                            if main:
                                print(f"interrupt received on rank(s) {sorted(stopped)} of {env.world_size}: "
                                      f"saving a checkpoint at step {state.step} and stopping", flush=True)
                    if on_step is not None:
                        on_step(state.step)
                    if interrupted:
                        break
                    if save_now:
                        _save(state, last_path, epoch, batch_idx, env, runlog)
                if interrupted and batch_idx < batches_per_epoch:
                    _save(state, last_path, epoch, batch_idx, env, runlog)
                    break

                # -- end of epoch: validation, best and last checkpoints ----------------------------------------
                if val_loader is not None and ((epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs):
                    evaluated = ema.module if ema else raw_model
                    broadcast_buffers(evaluated, env)  # every rank evaluates the model rank 0 saves
                    result = evaluate(evaluated, val_loader, val_ds, env, autocast)
                    summary = {"epoch": epoch, "step": state.step,
                               **{f"val_{k}": v for k, v in result.summary().items()}}
                    improved = summary["val_nme"] < state.best_nme
                    if improved:
                        state.best_nme, state.best_epoch = summary["val_nme"], epoch
                    runlog.validation(summary, improved)
                    if improved:
                        _save(state, best_path, epoch + 1, 0, env, runlog)
                _save(state, last_path, epoch + 1, 0, env, runlog)
                if interrupted:
                    break
            completed = True
        finally:
            runlog.close()
            # Drop DDP's reducer while the process group is still registered: the reducer may hold the group's last
            # reference, and ~ProcessGroupGloo joins threads that need the GIL this thread holds (seen to deadlock).
            model = None
            teardown_distributed(env, synchronise=completed)  # after a failure the other ranks may be gone
    if main and interrupted:
        name = signal.Signals(interrupted).name
        print(f"interrupted ({name}) at step {state.step}; resume with --resume {last_path} or --resume auto (exit "
              f"status {STOP_EXIT_CODES[name]})", flush=True)
    validated = state.best_epoch is not None
    return TrainResult(raw_model, ema.module if ema else None, runlog.losses, state.step, epoch,
                       signal.Signals(interrupted).name if interrupted else None,
                       state.best_nme if validated else None, state.best_epoch, last_path,
                       best_path if validated else None, *runlog.throughput(), runlog.val, main)
