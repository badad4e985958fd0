"""The batch both pipelines yield, and the part of a loader they share: epoch plan, per-sample planning, the way to
the device (one batch ahead, structalign/data/transfer.py), and what happens when an image cannot be read during
training (a file changed after the dataset was opened).

An unreadable image stops the run with a one-line DatasetError naming the file under on_error="raise". Under
on_error="skip" the sample is replaced by the next dataset index (in dataset order, wrapping) whose image reads, with
the same augmentation draws, so a resumed run sees exactly what an uninterrupted one saw; each replaced image is
reported once (a line on stderr, and a line in skip_log).
"""
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from structalign.data.augment import (CROP_PADDING, IDENTITY, AugmentConfig, crop_visibility, draw_sample,
                                      inside_crop, plan_sample)
from structalign.data.records import ON_ERROR, DatasetError, FaceDataset, Problem, Skipped
from structalign.data.sampling import EpochPlan, pose_balance_repeats
from structalign.data.transfer import DeviceTransfer, Prefetcher

BALANCE = (None, "pdb")


def replacements(index: int, size: int):
    """The dataset indices tried, in order, for the sample of `index`: itself, then the following ones, wrapping."""
    return ((index + k) % size for k in range(size))


@dataclass
class Batch:
    """images (Tensor[B, 3, S, S] float32, normalised), landmarks (Tensor[B, N, 2] float32, crop pixels),
    visibility (Tensor[B, N] float32 labels, augment.crop_visibility: 1 visible, 0 occluded (annotated so, or under
    the random occlusion rectangle), -1 unlabelled (the record has no label, or the point lies outside the crop)),
    index (LongTensor[B] dataset indices), matrix (Tensor[B, 2, 3] float32, original-image -> crop pixels),
    attributes (LongTensor[B, 6] or None), in_crop (Tensor[B, N] float32: 1 where the landmark lies inside the crop,
    the loss weights of data.out_of_crop=ignore); all on the loader's device."""

    images: torch.Tensor
    landmarks: torch.Tensor
    visibility: torch.Tensor
    index: torch.Tensor
    matrix: torch.Tensor
    attributes: Optional[torch.Tensor]
    in_crop: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class SamplePlanner:
    """Plans a sample from (epoch, position, index); small and picklable, so DataLoader workers can hold it."""

    ds: FaceDataset
    size: int
    seed: int
    padding: float
    augment: Optional[AugmentConfig]

    def __call__(self, epoch: int, position: int, index: int):
        draw = IDENTITY if self.augment is None else draw_sample(self.augment, self.size, self.seed, epoch, position)
        return plan_sample(self.ds[index], self.ds.scheme, self.size, draw, self.padding)


class BatchSource(ABC):
    """Shared loader state: which samples each batch holds and what is done to each of them.

    len(loader) = batches per epoch of this shard; loader.epoch(e, start_batch=k) yields the Batches of epoch e from
    the k-th on, identical to those of an uninterrupted epoch. A pipeline implements _host_epoch: its batches on the
    host (images may already be on the device), which epoch() makes one batch ahead in a background thread and hands
    to the device without blocking it (transfer.py).
    """

    def __init__(self, ds: FaceDataset, batch_size: int, train: bool, device, image_size: int = 256,
                 shard_id: int = 0, num_shards: int = 1, seed: int = 0, balance=None,
                 augment: Optional[AugmentConfig] = None, drop_last=None, padding: float = CROP_PADDING,
                 on_error: str = "raise", skip_log: Optional[str] = None):
        if on_error not in ON_ERROR:
            raise DatasetError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if balance not in BALANCE:
            raise ValueError(f"balance must be one of {BALANCE}, got {balance!r}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if padding <= 0:
            raise ValueError(f"padding must be > 0, got {padding}")
        if augment is not None and not isinstance(augment, AugmentConfig):
            raise TypeError(f"augment must be an AugmentConfig or None, got {type(augment).__name__}")
        if len(ds) == 0:
            raise DatasetError(f"dataset {ds.name} is empty")
        self.ds, self.train, self.size, self.seed, self.padding = ds, train, image_size, seed, padding
        self.on_error, self.skip_log = on_error, skip_log
        self.skipped = {}  # dataset index -> Skipped: images found unreadable by this loader (on_error="skip")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # the background thread has no current device
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.transfer = DeviceTransfer(self.device)
        self._prefetcher = None  # of the epoch being read
        self.augment = augment if train else None
        repeats = pose_balance_repeats(ds.landmarks()) if (train and balance == "pdb") else None
        self.plan = EpochPlan(len(ds), batch_size, shuffle=train, seed=seed, shard_id=shard_id,
                              num_shards=num_shards, drop_last=train if drop_last is None else drop_last,
                              repeats=repeats)
        self.has_attributes = all(r.attributes is not None for r in ds.records)
        self.planned = SamplePlanner(ds, image_size, seed, padding, self.augment)

    def __len__(self) -> int:
        return len(self.plan)

    def epoch(self, epoch: int, start_batch: int = 0):
        """An iterator of the Batches of epoch `epoch` from batch start_batch on, on the loader's device. Batch k+1 is
        made while batch k is used; a later epoch() call of this loader stops this one."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        if self._prefetcher is not None:
            self._prefetcher.stop()
        self._prefetcher = Prefetcher(self._host_epoch(epoch, start_batch), self.transfer)
        return self._prefetcher.batches()

    @abstractmethod
    def _host_epoch(self, epoch: int, start_batch: int):
        """A generator of the host Batches (finish()) of epoch `epoch` from batch start_batch on; it runs in the
        background thread, so what must happen in the caller's thread (worker processes, draws from torch's global
        generator) happens before it is returned."""

    def unreadable(self, index: int, message: str) -> None:
        """The image of dataset index `index` cannot be read (message names it): DatasetError under
        on_error="raise"; otherwise reported once, on stderr and in skip_log."""
        record = self.ds[index]
        if self.on_error == "raise":
            raise DatasetError(f"{message} (annotation {record.where}; on_error=skip replaces such a sample by the "
                               f"next readable one)", Problem.CORRUPT_IMAGE)
        if index in self.skipped:
            return
        item = Skipped(record.source or record.image_path, record.line, message, Problem.CORRUPT_IMAGE)
        self.skipped[index] = item
        print(f"skipping an unreadable image, replaced by the next readable sample: {item}", file=sys.stderr,
              flush=True)
        if self.skip_log:
            with open(self.skip_log, "a", encoding="utf-8") as f:
                f.write(f"{item.kind.value}\t{item.where}\t{item.reason}\n")

    def finish(self, images: torch.Tensor, landmarks: torch.Tensor, plans: list, indices) -> Batch:
        """A host Batch from pipeline outputs (images [B, 3, S, S] on the host or already on the loader's device,
        landmarks [B, N, 2] on the host) and the plans; transfer.send moves it to the device."""
        points = landmarks.numpy()
        visibility = np.stack([crop_visibility(lm, p.visibility, self.size, p.draw.occlusion)
                               for lm, p in zip(points, plans)])
        in_crop = inside_crop(points, self.size).astype(np.float32)
        matrix = np.stack([p.matrix for p in plans]).astype(np.float32)
        attributes = None
        if self.has_attributes:
            attributes = torch.from_numpy(np.stack([self.ds[int(i)].attributes for i in indices]))
        return Batch(images, landmarks, torch.from_numpy(visibility), torch.as_tensor(indices, dtype=torch.long),
                     torch.from_numpy(matrix), attributes, torch.from_numpy(in_crop))
