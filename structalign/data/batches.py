"""The batch both pipelines yield, and the part of a loader they share: epoch plan and per-sample planning."""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from structalign.data.augment import IDENTITY, AugmentConfig, crop_visibility, draw_sample, plan_sample
from structalign.data.records import FaceDataset
from structalign.data.sampling import EpochPlan, pose_balance_repeats

BALANCE = (None, "pdb")


@dataclass
class Batch:
    """images (Tensor[B, 3, S, S] float32, normalised), landmarks (Tensor[B, N, 2] float32, crop pixels),
    visibility (Tensor[B, N] float32: 0 outside the crop, under the occlusion rectangle, or annotated occluded),
    index (LongTensor[B] dataset indices), matrix (Tensor[B, 2, 3] float32, original-image -> crop pixels),
    attributes (LongTensor[B, 6] or None); all on the loader's device."""

    images: torch.Tensor
    landmarks: torch.Tensor
    visibility: torch.Tensor
    index: torch.Tensor
    matrix: torch.Tensor
    attributes: Optional[torch.Tensor]


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


class BatchSource:
    """Shared loader state: which samples each batch holds and what is done to each of them.

    len(loader) = batches per epoch of this shard; loader.epoch(e, start_batch=k) yields the Batches of epoch e from
    the k-th on, identical to those of an uninterrupted epoch.
    """

    def __init__(self, ds: FaceDataset, batch_size: int, train: bool, device, image_size: int = 256,
                 shard_id: int = 0, num_shards: int = 1, seed: int = 0, balance=None,
                 augment: Optional[AugmentConfig] = None, drop_last=None, padding: float = 1.25):
        if balance not in BALANCE:
            raise ValueError(f"balance must be one of {BALANCE}, got {balance!r}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if padding <= 0:
            raise ValueError(f"padding must be > 0, got {padding}")
        if augment is not None and not isinstance(augment, AugmentConfig):
            raise TypeError(f"augment must be an AugmentConfig or None, got {type(augment).__name__}")
        if len(ds) == 0:
            raise ValueError(f"dataset {ds.name} is empty")
        self.ds, self.train, self.size, self.seed, self.padding = ds, train, image_size, seed, padding
        self.device = torch.device(device)
        self.augment = augment if train else None
        repeats = pose_balance_repeats(ds.landmarks()) if (train and balance == "pdb") else None
        self.plan = EpochPlan(len(ds), batch_size, shuffle=train, seed=seed, shard_id=shard_id,
                              num_shards=num_shards, drop_last=train if drop_last is None else drop_last,
                              repeats=repeats)
        self.has_attributes = all(r.attributes is not None for r in ds.records)
        self.planned = SamplePlanner(ds, image_size, seed, padding, self.augment)

    def __len__(self) -> int:
        return len(self.plan)

    def finish(self, images: torch.Tensor, landmarks: torch.Tensor, plans: list, indices) -> Batch:
        """A Batch from pipeline outputs (images [B, 3, S, S], landmarks [B, N, 2] on any device) and the plans."""
        visibility = np.stack([crop_visibility(lm, p.visibility, self.size, p.draw.occlusion)
                               for lm, p in zip(landmarks.cpu().numpy(), plans)])
        matrix = np.stack([p.matrix for p in plans]).astype(np.float32)
        attributes = None
        if self.has_attributes:
            attributes = torch.from_numpy(np.stack([self.ds[int(i)].attributes for i in indices])).to(self.device)
        return Batch(images.to(self.device, non_blocking=True), landmarks.to(self.device),
                     torch.from_numpy(visibility).to(self.device), torch.as_tensor(indices, dtype=torch.long,
                                                                                    device=self.device),
                     torch.from_numpy(matrix).to(self.device), attributes)
