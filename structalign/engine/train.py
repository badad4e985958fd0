"""The training loop, in one linear pass: one process, or DDP under torchrun (NCCL on GPUs, gloo on CPU).

    structalign train wflw_lgrn_r34 data.root=data/wflw
    torchrun --standalone --nproc_per_node=8 -m structalign.cli train wflw_lgrn_r34 data.root=data/wflw
    structalign train wflw_lgrn_r34 --resume runs/wflw_lgrn_r34/last.pt

Writes under train.out_dir, once every check (resume included) has passed: config.yaml, log.jsonl (one record per
log step, one per validation), TensorBoard scalars (train.tensorboard), last.pt (every epoch, every train.save_every
steps, and on Ctrl-C), best.pt (lowest validation NME) and skipped.txt (the annotations and images left out under
data.on_error=skip). Validation uses a split carved from the training data, never the test set. A resumed run
continues with exactly the losses the uninterrupted run would have had.

The step never waits for the device. Its losses stay on the device and are read at sync points only: every
train.log_every steps, at the end of an epoch and before a mid-epoch save. There a non-finite loss stops the run naming
the first bad step (the last checkpoint, written before it, is kept), and an interrupt (Ctrl-C, SIGTERM) on any rank is
exchanged between the ranks (a single process stops after the current step); the ranks agree at each sync point on the
next one, at most half of train.preempt_grace_s away at the measured step time.
"""
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from structalign.data import make_loader, open_dataset, split_validation
from structalign.engine.checkpoint import TrainState, architecture, load_checkpoint, remove_stale_temporaries
from structalign.engine.config import Config, ConfigError, check_data_root
from structalign.engine.distributed import (all_reduce_sum, broadcast_buffers, from_main, lost_contact,
                                            setup_distributed, teardown_distributed)
from structalign.engine.ema import EMA
from structalign.engine.evaluate import evaluate
from structalign.engine.finetune import init_from_checkpoint
from structalign.engine.optim import build_optimizer, build_scheduler, scaled_lr
from structalign.engine.precision import autocast_for
from structalign.errors import StructalignError
from structalign.landmarks import LandmarkScheme, resolve_scheme
from structalign.losses import build_criterion, visibility_loss
from structalign.models import build_model
from structalign.models.lgrn import sync_graph_batch_norms

# Settings the data position of a checkpoint depends on (batches per epoch, sample order, validation split).
RESUME_FIXED = ("train.batch_size", "train.accumulate", "train.seed", "data.val_fraction")
LOSS_PARTS = ("loss", "absolute", "relative", "visibility")  # what a step logs (visibility: its unweighted BCE)
ROW = len(LOSS_PARTS) + 1  # per step, read at sync points: the loss parts and the number of finite batches
# Exit status of a run stopped by a signal (the CLI's, and a rank's whose grace period ran out): 130 for Ctrl-C as a
# shell reports it, 75 (EX_TEMPFAIL) for SIGTERM, a preemption: requeue the same command with --resume auto.
STOP_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 75}


class NonFiniteLossError(StructalignError, FloatingPointError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


def model_args(cfg: Config, scheme: LandmarkScheme) -> dict:
    """The architecture keywords of build_model for a run (stored in checkpoints to rebuild the model): the scheme's
    content (a checkpoint needs no scheme file), no weights file (a checkpoint holds the weights) and no op backend
    (how to run, not what)."""
    m = cfg.model
    return dict(arch=m.arch, backbone=m.backbone, scheme=scheme.to_dict(), image_size=cfg.data.image_size,
                head_width=m.head_width, num_blocks=m.num_blocks, adjacency=m.adjacency, map_to_node=m.map_to_node,
                backbone_width=m.backbone_width, bn_momentum=m.bn_momentum, fc_width=m.fc_width,
                visibility_head=m.visibility_head, visibility_gate=m.visibility_gate)


def mean_shape(loader, max_images: int = 512) -> np.ndarray:
    """Mean landmarks (ndarray[N, 2], crop pixels) over the first max_images of an un-augmented loader."""
    total, count = 0.0, 0
    for batch in loader.epoch(0):
        total = total + batch.landmarks.double().sum(dim=0)
        count += batch.landmarks.shape[0]
        if count >= max_images:
            break
    return (total / count).float().cpu().numpy()


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"train": {"seed": 0}} -> {"train.seed": 0}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not prefix:
            out.update(_flat(value, f"{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out


def check_resume(saved: dict, cfg: Config, args: dict, world_size: int, path: str) -> list:
    """ConfigError when checkpoint `saved` cannot continue this run; else a warning line per changed setting (the
    run goes on with this config's value)."""
    old_args = architecture(saved["model_args"])
    old_scheme, new_scheme = resolve_scheme(old_args.pop("scheme")), resolve_scheme(args["scheme"])
    if old_scheme != new_scheme:
        raise ConfigError(f"--resume {path}: the checkpoint's landmark scheme {old_scheme.name} "
                          f"({old_scheme.num_points} points) differs from the data's {new_scheme.name} "
                          f"({new_scheme.num_points} points); fine-tune with model.init_from instead")
    args = {k: v for k, v in args.items() if k != "scheme"}
    if old_args != args:
        diff = ", ".join(f"{k} {old_args.get(k)!r} -> {args.get(k)!r}" for k in args if old_args.get(k) != args[k])
        raise ConfigError(f"--resume {path}: the checkpoint holds a different model ({diff}); resume with the "
                          f"checkpoint's model settings or start a new run")
    old, new = _flat(saved["config"]), _flat(cfg.to_dict())
    where = f"epoch {saved['epoch']}, batch {saved['batch']}"
    for key in RESUME_FIXED:
        if old.get(key) != new[key]:
            raise ConfigError(f"--resume {path}: {key} changed from {old.get(key)!r} to {new[key]!r}, but the "
                              f"checkpoint's data position ({where}) depends on it; resume with "
                              f"{key}={old.get(key)!r} or start a new run")
    saved_world = len(saved["rng"])
    if saved_world != world_size:
        raise ConfigError(f"--resume {path}: the checkpoint was written by {saved_world} process(es), this run has "
                          f"{world_size}; the data shards and the global batch depend on it")
    return [f"{key} changed from {old[key]!r} to {value!r} (this run's value is used)" if key in old else
            f"{key} is not in the checkpoint's config (an older version); this run uses {value!r}"
            for key, value in new.items() if old.get(key, object()) != value]


def keep_log_until(path: str, step: int) -> None:
    """Drop from log.jsonl the records after `step` (a resumed run trains those steps again) and a torn last line."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def train(cfg: Config, resume: str | None = None, on_step=None, loader=None) -> dict:
    """Train as cfg says; resume: a checkpoint, or "auto" (train.out_dir/last.pt where rank 0 finds it, else a new
    run); on_step(step) is called after every optimiser step (tests use it); loader: a structalign.data loader to train
    on instead of the one cfg.data describes (benchmarks feed synthetic batches). A rank that loses the others raises
    DistributedError (one line).

    Returns {"model": the trained unwrapped module, "ema": its EMA copy or None, "losses": per-step global mean
    loss, "steps", "epoch", "interrupted", "best_nme", "best_epoch", "last_checkpoint", "best_checkpoint",
    "images_per_s", "data_wait_share", "val": per-evaluation summaries, "is_main": whether this process is rank 0};
    "interrupted" is the name of the signal that stopped the run (SIGTERM where any rank had one), or None.
    """
    try:
        return _run(cfg, resume, on_step, loader)
    except RuntimeError as exc:  # a collective that failed or timed out; anything else keeps its traceback
        lost = lost_contact(exc)
        if lost is None:
            raise
        raise lost from None


def _run(cfg: Config, resume: str | None, on_step, loader) -> dict:
    """The body of train()."""
    # -- checks before any work -------------------------------------------------------------------------------------
    check_data_root(cfg)
    if resume not in (None, "auto") and not os.path.isfile(resume):
        raise ConfigError(f"--resume: checkpoint {resume!r} does not exist")
    if cfg.model.init_from is not None and not os.path.isfile(cfg.model.init_from):
        raise ConfigError(f"model.init_from: checkpoint {cfg.model.init_from!r} does not exist")
    tc = cfg.train
    if os.path.exists(tc.out_dir) and not os.path.isdir(tc.out_dir):
        raise ConfigError(f"train.out_dir: {tc.out_dir!r} exists and is not a directory")
    env = setup_distributed(tc.device, tc.dist_timeout_s)
    device, main = env.device, env.is_main
    if resume == "auto":  # rank 0 decides, so that every rank continues from the same checkpoint
        last = os.path.join(tc.out_dir, "last.pt")
        resume = from_main(last if os.path.isfile(last) else None, env)
        if main:
            print(f"--resume auto: {'continuing from ' + last if resume else 'no ' + last + ' yet, starting the run'}",
                  flush=True)
    torch.manual_seed(tc.seed + env.rank)
    np.random.seed(tc.seed + env.rank)
    random.seed(tc.seed + env.rank)
    torch.backends.cudnn.benchmark = tc.cudnn_benchmark

    # -- data -------------------------------------------------------------------------------------------------------
    full = open_dataset(cfg.data.root, fmt=cfg.data.format, split=cfg.data.train_split, on_error=cfg.data.on_error,
                        face_box=cfg.data.face_box, scheme=cfg.data.scheme)
    scheme = full.scheme
    if cfg.data.val_fraction > 0:
        train_ds, val_ds = split_validation(full, fraction=cfg.data.val_fraction, seed=tc.seed)
    else:
        train_ds, val_ds = full, None
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
    args = model_args(cfg, scheme)
    saved = load_checkpoint(resume, map_location=device) if resume is not None else None
    if saved is not None and env.distributed:  # the same file on every rank: one train.out_dir that all nodes share
        if all_reduce_sum(torch.tensor([saved["step"]], device=device), env).item() != saved["step"] * env.world_size:
            raise ConfigError(f"--resume {resume}: rank {env.rank} reads step {saved['step']} there and another rank a "
                              f"different step; train.out_dir must be one folder that every node shares")
    warnings = check_resume(saved, cfg, args, env.world_size, resume) if saved is not None else []
    init_shape = None
    if cfg.model.init_mean_shape and saved is None:
        init_shape = mean_shape(make_loader(train_ds, tc.eval_batch_size, train=False, drop_last=False, **shard))
    try:  # its ValueErrors are checks of the config's model values and of the backbone-weights file
        raw_model = build_model(**args, op_backend=cfg.model.op_backend, mean_shape=init_shape,
                                backbone_weights=cfg.model.backbone_weights if saved is None else None)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"model: {exc}") from None
    transfer = init_from_checkpoint(raw_model, cfg.model.init_from) if cfg.model.init_from and saved is None else None
    raw_model = raw_model.to(device, memory_format=torch.channels_last if tc.channels_last else torch.preserve_format)
    if env.distributed and tc.sync_bn:  # nn.SyncBatchNorm refuses CPU modules: there only the graph layers sync
        to_sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm if device.type == "cuda" else sync_graph_batch_norms
        raw_model = to_sync(raw_model)
    # NaN targets are caught on the device by the loop below, not by a host sync in the criterion.
    criterion = build_criterion(cfg.loss.name, relative=cfg.loss.relative, relative_weight=cfg.loss.relative_weight,
                                scheme=scheme, check_targets=False, **cfg.loss.params.model_dump()).to(device)
    # The visibility head learns from per-point labels only: on data without them (the random occlusion rectangle
    # alone would teach it "occluded" and never "visible") it gets no loss, and its scores stay at their start.
    train_visibility = raw_model.visibility is not None and full.has_visibility_labels
    ema = EMA(raw_model, tc.ema_decay) if tc.ema_decay > 0 else None
    global_batch = tc.batch_size * tc.accumulate * env.world_size
    optimizer = build_optimizer(raw_model, cfg.optim, scaled_lr(cfg.optim, global_batch))
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, tc.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=tc.precision == "fp16" and device.type == "cuda")
    autocast = autocast_for(tc.precision, device)
    state = TrainState(raw_model, ema, optimizer, scheduler, scaler, model_args=args, config=cfg.to_dict())
    if saved is not None:
        state.load_state_dict(saved, env.rank, env.world_size)
    # DDP first, then compile (torch's documented order): DDPOptimizer splits the compiled graph at DDP's buckets, so
    # their all-reduces overlap the compiled backward.
    model = raw_model
    if env.distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True, bucket_cap_mb=tc.ddp_bucket_mb)
    if tc.compile:
        raw_model.cache_graph_tensors(device)
        # Under DDP the reducer's hooks run between the compiled graphs: one full graph only without it.
        model = torch.compile(model, fullgraph=not env.distributed, mode=tc.compile_mode)

    # -- the run folder: written only now that every check has passed ------------------------------------------------
    last_path, best_path = os.path.join(tc.out_dir, "last.pt"), os.path.join(tc.out_dir, "best.pt")
    log_path = os.path.join(tc.out_dir, "log.jsonl")
    log = board = None
    if main:
        os.makedirs(tc.out_dir, exist_ok=True)
        for folder in {tc.out_dir, os.path.dirname(os.path.abspath(resume or last_path))}:
            remove_stale_temporaries(folder)  # left by a run killed while saving
        with open(os.path.join(tc.out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), f, sort_keys=False)
        if saved is None or not os.path.isfile(skipped_path):  # a resumed run keeps the images its loaders found bad
            full.write_skipped(skipped_path)
        if full.skipped:
            print(f"data: skipped {len(full.skipped)} bad annotation(s) of {cfg.data.root}, listed in {skipped_path}",
                  flush=True)
        if saved is not None:
            keep_log_until(log_path, state.step)
        log = open(log_path, "a")
        if tc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported on use: it takes a second

            board = SummaryWriter(tc.out_dir, purge_step=state.step + 1 if saved is not None else None)
        for line in warnings:
            print(f"resume: {line}", flush=True)
        if cfg.model.init_from and saved is not None:
            print(f"resume: model.init_from {cfg.model.init_from} is not used (the run continues from {resume})")
        for line in transfer.lines() if transfer is not None else ():
            print(line, flush=True)
        if raw_model.visibility is not None and not train_visibility:
            print(f"visibility: {cfg.data.root} ({cfg.data.format}) has no per-landmark visibility labels: the "
                  f"visibility head gets no loss and its scores mean nothing", flush=True)
        print(f"train: {len(train_ds)} images ({batches_per_epoch} batches of {tc.batch_size} per rank), "
              f"{env.world_size} process(es) on {device}, global batch {global_batch}, "
              f"lr {scaled_lr(cfg.optim, global_batch):.4g}, {steps_per_epoch} steps/epoch", flush=True)

    # Each rank's EMA copied its own initial weights: all start from rank 0's, which DDP broadcast (as on a resume).
    if ema is not None and env.distributed and saved is None:
        ema.module.load_state_dict(raw_model.state_dict())

    # Ctrl-C, or SIGTERM (a scheduler's preemption, which torchrun forwards): the ranks stop together at the next sync
    # point and save; within train.preempt_grace_s in any case (else the process exits without a new checkpoint). A
    # second Ctrl-C aborts; a repeated SIGTERM (a scheduler may signal torchrun and its workers alike) changes nothing.
    interrupt = {"signal": 0}

    def out_of_grace():
        name = signal.Signals(interrupt["signal"]).name
        print(f"rank {env.rank}: no sync point within train.preempt_grace_s={tc.preempt_grace_s:g} s of {name}: "
              f"exiting without a new checkpoint", file=sys.stderr, flush=True)
        os._exit(STOP_EXIT_CODES[name])

    grace = threading.Timer(tc.preempt_grace_s, out_of_grace)
    grace.daemon = True

    def on_interrupt(signum, frame):
        if interrupt["signal"]:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        interrupt["signal"] = signum
        grace.start()
        print(f"\ninterrupt ({signal.Signals(signum).name}, rank {env.rank}): saving a checkpoint at the next "
              f"{'sync point' if env.distributed else 'step'} (Ctrl-C again to abort)", flush=True)

    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous_handlers = {sig: signal.signal(sig, on_interrupt) for sig in handled}
    bar = tqdm(total=steps_per_epoch * tc.epochs, initial=state.step, unit="step", dynamic_ncols=True,
               disable=None if main and tc.progress else True)  # None: only on a terminal

    # -- sync point: the only place the host reads what the device computed --------------------------------------
    # Per step since the last sync point: (Tensor[ROW] on the device: the step's LOSS_PARTS and whether its batches
    # were finite), (epoch, batch).
    pending, positions = [], []
    losses, history = [], []
    clock = {"last": time.perf_counter(), "images": 0, "wait": 0.0}  # since the last sync point (or save)
    intervals = []  # (images, seconds, seconds waiting for data) between sync points
    due = {"step": tc.log_every}  # the next sync point at the latest

    def diverged(what: str) -> NonFiniteLossError:
        good = f"the last good checkpoint is {last_path}" if os.path.exists(last_path) else \
            "no checkpoint was written yet"
        return NonFiniteLossError(f"{what}; stopped, {good}")

    def sync_point() -> list:
        """All-reduce and read the losses of the steps since the last sync point, log them, stop on a non-finite
        loss or a non-finite batch; returns {rank: signal number} of the ranks that were interrupted."""
        flags = torch.zeros(env.world_size + 1, device=device)
        flags[env.rank] = float(interrupt["signal"])
        flags[-1] = time.perf_counter() - clock["last"]  # this rank's seconds since the last sync point
        packed = all_reduce_sum(torch.cat([torch.stack(pending).flatten(), flags]), env)
        values = packed.tolist()  # the host sync
        rows = [values[ROW * i:ROW * i + ROW] for i in range(len(pending))]
        first = state.step - len(rows) + 1
        for i, (loss, *_, finite_batches) in enumerate(rows):
            if math.isfinite(loss) and finite_batches == env.world_size:
                continue
            epoch_at, batch_at = positions[i]
            where = f"at step {first + i} (epoch {epoch_at}, batch {batch_at})"
            if finite_batches != env.world_size:
                raise diverged(f"a training batch holds NaN or infinite images or landmarks {where} (a corrupt "
                               f"sample or a loader fault)")
            raise diverged(f"non-finite loss ({loss / env.world_size}) {where}: the run diverged (lower optim.lr "
                           f"or set optim.grad_clip)")
        mean = dict(zip(LOSS_PARTS, (sum(r[j] for r in rows) / len(rows) / env.world_size
                                     for j in range(len(LOSS_PARTS)))))
        losses.extend(r[0] / env.world_size for r in rows)
        now = time.perf_counter()
        seconds = now - clock["last"]
        speed, wait = clock["images"] / seconds, clock["wait"] / seconds
        intervals.append((clock["images"], seconds, clock["wait"]))
        clock.update(last=now, images=0, wait=0.0)
        if main:
            lr = optimizer.param_groups[0]["lr"]
            record = {"step": state.step, "epoch": positions[-1][0], **mean, "lr": lr, "images_per_s": speed,
                      "data_wait": wait, "steps": len(rows)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            if board is not None:
                for key in (*LOSS_PARTS, "lr", "images_per_s", "data_wait"):
                    board.add_scalar(f"train/{key}", record[key], state.step)
            bar.set_postfix(loss=f"{mean['loss']:.4f}", img_s=f"{speed:.0f}", refresh=False)
            tqdm.write(f"epoch {record['epoch']} step {state.step}/{bar.total} loss {mean['loss']:.4f} (abs "
                       f"{mean['absolute']:.4f} rel {mean['relative']:.4f} vis {mean['visibility']:.4f}) lr {lr:.3g} "
                       f"{speed:.1f} img/s, data wait {100 * wait:.0f} %")
        # Half the grace period on at the measured step time: the same on every rank (computed from summed values).
        step_s = values[-1] / env.world_size / len(rows)
        due["step"] = state.step + max(1, min(tc.log_every, int(tc.preempt_grace_s / 2 / step_s)))
        pending.clear()
        positions.clear()
        return {rank: int(flag) for rank, flag in enumerate(values[ROW * len(rows):-1]) if flag}

    def save(path: str, epoch: int, batch: int) -> None:
        # A finite loss may still have produced non-finite weights in its update: never save those.
        if not torch.stack(torch._foreach_norm(list(raw_model.parameters()))).isfinite().all():
            raise diverged(f"the weights became non-finite in step {state.step} (epoch {epoch - (batch == 0)}): "
                           f"the run diverged (lower optim.lr or set optim.grad_clip)")
        state.epoch, state.batch = epoch, batch
        state.save(path, env.rank, env.world_size)  # every rank: the RNG gather is collective
        clock["last"] = time.perf_counter()

    # -- the loop ---------------------------------------------------------------------------------------------------
    interrupted, epoch, completed = 0, state.epoch, False  # interrupted: the signal that stopped the run
    start_epoch, start_batch = state.epoch, state.batch
    try:
        for epoch in range(start_epoch, tc.epochs):
            batch_idx = start_batch if epoch == start_epoch else 0
            batches = iter(train_loader.epoch(epoch, start_batch=batch_idx))
            model.train()
            while batch_idx < batches_per_epoch:
                group = min(tc.accumulate, batches_per_epoch - batch_idx)
                step_loss = torch.zeros(len(LOSS_PARTS), device=device)  # mean over the micro-batches
                finite = torch.ones((), dtype=torch.bool, device=device)
                for micro in range(group):
                    t0 = time.perf_counter()
                    batch = next(batches)
                    clock["wait"] += time.perf_counter() - t0
                    # Gradients are all-reduced on the last micro-batch only.
                    sync = nullcontext() if not env.distributed or micro == group - 1 else model.no_sync()
                    with sync:
                        with autocast():
                            pred, visibility = model(batch.images)
                        # Occluded points are supervised: inferring them from structure is the point. Points outside
                        # the crop too, unless data.out_of_crop=ignore (README "Data").
                        weights = batch.in_crop if cfg.data.out_of_crop == "ignore" else None
                        loss, parts = criterion(pred.float(), batch.landmarks, weights)
                        if train_visibility:  # 0 on a batch without labels (the head's gradients are 0)
                            parts["visibility"] = visibility_loss(visibility, batch.visibility)
                            loss = loss + cfg.loss.visibility_weight * parts["visibility"]
                        elif visibility is not None:  # unused, yet in the graph: DDP expects its gradients
                            loss = loss + 0.0 * visibility.sum()
                        scaler.scale(loss / group).backward()
                    step_loss += torch.stack([loss.detach(), *(parts.get(k, loss.new_zeros(())).detach()
                                                               for k in LOSS_PARTS[1:])]) / group
                    finite &= torch.isfinite(batch.landmarks).all() & torch.isfinite(batch.images).all()
                positions.append((epoch, batch_idx))
                pending.append(torch.cat([step_loss, finite.float()[None]]))
                batch_idx += group
                clock["images"] += group * global_batch // tc.accumulate
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
                bar.update()

                save_now = tc.save_every and state.step % tc.save_every == 0 and batch_idx < batches_per_epoch
                if (state.step % tc.log_every == 0 or state.step >= due["step"] or batch_idx == batches_per_epoch
                        or save_now or (interrupt["signal"] and not env.distributed)):
                    stopped = sync_point()
                    if stopped:
                        interrupted = max(stopped.values())
                        if main:
                            print(f"interrupt received on rank(s) {sorted(stopped)} of {env.world_size}: saving a "
                                  f"checkpoint at step {state.step} and stopping", flush=True)
                if on_step is not None:
                    on_step(state.step)
                if interrupted:
                    break
                if save_now:
                    save(last_path, epoch, batch_idx)
            if interrupted and batch_idx < batches_per_epoch:
                save(last_path, epoch, batch_idx)
                break

            # -- end of epoch: validation, best and last checkpoints --------------------------------------------
            if val_loader is not None and ((epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs):
                evaluated = ema.module if ema else raw_model
                broadcast_buffers(evaluated, env)  # every rank evaluates the model rank 0 saves
                result = evaluate(evaluated, val_loader, val_ds, env, autocast)
                summary = {"epoch": epoch, "step": state.step,
                           **{f"val_{k}": v for k, v in result.summary().items()}}
                history.append(summary)
                improved = summary["val_nme"] < state.best_nme
                if improved:
                    state.best_nme, state.best_epoch = summary["val_nme"], epoch
                if main:
                    log.write(json.dumps(summary) + "\n")
                    log.flush()
                    if board is not None:
                        for key in ("nme", "fr", "auc", "nme_occluded", "visibility_auroc"):
                            if summary[f"val_{key}"] is not None:
                                board.add_scalar(f"val/{key}", summary[f"val_{key}"], state.step)
                    auroc = summary["val_visibility_auroc"]
                    tqdm.write(f"epoch {epoch}: val NME {summary['val_nme']:.3f}% FR {summary['val_fr']:.2f}% "
                               f"AUC {summary['val_auc']:.4f}{'' if auroc is None else f' visibility AUROC {auroc:.3f}'}"
                               f"{' (best)' if improved else ''}")
                if improved:
                    save(best_path, epoch + 1, 0)
            save(last_path, epoch + 1, 0)
            if interrupted:
                break
        completed = True
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        bar.close()
        if log is not None:
            log.close()
        if board is not None:
            board.close()
        # Drop DDP's reducer while the process group is still registered: the reducer may hold the group's last
        # reference, and ~ProcessGroupGloo joins threads that need the GIL this thread holds (seen to deadlock).
        model = None
        teardown_distributed(env, synchronise=completed)  # after a failure the other ranks may be gone
        grace.cancel()
    if main and interrupted:
        name = signal.Signals(interrupted).name
        print(f"interrupted ({name}) at step {state.step}; resume with --resume {last_path} or --resume auto (exit "
              f"status {STOP_EXIT_CODES[name]})", flush=True)
    timed = intervals[1:] or intervals  # the first interval pays for warm-up (allocations, compilation)
    timed_s = sum(t[1] for t in timed)
    return {"model": raw_model, "ema": ema.module if ema else None, "losses": losses, "steps": state.step,
            "epoch": epoch, "interrupted": signal.Signals(interrupted).name if interrupted else None,
            "best_nme": state.best_nme if state.best_epoch is not None else None, "best_epoch": state.best_epoch,
            "last_checkpoint": last_path, "best_checkpoint": best_path if state.best_epoch is not None else None,
            "images_per_s": sum(t[0] for t in timed) / timed_s if timed else None,
            "data_wait_share": sum(t[2] for t in timed) / timed_s if timed else None, "val": history, "is_main": main}
