"""The run log: the run folder's config.yaml and log.jsonl, TensorBoard, the progress bar and the console, with what
a training run reports read from the device at sync points only.

The step hands its losses over as a device tensor (`RunLog.step`) and never waits for the device. A sync point
(`RunLog.sync`) all-reduces the steps' rows since the last one in one collective with each rank's stop signal and
clock, reads them (the host sync), stops the run on a non-finite loss or batch, and writes a record to log.jsonl,
TensorBoard (train.tensorboard) and the tqdm bar (main rank). The throughput clock runs between sync points; the
ranks agree at each on the next one: every train.log_every steps, and at most half of train.preempt_grace_s away at
the measured step time.
"""
import json
import math
import os
import time

import torch
import yaml
from tqdm import tqdm

from structalign.engine.config_schema import Config
from structalign.engine.distributed import DistEnv, all_reduce_sum
from structalign.errors import StructalignError

LOSS_PARTS = ("loss", "absolute", "relative", "visibility")  # what a step logs (visibility: its unweighted BCE)
ROW = len(LOSS_PARTS) + 1  # per step: the loss parts and the number of ranks whose batches were finite
VAL_SCALARS = ("nme", "fr", "auc", "nme_occluded", "visibility_auroc")


class NonFiniteLossError(StructalignError, FloatingPointError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


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


class RunLog:
    """Per-step losses on the device until a sync point, then log.jsonl, TensorBoard and tqdm (main rank).

    losses: per-step global mean loss of the steps synced so far; val: per-evaluation summaries; next_sync: the
    step of the next sync point at the latest (`due`).
    """

    def __init__(self, cfg: Config, env: DistEnv, start_step: int, total_steps: int, resumed: bool):
        """Opens the run folder on the main rank (train.out_dir: config.yaml, log.jsonl, TensorBoard)."""
        tc = cfg.train
        self.tc, self.env = tc, env
        self.last_checkpoint = os.path.join(tc.out_dir, "last.pt")
        self.pending, self.positions = [], []  # per step since the last sync point: Tensor[ROW], (epoch, batch)
        self.losses, self.val = [], []
        self.intervals = []  # (images, seconds, seconds waiting for data) between sync points
        self.images, self.waited, self.clock = 0, 0.0, time.perf_counter()
        self.next_sync = start_step + tc.log_every
        self.file = self.board = None
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=None if env.is_main and tc.progress else True)  # None: only on a terminal
        if env.is_main:
            os.makedirs(tc.out_dir, exist_ok=True)
            with open(os.path.join(tc.out_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), f, sort_keys=False)
            path = os.path.join(tc.out_dir, "log.jsonl")
            if resumed:
                keep_log_until(path, start_step)
            self.file = open(path, "a")
            if tc.tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # imported on use: it takes a second

                self.board = SummaryWriter(tc.out_dir, purge_step=start_step + 1 if resumed else None)

    def say(self, lines: list) -> None:
        """Print lines on the main rank."""
        if self.env.is_main and lines:
            print("\n".join(lines), flush=True)

    def next_batch(self, batches):
        """next(batches), its wait counted as data wait."""
        start = time.perf_counter()
        batch = next(batches)
        self.waited += time.perf_counter() - start
        return batch

    def step(self, row: torch.Tensor, position: tuple, images: int) -> None:
        """One optimiser step: row (Tensor[ROW] on the device), its (epoch, first batch), global images trained."""
        self.pending.append(row)
        self.positions.append(position)
        self.images += images
        self.bar.update()

    def due(self, step: int) -> bool:
        """Whether step ends at a sync point by the cadence: every train.log_every steps, and by next_sync."""
        return step % self.tc.log_every == 0 or step >= self.next_sync

    def restart_clock(self) -> None:
        """Leave the time since the last sync point (a checkpoint save) out of the throughput."""
        self.clock = time.perf_counter()

    def diverged(self, what: str) -> NonFiniteLossError:
        good = f"the last good checkpoint is {self.last_checkpoint}" if os.path.exists(self.last_checkpoint) else \
            "no checkpoint was written yet"
        return NonFiniteLossError(f"{what}; stopped, {good}")

    def sync(self, step: int, lr: float, signal: int) -> dict:
        """All-reduce and read the pending steps (step: the last of them), log them, raise NonFiniteLossError on a
        non-finite loss or batch; signal: this rank's stop signal (0: none). Returns {rank: signal} of the ranks
        that were stopped by one."""
        env, n = self.env, len(self.pending)
        flags = torch.zeros(env.world_size + 1, device=self.pending[0].device)
        flags[env.rank] = float(signal)
        flags[-1] = time.perf_counter() - self.clock  # this rank's seconds since the last sync point
        values = all_reduce_sum(torch.cat([torch.stack(self.pending).flatten(), flags]), env).tolist()  # host sync
        rows = [values[ROW * i:ROW * i + ROW] for i in range(n)]
        for i, (loss, *_, finite_batches) in enumerate(rows):
            if math.isfinite(loss) and finite_batches == env.world_size:
                continue
            where = "at step {} (epoch {}, batch {})".format(step - n + 1 + i, *self.positions[i])
            if finite_batches != env.world_size:
                raise self.diverged(f"a training batch holds NaN or infinite images or landmarks {where} (a corrupt "
                                    f"sample or a loader fault)")
            raise self.diverged(f"non-finite loss ({loss / env.world_size}) {where}: the run diverged (lower "
                                f"optim.lr or set optim.grad_clip)")
        mean = {part: sum(r[j] for r in rows) / n / env.world_size for j, part in enumerate(LOSS_PARTS)}
        self.losses.extend(r[0] / env.world_size for r in rows)
        now = time.perf_counter()
        seconds = now - self.clock
        self.intervals.append((self.images, seconds, self.waited))
        if env.is_main:
            record = {"step": step, "epoch": self.positions[-1][0], **mean, "lr": lr,
                      "images_per_s": self.images / seconds, "data_wait": self.waited / seconds, "steps": n}
            self._write(record, "train", (*LOSS_PARTS, "lr", "images_per_s", "data_wait"))
            self.bar.set_postfix(loss=f"{mean['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}", refresh=False)
            tqdm.write(f"epoch {record['epoch']} step {step}/{self.bar.total} loss {mean['loss']:.4f} (abs "
                       f"{mean['absolute']:.4f} rel {mean['relative']:.4f} vis {mean['visibility']:.4f}) lr {lr:.3g} "
                       f"{record['images_per_s']:.1f} img/s, data wait {100 * record['data_wait']:.0f} %")
        # Half the grace period on at the measured step time: the same on every rank (computed from summed values).
        step_s = values[-1] / env.world_size / n
        self.next_sync = step + max(1, min(self.tc.log_every, int(self.tc.preempt_grace_s / 2 / step_s)))
        self.pending.clear()
        self.positions.clear()
        self.images, self.waited, self.clock = 0, 0.0, now
        return {rank: int(flag) for rank, flag in enumerate(values[ROW * n:-1]) if flag}

    def validation(self, summary: dict, improved: bool) -> None:
        """Record an evaluation: summary {"epoch", "step", "val_<metric>": value}."""
        self.val.append(summary)
        if self.env.is_main:
            self._write(summary, "val", [f"val_{k}" for k in VAL_SCALARS if summary[f"val_{k}"] is not None])
            auroc = summary["val_visibility_auroc"]
            tqdm.write(f"epoch {summary['epoch']}: val NME {summary['val_nme']:.3f}% FR {summary['val_fr']:.2f}% "
                       f"AUC {summary['val_auc']:.4f}{'' if auroc is None else f' visibility AUROC {auroc:.3f}'}"
                       f"{' (best)' if improved else ''}")

    def _write(self, record: dict, group: str, scalars) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key in scalars:
                self.board.add_scalar(f"{group}/{key.removeprefix('val_')}", record[key], record["step"])

    def throughput(self) -> tuple:
        """(images per second, share of the time spent waiting for data) between sync points, the first interval
        (warm-up: allocations, compilation) left out where there are others; (None, None) before any."""
        timed = self.intervals[1:] or self.intervals
        seconds = sum(t[1] for t in timed)
        if not timed:
            return None, None
        return sum(t[0] for t in timed) / seconds, sum(t[2] for t in timed) / seconds

    def close(self) -> None:
        self.bar.close()
        for handle in (self.file, self.board):
            if handle is not None:
                handle.close()
