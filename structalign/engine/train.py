"""The training loop, in one linear pass: one process, or DDP under torchrun (NCCL on GPUs, gloo on CPU).

    structalign train wflw_lgrn_r34 data.root=data/wflw
    torchrun --standalone --nproc_per_node=8 -m structalign.cli train wflw_lgrn_r34 data.root=data/wflw
    structalign train wflw_lgrn_r34 --resume runs/wflw_lgrn_r34/last.pt

Writes under train.out_dir: config.yaml, log.jsonl (metrics), last.pt (every epoch, every train.save_every steps, and
on Ctrl-C) and best.pt (lowest validation NME). Validation uses a split carved from the training data, never the test
set. A resumed run continues with exactly the losses the uninterrupted run would have had.
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
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from structalign.data import AugmentConfig, make_loader, open_dataset, split_validation
from structalign.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from structalign.engine.config import Config, ConfigError, check_data_root
from structalign.engine.distributed import all_reduce_sum, setup_distributed, teardown_distributed
from structalign.engine.ema import EMA
from structalign.engine.evaluate import evaluate
from structalign.engine.optim import build_optimizer, build_scheduler, scaled_lr
from structalign.losses import build_criterion, build_point_loss
from structalign.models import build_model


def augment_config(cfg: Config):
    """data.augment as a structalign.data.AugmentConfig (None = no augmentation); ConfigError for unknown keys."""
    if cfg.data.augment is None:
        return None
    try:
        return AugmentConfig(**cfg.data.augment)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"data.augment: {exc}") from None


def model_args(cfg: Config, scheme_name: str) -> dict:
    """The build_model keyword arguments of a run (stored in checkpoints to rebuild the model)."""
    m = cfg.model
    return dict(arch=m.arch, backbone=m.backbone, scheme=scheme_name, image_size=cfg.data.image_size,
                head_width=m.head_width, num_blocks=m.num_blocks, adjacency=m.adjacency, map_to_node=m.map_to_node,
                backbone_weights=m.backbone_weights, op_backend=m.op_backend, backbone_width=m.backbone_width,
                bn_momentum=m.bn_momentum, fc_width=m.fc_width)


def mean_shape(loader, max_images: int = 512) -> np.ndarray:
    """Mean landmarks (ndarray[N, 2], crop pixels) over the first max_images of an un-augmented loader."""
    total, count = 0.0, 0
    for batch in loader.epoch(0):
        total = total + batch.landmarks.double().sum(dim=0)
        count += batch.landmarks.shape[0]
        if count >= max_images:
            break
    return (total / count).float().cpu().numpy()


def autocast_for(precision: str, device: torch.device):
    """A context factory: bf16/fp16 autocast on CUDA, nothing on CPU (CPU autocast slows these convolutions)."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext
    return partial(torch.autocast, "cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _gather_rng(env) -> list:
    states = [None] * env.world_size
    if env.distributed:
        dist.all_gather_object(states, rng_state())
    else:
        states[0] = rng_state()
    return states


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train(cfg: Config, resume: str | None = None, on_step=None) -> dict:
    """Train as cfg says; on_step(step, loss) is called after every optimiser step (tests use it).

    Returns {"model": the trained unwrapped module, "ema": its EMA copy or None, "losses": per-step global mean
    loss, "steps", "epoch", "interrupted", "best_nme", "best_epoch", "last_checkpoint", "best_checkpoint",
    "images_per_s", "val": per-evaluation summaries}.
    """
    # -- checks before any work -------------------------------------------------------------------------------------
    check_data_root(cfg)
    augment = augment_config(cfg)
    try:
        build_point_loss(cfg.loss.name, **cfg.loss.params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"loss: {exc}") from None
    if resume is not None and not os.path.isfile(resume):
        raise ConfigError(f"--resume: checkpoint {resume!r} does not exist")
    tc = cfg.train
    env = setup_distributed(tc.device)
    device, main = env.device, env.is_main
    torch.manual_seed(tc.seed + env.rank)
    np.random.seed(tc.seed + env.rank)
    random.seed(tc.seed + env.rank)
    os.makedirs(tc.out_dir, exist_ok=True)
    last_path, best_path = os.path.join(tc.out_dir, "last.pt"), os.path.join(tc.out_dir, "best.pt")
    if main:
        with open(os.path.join(tc.out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), f, sort_keys=False)

    # -- data -------------------------------------------------------------------------------------------------------
    full = open_dataset(cfg.data.root, fmt=cfg.data.format, split=cfg.data.train_split)
    scheme = full.scheme
    if cfg.data.val_fraction > 0:
        train_ds, val_ds = split_validation(full, fraction=cfg.data.val_fraction, seed=tc.seed)
    else:
        train_ds, val_ds = full, None
    shard = dict(device=device, image_size=cfg.data.image_size, backend=cfg.data.loader, shard_id=env.rank,
                 num_shards=env.world_size, num_threads=cfg.data.num_threads, seed=tc.seed)
    train_loader = make_loader(train_ds, tc.batch_size, train=True, balance=cfg.data.balance, augment=augment,
                               drop_last=True, **shard)
    val_loader = make_loader(val_ds, tc.eval_batch_size, train=False, drop_last=False, **shard) if val_ds else None
    batches_per_epoch = len(train_loader)
    steps_per_epoch = math.ceil(batches_per_epoch / tc.accumulate)

    # -- model, loss, optimiser -------------------------------------------------------------------------------------
    args = model_args(cfg, scheme.name)
    init_shape = None
    if cfg.model.init_mean_shape and resume is None:
        init_shape = mean_shape(make_loader(train_ds, tc.eval_batch_size, train=False, drop_last=False, **shard))
    raw_model = build_model(**args, mean_shape=init_shape).to(device)
    if env.distributed and tc.sync_bn and device.type == "cuda":  # SyncBatchNorm refuses CPU modules
        raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    criterion = build_criterion(cfg.loss.name, relative=cfg.loss.relative, relative_weight=cfg.loss.relative_weight,
                                scheme=scheme.name, **cfg.loss.params).to(device)
    ema = EMA(raw_model, tc.ema_decay) if tc.ema_decay > 0 else None
    global_batch = tc.batch_size * tc.accumulate * env.world_size
    optimizer = build_optimizer(raw_model, cfg.optim, scaled_lr(cfg.optim, global_batch))
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, tc.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=tc.precision == "fp16" and device.type == "cuda")
    autocast = autocast_for(tc.precision, device)

    start_epoch, start_batch, step, best_nme, best_epoch = 0, 0, 0, math.inf, None
    if resume is not None:
        state = load_checkpoint(resume, map_location=device)
        if state["model_args"] != args:
            raise ConfigError(f"--resume {resume}: the checkpoint's model {state['model_args']} differs from this "
                              f"config's {args}")
        raw_model.load_state_dict(state["model"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        best_nme, best_epoch = state["best_nme"], state["best_epoch"]
        rngs = state["rng"]
        set_rng_state(rngs[env.rank] if len(rngs) == env.world_size else rngs[0])
    model = torch.compile(raw_model) if tc.compile else raw_model
    if env.distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True)

    def checkpoint(epoch: int, batch: int) -> dict:
        return {"model": raw_model.state_dict(), "ema": ema.state_dict() if ema else None, "model_args": args,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "batch": batch, "step": step, "best_nme": best_nme,
                "best_epoch": best_epoch, "rng": _gather_rng(env), "config": cfg.to_dict()}

    def save(path: str, epoch: int, batch: int) -> None:
        state = checkpoint(epoch, batch)  # every rank: the RNG gather is collective
        if main:
            save_checkpoint(path, state)

    # Ctrl-C (or SIGTERM from a scheduler): finish the current step, save, exit cleanly; a second one aborts at once.
    interrupt = {"requested": False}

    def on_interrupt(signum, frame):
        if interrupt["requested"]:
            raise KeyboardInterrupt
        interrupt["requested"] = True
        if main:
            print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)", flush=True)

    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous_handlers = {sig: signal.signal(sig, on_interrupt) for sig in handled}
    log = open(os.path.join(tc.out_dir, "log.jsonl"), "a") if main else None
    tty = main and sys.stderr.isatty()
    if main:
        print(f"train: {len(train_ds)} images ({batches_per_epoch} batches of {tc.batch_size} per rank), "
              f"{env.world_size} process(es) on {device}, global batch {global_batch}, "
              f"lr {scaled_lr(cfg.optim, global_batch):.4g}, {steps_per_epoch} steps/epoch", flush=True)

    # -- the loop ---------------------------------------------------------------------------------------------------
    losses, history, interrupted = [], [], False
    timed_images, timed_seconds, t_prev = 0, 0.0, time.perf_counter()
    total_steps = steps_per_epoch * tc.epochs
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, tc.epochs):
            batch_idx = start_batch if epoch == start_epoch else 0
            batches = iter(train_loader.epoch(epoch, start_batch=batch_idx))
            model.train()
            while batch_idx < batches_per_epoch:
                group = min(tc.accumulate, batches_per_epoch - batch_idx)
                step_loss = torch.zeros(4, device=device)  # loss, absolute, relative, interrupt flag
                for micro in range(group):
                    batch = next(batches)
                    # Gradients are all-reduced on the last micro-batch only.
                    sync = nullcontext() if not env.distributed or micro == group - 1 else model.no_sync()
                    with sync:
                        with autocast():
                            pred = model(batch.images)
                        # All points are supervised, occluded ones too: inferring them from structure is the point.
                        loss, parts = criterion(pred.float(), batch.landmarks)
                        scaler.scale(loss / group).backward()
                    step_loss[:3] += torch.stack([loss.detach(), parts["absolute"].detach(),
                                                  parts["relative"].detach()]) / group
                batch_idx += group
                step_loss[:3] /= env.world_size
                step_loss[3] = float(interrupt["requested"])
                all_reduce_sum(step_loss, env)  # the global mean loss, and whether any rank was interrupted
                loss_value, absolute, relative, stop = step_loss.tolist()  # one sync per step: NaN must name its step
                if not math.isfinite(loss_value):
                    where = f"at step {step + 1} (epoch {epoch}, batch {batch_idx - 1})"
                    good = f"the last good checkpoint is {last_path}" if os.path.exists(last_path) else \
                        "no checkpoint was written yet"
                    raise FloatingPointError(f"non-finite loss ({loss_value}) {where}; stopped, {good}")
                if cfg.optim.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update(raw_model)
                step += 1
                losses.append(loss_value)
                if on_step is not None:
                    on_step(step, loss_value)

                now = time.perf_counter()
                if step > 1:  # the first step pays for warm-up (allocations, compilation)
                    timed_images += group * global_batch // tc.accumulate
                    timed_seconds += now - t_prev
                t_prev = now
                speed = timed_images / timed_seconds if timed_seconds > 0 else 0.0
                eta = (total_steps - step) * global_batch / speed if speed > 0 else 0.0
                if main and (step % tc.log_every == 0 or step == 1):
                    lr = optimizer.param_groups[0]["lr"]
                    record = {"step": step, "epoch": epoch, "loss": loss_value, "absolute": absolute,
                              "relative": relative, "lr": lr, "images_per_s": speed}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    print(f"{chr(13) if tty else ''}epoch {epoch} step {step}/{total_steps} loss {loss_value:.4f} "
                          f"(abs {absolute:.4f} rel {relative:.4f}) lr {lr:.3g} {speed:.1f} img/s "
                          f"eta {_format_eta(eta)}", file=sys.stderr if tty else sys.stdout, flush=True)
                elif tty:
                    done = batch_idx / batches_per_epoch
                    print(f"\repoch {epoch} [{'#' * int(20 * done):<20}] {speed:.1f} img/s eta {_format_eta(eta)}",
                          end="", file=sys.stderr, flush=True)
                if stop:
                    interrupted = True
                    break
                if tc.save_every and step % tc.save_every == 0 and batch_idx < batches_per_epoch:
                    save(last_path, epoch, batch_idx)
            if interrupted and batch_idx < batches_per_epoch:
                save(last_path, epoch, batch_idx)
                break

            # -- end of epoch: validation, best and last checkpoints --------------------------------------------
            if val_loader is not None and ((epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs):
                result = evaluate(ema.module if ema else raw_model, val_loader, val_ds, env, autocast)
                summary = {"epoch": epoch, "step": step, **{f"val_{k}": v for k, v in result.summary().items()}}
                history.append(summary)
                improved = summary["val_nme"] < best_nme
                if improved:
                    best_nme, best_epoch = summary["val_nme"], epoch
                if main:
                    log.write(json.dumps(summary) + "\n")
                    log.flush()
                    print(f"{chr(10) if tty else ''}epoch {epoch}: val NME {summary['val_nme']:.3f}% "
                          f"FR {summary['val_fr']:.2f}% AUC {summary['val_auc']:.4f}"
                          f"{' (best)' if improved else ''}", flush=True)
                if improved:
                    save(best_path, epoch + 1, 0)
            save(last_path, epoch + 1, 0)
            if interrupted:
                break
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if log is not None:
            log.close()
        # Drop DDP's reducer while the process group is still registered: the reducer may hold the group's last
        # reference, and ~ProcessGroupGloo joins threads that need the GIL this thread holds (seen to deadlock).
        model = None
        teardown_distributed(env)
    if main and interrupted:
        print(f"interrupted at step {step}; resume with --resume {last_path}", flush=True)
    return {"model": raw_model, "ema": ema.module if ema else None, "losses": losses, "steps": step, "epoch": epoch,
            "interrupted": interrupted,
            "best_nme": best_nme if best_epoch is not None else None, "best_epoch": best_epoch,
            "last_checkpoint": last_path, "best_checkpoint": best_path if best_epoch is not None else None,
            "images_per_s": timed_images / timed_seconds if timed_seconds > 0 else None, "val": history}
